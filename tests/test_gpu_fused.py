"""GPU tests of the fused kernels (marked ``gpu``; skipped without a CUDA GPU and jax-triton).

Two ways to run them on one GPU:

* through JAX and jax-triton, world size 1: the op as a user calls it, its
  workspace in ``cuda`` memory from ``custom_calls.cuda_driver``;
* 8 ranks emulated on the one GPU (``custom_calls.rank_emulation``): the real
  compiled kernels, each rank's launch on its own stream with co-resident
  grids, 200 repetitions with fresh data, against float64/float32 on the host.

Run on a GPU host: ``JAX_FLUX_TEST_PLATFORM=gpu python -m pytest -q -m gpu``.
"""

import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, testing, workspace
from tests.helpers import fused_fn

pytestmark = pytest.mark.gpu

_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
# Through JAX, f32 operands go through tf32 tensor cores (the ops' default
# precision, as XLA's dot): 10-bit mantissas give ~4e-4 relative error on
# random data. The emulation below runs f32 as "ieee": exact float32 products.
_TOL = {"float32": 1e-3, "float16": 2e-3, "bfloat16": 2e-2}
_TOL_EMULATED = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def _tol(dtype) -> float:
    return _TOL[jnp.dtype(dtype).name]


# ------------------------------------------------------- world size 1, JAX


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_world_size_1_through_jax_triton(op, dtype):
    mesh = testing.mesh(jax.devices()[:1])
    f = testing.sharded(op, mesh, "fused")
    for call in range(20):  # fresh data each call: a stale workspace shows
        x, w, x64, w64 = testing.random_operands(333, 200, 129, dtype, seed=call)
        out = f(*testing.place(op, mesh, x, w))
        assert testing.relative_error(out, x64 @ w64) < _tol(dtype), call
    assert any(ws["location"] == "cuda" for ws in workspace.info())
    text = f.lower(*testing.place(op, mesh, x, w)).as_text()
    assert "all-gather" not in text and "reduce-scatter" not in text


@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_float32_precision_world_size_1(op):
    # precision reaches the compiled kernel: tensorfloat32 by default (an error
    # well above float32's), exact float32 at HIGHEST, as XLA's dot runs them.
    mesh = testing.mesh(jax.devices()[:1])
    x, w, x64, w64 = testing.random_operands(256, 512, 256, jnp.float32, seed=7)
    args = testing.place(op, mesh, x, w)
    errors = {}
    x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    for precision in (None, "highest", x3):
        # (XLA's dot is not asked for x3: which GPU dots run that preset is XLA's business.)
        for impl in ("fused", "xla") if precision != x3 else ("fused",):
            out = testing.sharded(op, mesh, impl, precision=precision)(*args)
            errors[impl, precision] = testing.relative_error(out, x64 @ w64)
    print(errors)
    assert 1e-5 < errors["fused", None] < testing.TF32_TOLERANCE
    assert errors["fused", "highest"] < 1e-5 and errors["xla", "highest"] < 1e-5
    assert errors["fused", x3] < 1e-5


@pytest.mark.parametrize("w_transposed", [True, False], ids=["wT", "w"])
@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_float8_world_size_1(op, w_transposed):
    # float8_e4m3fn operands (Hopper's FP8 MMAs), a bfloat16 result, against
    # the host and XLA's dot; the gradient through the transposed-weight path.
    mesh = testing.mesh(jax.devices()[:1])
    kw = dict(preferred_element_type=jnp.bfloat16, w_transposed=w_transposed)
    f = testing.sharded(op, mesh, "fused", **kw)
    xla = testing.sharded(op, mesh, "xla", **kw)
    for call in range(5):
        x, w, x64, w64 = testing.random_operands(512, 1024, 384, jnp.float8_e4m3fn, seed=call)
        args = testing.place(op, mesh, x, w, w_transposed=w_transposed)
        out = f(*args)
        assert out.dtype == jnp.bfloat16
        assert testing.relative_error(out, x64 @ w64) < 2e-2, call
        assert testing.relative_error(out, np.asarray(xla(*args), np.float64)) < 2e-2, call
    g = jnp.asarray(np.random.default_rng(5).standard_normal((512, 384)), jnp.bfloat16)
    _, dx, dw = testing.sharded(op, mesh, "fused", grad=True, **kw)(*args, g)
    g64 = np.asarray(g, np.float64)
    dw64 = x64.T @ g64
    assert testing.relative_error(dx, g64 @ w64.T) < 8e-2
    assert testing.relative_error(dw, dw64.T if w_transposed else dw64) < 8e-2


