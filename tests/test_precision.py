"""The ops' ``precision`` (``lax.dot_general``'s): xla and ring hand it to XLA's dots,
the fused kernels run the float32 input precision XLA runs on a GPU for it, forward and
backward; the config ``jax_default_matmul_precision`` applies where it is None; tuning
records of float32 problems are kept apart by it."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax

from custom_calls import ag_gemm as ag_kernel
from custom_calls import gemm_rs as rs_kernel
from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, autotune, testing
from models import Llama
from tests.helpers import cotangent, equations, mesh_of
from tests.model_helpers import CFG, _tokens
from tests.nn_helpers import pair, x_of

AG, RS = autotune.AG, autotune.RS
PRESET = lax.DotAlgorithmPreset


@pytest.fixture
def kernel_precisions(monkeypatch):
    """The ``input_precision`` of every fused launch traced, in order: [(kernel, value)]."""
    seen = []
    for module, name in ((ag_kernel, "ag_gemm"), (rs_kernel, "gemm_rs")):
        real = getattr(module, name)

        def spy(*args, real=real, name=name, **kw):
            seen.append((name, kw["input_precision"]))
            return real(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    return seen


def _problem(op, dtype=jnp.float32):
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(64, 32, 48, dtype, seed=3)
    xs, ws = testing.place(op, mesh, x, w)
    g, g64 = cotangent((64, 48), dtype, seed=4)
    return mesh, xs, ws, g, (x64, w64, g64)


def _check(out, dx, dw, ref, tol=1e-5):
    x64, w64, g64 = ref
    assert testing.relative_error(out, x64 @ w64) < tol
    assert testing.relative_error(dx, g64 @ w64.T) < tol
    assert testing.relative_error(dw, x64.T @ g64) < tol


@pytest.mark.parametrize("op", [AG, RS])
def test_fused_kernels_run_the_input_precision_xla_runs_for_it(op, kernel_precisions):
    mesh, xs, ws, g, ref = _problem(op)
    fwd, bwd = ("ag_gemm", "gemm_rs") if op == AG else ("gemm_rs", "ag_gemm")
    cases = [(None, "tf32"), ("default", "tf32"), (lax.Precision.HIGH, "tf32"),
             ("highest", "ieee"), (("highest", "default"), "ieee"), ("F32_F32_F32", "ieee"),
             (PRESET.TF32_TF32_F32, "tf32"), (PRESET.TF32_TF32_F32_X3, "tf32x3")]
    for precision, expected in cases:
        kernel_precisions.clear()
        if precision in (PRESET.TF32_TF32_F32, PRESET.TF32_TF32_F32_X3):
            # XLA's CPU dot (the weight gradient) has no tf32: forward only.
            out = testing.sharded.__wrapped__(op, mesh, "fused", precision=precision)(xs, ws)
            assert testing.relative_error(out, ref[0] @ ref[1]) < 1e-5
            assert kernel_precisions == [(fwd, expected)], precision
            continue
        fn = testing.sharded.__wrapped__(op, mesh, "fused", grad=True, precision=precision)
        _check(*fn(xs, ws, g), ref)  # the interpreter multiplies exactly at any precision
        # The forward launch, then the backward pass's (the other kernel, same precision).
        assert kernel_precisions == [(fwd, expected), (bwd, expected)], precision

    # None reads jax_default_matmul_precision, as lax.dot_general does.
    kernel_precisions.clear()
    with jax.default_matmul_precision("float32"):
        _check(*testing.sharded.__wrapped__(op, mesh, "fused", grad=True)(xs, ws, g), ref)
    assert kernel_precisions == [(fwd, "ieee"), (bwd, "ieee")]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_operands_multiply_exactly_at_any_precision(dtype, kernel_precisions):
    mesh, xs, ws, _, ref = _problem(AG, dtype)
    preset = PRESET.BF16_BF16_F32 if dtype == jnp.bfloat16 else PRESET.F16_F16_F32
    for precision in (None, "highest", preset, "F32_F32_F32"):
        out = testing.sharded.__wrapped__(AG, mesh, "fused", precision=precision)(xs, ws)
        assert testing.relative_error(out, ref[0] @ ref[1]) < testing.TOLERANCE[jnp.dtype(dtype)]
    assert {p for _, p in kernel_precisions} == {"ieee"}


@pytest.mark.parametrize("impl", ["xla", "ring"])
@pytest.mark.parametrize("op", [AG, RS])
def test_xla_and_ring_hand_it_to_every_dot(op, impl):
    mesh, xs, ws, g, ref = _problem(op)
    for precision, shown in ((None, "DEFAULT, DEFAULT"), ("highest", "HIGHEST, HIGHEST"),
                             (("highest", "default"), "HIGHEST, DEFAULT")):
        fn = testing.sharded.__wrapped__(op, mesh, impl, grad=True, precision=precision)
        text = fn.lower(xs, ws, g).as_text()
        # Forward, dx and dw: every dot of the program carries it.
        assert set(re.findall(r"precision = \[([A-Z, ]*)\]", text)) == {shown}, precision
        assert text.count("dot_general") >= 3
        _check(*fn(xs, ws, g), ref)
    fn = testing.sharded.__wrapped__(op, mesh, impl, grad=True, precision="F32_F32_F32")
    text = fn.lower(xs, ws, g).as_text()
    assert text.count("accumulation_type = f32") == text.count("stablehlo.dot_general")


@pytest.mark.parametrize("op", [AG, RS])
def test_bad_precision_is_a_value_error_naming_it(op):
    mesh, xs, ws, _, _ = _problem(op)
    for bad in ("fast", 3, ("highest",), ("highest", "F32_F32_F32"), "HIGH"):
        for impl in ("xla", "fused", "auto"):
            with pytest.raises(ValueError, match=rf"{op}: precision must be None, a "
                                                 rf"lax.Precision .*got {re.escape(repr(bad))}"):
                testing.sharded.__wrapped__(op, mesh, impl, precision=bad)(xs, ws)


def test_fused_refuses_presets_it_does_not_run(kernel_precisions):
    mesh, xs, ws, _, _ = _problem(RS)
    # float32 operands in bfloat16 passes; bfloat16 accumulation.
    with pytest.raises(ValueError, match=r"matmul_reduce_scatter\(impl='fused'\): precision "
                                         r"BF16_BF16_F32 is not what the fused kernels run: "
                                         r"they multiply float32 operands .*impl='xla'"):
        testing.sharded.__wrapped__(RS, mesh, "fused", precision=PRESET.BF16_BF16_F32)(xs, ws)
    mesh, xs, ws, _, _ = _problem(AG, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"precision BF16_BF16_BF16 .* bfloat16 operands into "
                                         r"float32 accumulators"):
        testing.sharded.__wrapped__(AG, mesh, "fused", precision="BF16_BF16_BF16")(xs, ws)
    assert kernel_precisions == []  # refused before a kernel was traced


def test_a_custom_dot_algorithm_goes_to_xla_and_is_refused_by_fused(kernel_precisions):
    # XLA's CPU dot runs no custom algorithm: the program is checked, not run.
    mesh, xs, ws, g, _ = _problem(AG)
    algorithm = lax.DotAlgorithm(lhs_precision_type=jnp.float32, rhs_precision_type=jnp.float32,
                                 accumulation_type=jnp.float32)
    for impl in ("xla", "ring"):
        fn = testing.sharded.__wrapped__(AG, mesh, impl, grad=True, precision=algorithm)
        dots = list(equations(jax.make_jaxpr(fn)(xs, ws, g).jaxpr, ("dot_general",)))
        assert len(dots) >= 3 and all(e.params["precision"] == algorithm for e in dots), impl
    with pytest.raises(ValueError, match=r"all_gather_matmul\(impl='fused'\): precision "
                                         r"DotAlgorithm\(.*\) is a custom algorithm; .*presets"):
        testing.sharded.__wrapped__(AG, mesh, "fused", precision=algorithm)(xs, ws)
    assert kernel_precisions == []
    key = autotune.key(AG, "NVIDIA H200", 8, 32, 16, jnp.float32, 8, precision=algorithm)
    assert key.endswith("|f32=algorithm(float32,float32,float32,1,1,1,False)")


def test_layers_take_it_as_nnx_linear_does(kernel_precisions):
    mesh = mesh_of(8)
    x = x_of()
    col, row = pair(mesh, "xla", precision="highest")
    text = jax.jit(lambda x: row(col(x)[..., 0])).lower(x).as_text()
    assert set(re.findall(r"precision = \[([A-Z, ]*)\]", text)) == {"HIGHEST, HIGHEST"}
    col, row = pair(mesh, "fused", precision="highest")
    jax.jit(lambda x: row(col(x)[..., 0]))(x)
    assert kernel_precisions == [("ag_gemm", "ieee"), ("gemm_rs", "ieee")]
    with pytest.raises(ValueError, match=r"ColumnParallelLinear: precision must be"):
        pair(mesh, "xla", precision="exact")

    # Replicated (decode) activations: the local matmul takes it too.
    col, _ = pair(mesh, "xla", precision="highest")
    text = jax.jit(lambda x: col(x, sequence_parallel=False)).lower(x).as_text()
    assert set(re.findall(r"precision = \[([A-Z, ]*)\]", text)) == {"HIGHEST, HIGHEST"}


def test_tuning_keys_and_tolerances_follow_float32_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    kind = "NVIDIA H200"
    plain = autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8)
    assert autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8, precision="highest") == \
        plain + "|f32=ieee"
    assert autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8,
                        precision=PRESET.TF32_TF32_F32_X3).endswith("|f32=tf32x3")
    assert autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8, precision="high") == plain
    assert autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8,
                        precision=PRESET.BF16_BF16_F32).endswith("|f32=BF16_BF16_F32")
    bf16 = autotune.key(AG, kind, 8, 32, 16, jnp.bfloat16, 8)
    assert autotune.key(AG, kind, 8, 32, 16, jnp.bfloat16, 8, precision="highest") == bf16
    with jax.default_matmul_precision("highest"):
        assert autotune.key(AG, kind, 8, 32, 16, jnp.float32, 8) == plain + "|f32=ieee"

    # A config tuned at tensorfloat32 is not taken for exact float32.
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16)
    autotune.record(AG, plain, cfg, 1.0, baselines_ms={"xla": 2.0})
    assert autotune.lookup(AG, kind, 8, 32, 16, jnp.float32, 8) == cfg
    assert autotune.lookup(AG, kind, 8, 32, 16, jnp.float32, 8, precision="highest") is None
    assert autotune.explain(AG, kind, 8, 32, 16, jnp.float32, 8, precision="highest")["auto"] \
        == "xla"

    # Records from before precision was the ops' argument held it in the config.
    data = {plain: {"op": AG, "config": dict(vars(cfg), f32_precision="tf32"),
                    "median_ms": 1.0}}
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(data))
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(legacy))
    assert autotune.lookup(AG, kind, 8, 32, 16, jnp.float32, 8) == cfg

    # Checking a float32 result: tensorfloat32 on a GPU unless HIGHEST.
    assert testing.tolerance(jnp.float32, platform="gpu") == testing.TF32_TOLERANCE
    assert testing.tolerance(jnp.float32, precision="highest", platform="gpu") == 1e-5
    assert testing.tolerance(jnp.float32, platform="cpu") == 1e-5
    assert testing.tolerance(jnp.bfloat16, platform="gpu") == 2e-2
    assert testing.tolerance(jnp.bfloat16, jnp.float32, platform="gpu") == 2e-2  # the wider
    assert testing.tolerance(jnp.float32, jnp.bfloat16, platform="gpu") == 1e-5
    assert testing.tolerance(jnp.float32, precision=PRESET.BF16_BF16_F32, platform="gpu") == 2e-2

    # Tuning at a precision the fused kernels refuse: the baselines are timed
    # and recorded under that precision's key, no fused config.
    best, rows = autotune.tune(AG, mesh_of(8), 4, 16, 8, jnp.float32, reps=1,
                               precision=PRESET.BF16_BF16_F32, log=lambda s: None)
    assert best is None and rows == []
    entry = autotune.cached_entry(autotune.key(AG, "cpu", 4, 16, 8, jnp.float32, 8,
                                               precision=PRESET.BF16_BF16_F32))
    assert entry["config"] is None and {"xla_ms", "ring_ms"} <= set(entry), entry


def test_model_matmul_precision_reaches_every_matmul():
    cfg = dataclasses.replace(CFG, matmul_precision="highest", tie_embeddings=True)
    model = Llama(cfg, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(0))
    tokens = _tokens(length=16)
    text = nnx.jit(lambda m, t: m(t)).lower(model, tokens).as_text()
    # The blocks' parallel layers, attention's two einsums and the tied head.
    assert set(re.findall(r"precision = \[([A-Z, ]*)\]", text)) == {"HIGHEST, HIGHEST"}
    assert text.count("stablehlo.dot_general") >= 4 * cfg.layers + 1
    with pytest.raises(ValueError, match=r"matmul_precision must be None, 'default', 'high' or "
                                         r"'highest', got 'exact'"):
        dataclasses.replace(CFG, matmul_precision="exact")


@pytest.mark.parametrize("cls", [AllGatherMatmulConfig, MatmulReduceScatterConfig])
def test_gpu_heuristic_and_search_space_keep_wide_float32_in_registers(cls):
    # Compiled for sm_90, a 128x128 tile of 4 warps spills into the K loop at
    # exact float32 (FMAs) and at tf32x3 (tests/test_kernels_compile.py).
    op = AG if cls is AllGatherMatmulConfig else RS
    kw = dict(interpreting=False, sms=132, itemsize=4)
    plain = cls.default(1024, 12288, 6144, 8, **kw)
    exact = cls.default(1024, 12288, 6144, 8, **kw, input_precision="ieee")
    x3 = cls.default(1024, 12288, 6144, 8, **kw, input_precision="tf32x3")
    assert (plain.block_k, exact.block_k, x3.block_k) == (64, 32, 64)
    assert (exact.num_warps, x3.num_warps) == (8, 8)
    assert plain.num_warps == (4 if cls is AllGatherMatmulConfig else 8)
    assert cls.default(1024, 12288, 6144, 8, **dict(kw, itemsize=2), input_precision="ieee") == \
        cls.default(1024, 12288, 6144, 8, **dict(kw, itemsize=2))  # 16-bit: no change
    for precision, k_tiles in (("highest", {16, 32}), (PRESET.TF32_TF32_F32_X3, {32, 64, 128})):
        space = autotune.candidates(op, 1024, 12288, 6144, jnp.float32, 8, precision=precision)
        assert space[0] == (exact if precision == "highest" else x3)  # the heuristic's first
        assert {c.block_k for c in space} == k_tiles
        assert all(c.block_m * c.block_n <= 64 * 32 * c.num_warps for c in space)
    assert autotune.candidates(op, 1024, 12288, 6144, jnp.float32, 8,
                               precision=PRESET.BF16_BF16_F32) == []
    space = autotune.candidates(op, 1024, 12288, 6144, jnp.float32, 8)
    assert space[0] == plain and max(c.block_m * c.block_n // (32 * c.num_warps)
                                     for c in space) == 128