@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_float8_weight_with_bfloat16_activations_world_size_1(op):
    # Weight-only float8 (and the float8 backward's dx): bfloat16 x against an
    # e4m3 w, widened tile by tile in registers; against the host and XLA's
    # mixed dot, forward and gradient (dw rounded to float8).
    mesh = testing.mesh(jax.devices()[:1])
    f, xla = (testing.sharded(op, mesh, impl) for impl in ("fused", "xla"))
    for call in range(3):
        x, w, x64, w64 = testing.random_operands(512, 1024, 384, jnp.bfloat16, seed=call,
                                                 w_dtype=jnp.float8_e4m3fn)
        args = testing.place(op, mesh, x, w)
        out = f(*args)
        assert out.dtype == jnp.bfloat16
        assert testing.relative_error(out, x64 @ w64) < 2e-2, call
        assert testing.relative_error(out, np.asarray(xla(*args), np.float64)) < 2e-2, call
    g = jnp.asarray(np.random.default_rng(6).standard_normal((512, 384)), jnp.bfloat16)
    _, dx, dw = testing.sharded(op, mesh, "fused", grad=True)(*args, g)
    g64 = np.asarray(g, np.float64)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float8_e4m3fn
    assert testing.relative_error(dx, g64 @ w64.T) < 2e-2
    assert testing.relative_error(dw, x64.T @ g64) < 8e-2


def test_fused_gathered_x_and_grad_world_size_1():
    mesh = testing.mesh(jax.devices()[:1])
    x, w, x64, w64 = testing.random_operands(256, 512, 384, jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(3).standard_normal((256, 384)), jnp.bfloat16)
    g64 = np.asarray(g, np.float64)
    out, dx, dw = testing.sharded("all_gather_matmul", mesh, "fused", grad=True)(
        *testing.place("all_gather_matmul", mesh, x, w), g)
    assert testing.relative_error(out, x64 @ w64) < 2e-2
    assert testing.relative_error(dx, g64 @ w64.T) < 2e-2
    assert testing.relative_error(dw, x64.T @ g64) < 2e-2


@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_batch_first_folded_world_size_1(op):
    # x [B, S, K] gathered / scattered along S (axis=1): the batch folded into
    # the kernel's rows (ROWS < m), one launch, ragged S; output and gradients.
    from jax.sharding import PartitionSpec as P

    import jax_flux

    mesh = testing.mesh(jax.devices()[:1])
    rng = np.random.default_rng(11)
    x64, w64 = rng.standard_normal((3, 333, 200)), rng.standard_normal((200, 129)) / 8
    g64 = rng.standard_normal((3, 333, 129))
    x, w, g = (jnp.asarray(a, jnp.bfloat16) for a in (x64, w64, g64))
    if op == "all_gather_matmul":
        ours = lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", axis=1, impl="fused")  # noqa: E731
        specs = (P(None, "tp"), P(None, "tp")), P(None, None, "tp")
    else:
        ours = lambda x, w: jax_flux.matmul_reduce_scatter(  # noqa: E731
            x, w, "tp", scatter_dimension=1, impl="fused")
        specs = (P(None, None, "tp"), P("tp", None)), P(None, "tp")
    f = jax.shard_map(ours, mesh=mesh, in_specs=specs[0], out_specs=specs[1])

    def run(x, w, g):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(g))

    got = jax.jit(run)(x, w, g)
    want = (x64 @ w64, g64 @ w64.T, np.einsum("bsk,bsn->kn", x64, g64))
    for a, b in zip(got, want):
        assert testing.relative_error(a, b) < 2e-2
    text = jax.jit(f).lower(x, w).as_text()
    assert text.count("triton_kernel_call") == 1 and "stablehlo.while" not in text


def test_fused_large_world_size_1_with_explicit_configs():
    mesh = testing.mesh(jax.devices()[:1])
    for op, cfg in (("all_gather_matmul", AllGatherMatmulConfig(
                        block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3,
                        chunk_rows=256, comm_programs=2)),
                    ("matmul_reduce_scatter", MatmulReduceScatterConfig(
                        block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)),
                    ("matmul_reduce_scatter", MatmulReduceScatterConfig(
                        block_m=128, block_n=128, block_k=64, reduce_programs=0))):
        x, w, x64, w64 = testing.random_operands(4096, 2048, 3072, jnp.bfloat16, seed=5)
        out = testing.sharded(op, mesh, "fused", cfg)(*testing.place(op, mesh, x, w))
        assert testing.relative_error(out, x64 @ w64) < 2e-2, op


def test_fused_model_scanned_and_rematerialised_world_size_1():
    # The kernels inside XLA's while loop (scan over layers) and recomputed under
    # jax.checkpoint: each iteration is a new call (a new epoch) on the baked
    # workspace addresses. Loss and gradients against the same model on xla.
    import dataclasses

    from flax import nnx

    from models import PRESETS, Llama
    from models.llama import copy_parameters, cross_entropy

    mesh = testing.mesh(jax.devices()[:1])
    cfg = dataclasses.replace(PRESETS["tiny"], layers=3, scan_layers=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (4, 65)), jnp.int32)
    step = nnx.jit(nnx.value_and_grad(lambda m: cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])))
    reference = Llama(cfg, mesh=mesh, impl="xla", rngs=nnx.Rngs(1))
    ref_loss, ref_grads = step(reference)
    ref_loss, ref_grads = float(ref_loss), jax.tree.leaves(nnx.to_pure_dict(ref_grads))
    for remat in ("none", "collective_matmuls", "full"):
        model = Llama(dataclasses.replace(cfg, remat=remat), mesh=mesh, impl="fused",
                      rngs=nnx.Rngs(2))
        copy_parameters(reference, model)
        loss, grads = step(model)
        assert abs(float(loss) - ref_loss) < 1e-3 * abs(ref_loss), remat
        for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), ref_grads):
            assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-2, remat


@pytest.mark.parametrize("op", list(testing.OPS))
def test_async_status_check_world_size_1(op, monkeypatch):
    # The GPU default: no per-call check in the program (no host synchronisation);
    # the error records are pinned host memory, clear after good calls.
    from jax_flux import errors

    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    monkeypatch.setenv("JAX_FLUX_ON_PEER_TIMEOUT", "log")
    mesh = testing.mesh(jax.devices()[:1])
    f = fused_fn(op, mesh)  # a fresh program, traced in this test's mode
    try:
        for call in range(5):
            x, w, x64, w64 = testing.random_operands(256, 384, 512, jnp.bfloat16, seed=call)
            out = f(*testing.place(op, mesh, x, w))
            assert testing.relative_error(out, x64 @ w64) < 2e-2, call
        text = f.lower(*testing.place(op, mesh, x, w)).as_text()
        assert "stablehlo.case" not in text and "callback" not in text
        assert errors.watchdog.running
        records = [r for ws, r in workspace.records() if ws.location == "cuda"]
        assert records and not any(np.asarray(r.words()).any() for r in records)
        errors.check()
    finally:
        errors.watchdog.stop()


def test_a_failure_on_the_gpu_reaches_the_host_record(monkeypatch):
    # Corrupt the GEMM-RS signals of the one rank so its reduction finds a value
    # beyond its epoch: the kernel fails at once and writes the rank's error
    # record (pinned host memory) from the GPU; check() reads it on the host.
    # (The GEMM programs overwrite each signal when their tile is done; with a
    # long K the reducers read the corrupt value first.)
    from custom_calls import cuda_driver, signals
    from jax_flux import errors

    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    monkeypatch.setenv("JAX_FLUX_ON_PEER_TIMEOUT", "log")
    op = "matmul_reduce_scatter"
    mesh = testing.mesh(jax.devices()[:1])
    f = fused_fn(op, mesh)  # a fresh program, traced in this test's mode
    x, w, _, _ = testing.random_operands(256, 16384, 512, jnp.bfloat16)
    xs, ws_ = testing.place(op, mesh, x, w)
    try:
        jax.block_until_ready(f(xs, ws_))
        live = [ws for ws in workspace._live.values() if ws.location == "cuda"]
        for ws in live:
            b = ws.buffers[0][0]
            cuda_driver.fill(b.keep, b.ptr + signals.CONTROL_BYTES,
                             signals.DATA_OFF - signals.CONTROL_BYTES, 0x7F)
        out = np.asarray(f(xs, ws_), np.float32)
        assert np.isnan(out).any()  # sums of partials not seen arrive: NaN, not stale
        with pytest.raises(Exception, match=r"found epoch 2139062143 from rank 0.*out of step"):
            errors.check()
        workspace.reset()
        errors.check()
        out = f(xs, ws_)
        assert testing.relative_error(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64)) \
            < 2e-2
    finally:
        errors.watchdog.stop()
        workspace.reset()


# --------------------------------------------- 8 ranks emulated on one GPU


_WORLD = 8


@pytest.fixture(scope="module")
def world():
    from custom_calls.rank_emulation import OneGpuWorld

    return OneGpuWorld(_WORLD)


def _host(rng, shape, dtype, scale=1.0):
    a = rng.standard_normal(shape) * scale
    return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _ag_cfg(m, pull=False):
    return dict(block_m=64 if m < 128 else 128, block_n=128, block_k=64, chunk_rows=64,
                comm_programs=2, copy_rows=32, copy_cols=128, num_warps=4, num_stages=3,
                pull=pull)


_TIMEOUT_MS = 10_000  # of the GPU's global timer


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(128, 512, 256), (100, 200, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pull", [False, True], ids=["push", "pull"])
def test_ag_gemm_8_ranks_on_one_gpu(world, shape, dtype, pull):
    m, k, n = shape
    reps = 200 if shape == (128, 512, 256) and dtype == "bfloat16" else 20
    rng = np.random.default_rng(0)
    for rep in range(reps):
        xs = [_host(rng, (m, k), dtype) for _ in range(_WORLD)]
        ws = [_host(rng, (k, n), dtype, k ** -0.5) for _ in range(_WORLD)]
        ys, xgs, _ = world.ag_gemm(xs, ws, cfg=_ag_cfg(m, pull), grid=world.programs_per_rank,
                                   timeout_ms=_TIMEOUT_MS, return_gathered=rep % 2 == 0,
                                   precision="ieee")
        xg = np.concatenate([x.astype(np.float32) for x in xs])
        for r in range(_WORLD):
            ref = xg.astype(np.float64) @ ws[r].astype(np.float64)
            err = testing.relative_error(ys[r].astype(np.float32), ref)
            assert err < _TOL_EMULATED[dtype], (rep, r, err)
            if xgs is not None:
                assert np.array_equal(xgs[r].view(np.uint8), np.concatenate(xs).view(np.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(1024, 512, 256), (8 * 50, 200, 300), (64, 1024, 512)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reducers", [4, 0], ids=["reduce_programs", "epilogue"])
def test_gemm_rs_8_ranks_on_one_gpu(world, shape, dtype, reducers):
    m_total, k, n = shape
    cfg = dict(block_m=64, block_n=128, block_k=64, reduce_programs=reducers, num_warps=4,
               num_stages=3)
    reps = 200 if shape == (1024, 512, 256) and dtype == "bfloat16" else 20
    rng = np.random.default_rng(1)
    precision = "ieee"
    for rep in range(reps):
        xs = [_host(rng, (m_total, k), dtype) for _ in range(_WORLD)]
        ws = [_host(rng, (k, n), dtype, k ** -0.5) for _ in range(_WORLD)]
        zs, _ = world.gemm_rs(xs, ws, cfg=cfg, grid=world.programs_per_rank, timeout_ms=_TIMEOUT_MS,
                              precision=precision)
        total = sum(x.astype(np.float64) @ w.astype(np.float64) for x, w in zip(xs, ws))
        rows = m_total // _WORLD
        for r in range(_WORLD):
            err = testing.relative_error(zs[r].astype(np.float32),
                                         total[r * rows:(r + 1) * rows])
            assert err < _TOL_EMULATED[dtype], (rep, r, err)
        if rep < 3:  # bitwise repeatable: the same inputs give the same bits
            again, _ = world.gemm_rs(xs, ws, cfg=cfg, grid=world.programs_per_rank,
                                     timeout_ms=_TIMEOUT_MS, precision=precision)
            for r in range(_WORLD):
                assert np.array_equal(zs[r].view(np.uint8), again[r].view(np.uint8))


@pytest.mark.parametrize("op", ["ag_gemm", "gemm_rs"])
def test_float8_with_w_transposed_8_ranks_on_one_gpu(world, op):
    # float8_e4m3fn operands, w given as w^T (the layout FP8 MMAs read), bfloat16
    # results and partials; K tiles of 128. Exact float8 products summed in float32,
    # one bfloat16 rounding (twice for GEMM-RS: partial, then sum).
    f8, bf16 = ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    m, k, n = (128, 512, 256) if op == "ag_gemm" else (1024, 512, 256)
    for rep in range(50):
        xs = [rng.standard_normal((m, k)).astype(f8) for _ in range(_WORLD)]
        wts = [(rng.standard_normal((n, k)) * k ** -0.5).astype(f8) for _ in range(_WORLD)]
        kw = dict(grid=world.programs_per_rank, timeout_ms=_TIMEOUT_MS, precision="ieee",
                  out_dtype=bf16, w_transposed=True)
        if op == "ag_gemm":
            outs, _, _ = world.ag_gemm(xs, wts, cfg=dict(_ag_cfg(m), block_k=128), **kw)
            xg = np.concatenate(xs).astype(np.float64)
            refs = [xg @ w.astype(np.float64).T for w in wts]
        else:
            cfg = dict(block_m=64, block_n=128, block_k=128, reduce_programs=0, num_warps=4,
                       num_stages=3)
            outs, _ = world.gemm_rs(xs, wts, cfg=cfg, **kw)
            total = sum(x.astype(np.float64) @ w.astype(np.float64).T for x, w in zip(xs, wts))
            rows = m // _WORLD
            refs = [total[r * rows:(r + 1) * rows] for r in range(_WORLD)]
        for r in range(_WORLD):
            assert outs[r].dtype == bf16
            err = testing.relative_error(outs[r].astype(np.float32), refs[r])
            assert err < _TOL_EMULATED["bfloat16"], (rep, r, err)


def test_a_rank_that_never_launches_is_a_timeout_not_a_hang(world):
    from custom_calls.rank_emulation import OneGpuWorld

    partial = OneGpuWorld(_WORLD, programs_per_rank=world.programs_per_rank, skip_ranks={3})
    rng = np.random.default_rng(2)
    xs = [_host(rng, (64, 128), "bfloat16") for _ in range(_WORLD)]
    ws = [_host(rng, (128, 128), "bfloat16") for _ in range(_WORLD)]
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="timed out"):
        partial.ag_gemm(xs, ws, cfg=_ag_cfg(64), grid=partial.programs_per_rank,
                        timeout_ms=500, precision="ieee")
    # The waits are timed by the GPU's clock: about 0.5 s.
    elapsed = time.perf_counter() - start
    assert 0.4 < elapsed < 30, elapsed

