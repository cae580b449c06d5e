"""GPU tests over every local GPU (marked ``gpu``; skipped with fewer than two).

What a user of a multi-GPU NVLink host runs: the fused ops on a mesh of all
local GPUs through jax-triton, their workspace in ``cuda`` memory (one
allocation per GPU, peer access between them): ragged shapes in the three
dtypes with fresh data on every call, the gradients against the lax
collectives in the same ``shard_map``, the tensor-parallel MLP bitwise
repeatable, and the model's training step against impl="xla" (tp over every
GPU; dp=2 x tp, plain and FSDP); and one process per GPU (``jax.distributed``,
the ``cuda-ipc`` workspace).

    JAX_FLUX_TEST_PLATFORM=gpu python -m pytest -q -m gpu tests/test_gpu_multi.py

A lent machine has one GPU: these skip there (its tests emulate 8 ranks on it,
tests/test_gpu_fused.py). CI checks the same on 8 emulated CPU devices through
the interpreter (tests/test_fused_*.py, tests/test_ops.py, tests/test_models.py).
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import testing, workspace
from tests.helpers import cotangent, lax_reference



def _links_without_native_atomics() -> list:
    """Pairs of local GPUs whose link has no native atomics (PCIe P2P), which
    impl="fused" refuses (jax_flux._cuda_workspace.check_links)."""
    if jax.devices()[0].platform != "gpu":
        return []
    from custom_calls import cuda_driver

    return cuda_driver.weak_links(d.local_hardware_id for d in jax.devices())[1]


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(len(jax.devices()) < 2,
                                 reason=f"needs 2 or more local GPUs ({len(jax.devices())} here)"),
              pytest.mark.skipif(bool(_links_without_native_atomics()),
                                 reason="GPUs linked without native atomics (PCIe, not NVLink), "
                                        "which impl='fused' refuses")]

_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
# float32 operands go through tf32 tensor cores (the ops' default precision, as
# XLA's dot).
_TOL = {"float32": 1e-3, "float16": 2e-3, "bfloat16": 2e-2}


def _mesh():
    return testing.mesh(jax.devices())


def _location() -> str:
    return "cuda" if jax.devices()[0].platform == "gpu" else "host"


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_ops_over_every_local_gpu(op, dtype):
    # 333 rows a rank (no multiple of a tile), K and the per-rank k ragged
    # against BLOCK_K, 129 columns a rank; fresh data every call: a stale
    # workspace shows.
    mesh = _mesh()
    p = mesh.size
    f = testing.sharded(op, mesh, "fused")
    for call in range(20):
        x, w, x64, w64 = testing.random_operands(333 * p, 25 * p, 129 * p, dtype, seed=call)
        out = f(*testing.place(op, mesh, x, w))
        assert testing.relative_error(out, x64 @ w64) < _TOL[jnp.dtype(dtype).name], call
    spaces = [ws for ws in workspace.info() if not ws["retired"] and ws["world"] == p]
    assert spaces and all(ws["location"] == _location() for ws in spaces), spaces
    text = f.lower(*testing.place(op, mesh, x, w)).as_text()
    for name in ("all_gather", "reduce_scatter", "all_reduce"):
        assert f"stablehlo.{name}" not in text, name


@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_gradients_over_every_local_gpu(op):
    mesh = _mesh()
    p = mesh.size
    m, k, n = 64 * p, 48 * p, 40 * p
    x, w, x64, w64 = testing.random_operands(m, k, n, jnp.bfloat16, seed=3)
    g, g64 = cotangent((m, n), jnp.bfloat16)
    xs, ws = testing.place(op, mesh, x, w)
    out, dx, dw = testing.sharded(op, mesh, "fused", grad=True)(xs, ws, g)
    ref = lax_reference(op, mesh, grad=True)(xs, ws, g)
    for got, host, lax_got in zip((out, dx, dw), (x64 @ w64, g64 @ w64.T, x64.T @ g64), ref):
        assert testing.relative_error(got, host) < 2e-2
        assert testing.relative_error(got, np.asarray(lax_got, np.float64)) < 2e-2


def test_tensor_parallel_mlp_over_every_local_gpu_is_bitwise_repeatable():
    # AG-GEMM then GEMM-RS in one program (both on the same workspace), twice
    # on the same input: equal bits (no atomics in the reduction); against
    # impl="xla", and its gradient too.
    mesh = _mesh()
    p = mesh.size

    def mlp(impl):
        @jax.jit
        @partial(jax.shard_map, mesh=mesh, in_specs=(P("tp"), P(None, "tp"), P("tp")),
                 out_specs=P("tp"))
        def f(x, w1, w2):
            h = jax.nn.gelu(jax_flux.all_gather_matmul(x, w1, "tp", impl=impl))
            return jax_flux.matmul_reduce_scatter(h, w2, "tp", impl=impl)
        return f

    rng = np.random.default_rng(4)
    x, w1, w2 = (jnp.asarray(rng.standard_normal(s) * scale, jnp.bfloat16)
                 for s, scale in (((96 * p, 256), 1.0), ((256, 128 * p), 1 / 16),
                                  ((128 * p, 256), 1 / (16 * np.sqrt(p)))))
    fused, xla = mlp("fused"), mlp("xla")
    first, second = fused(x, w1, w2), fused(x, w1, w2)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert testing.relative_error(first, np.asarray(xla(x, w1, w2), np.float64)) < 2e-2

    def loss(f):
        return jax.jit(jax.grad(lambda *a: (f(*a).astype(jnp.float32) ** 2).sum(),
                                argnums=(0, 1, 2)))

    for got, want in zip(loss(fused)(x, w1, w2), loss(xla)(x, w1, w2)):
        assert testing.relative_error(got, np.asarray(want, np.float64)) < 3e-2


def test_model_training_step_over_every_local_gpu():
    # The tiny Llama split over every local GPU (whole kv groups a rank), scanned
    # and rematerialised: loss and gradients of impl="fused" against impl="xla".
    from flax import nnx

    from models import PRESETS, Llama
    from models.llama import copy_parameters, cross_entropy

    mesh = _mesh()
    cfg = dataclasses.replace(PRESETS["tiny"], layers=2, scan_layers=True,
                              remat="collective_matmuls")
    if cfg.kv_heads % mesh.size or cfg.vocab % mesh.size:
        pytest.skip(f"the tiny model does not split over {mesh.size} GPUs")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (4, 8 * mesh.size + 1)),
                         jnp.int32)
    step = nnx.jit(nnx.value_and_grad(lambda m: cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])))
    reference = Llama(cfg, mesh=mesh, impl="xla", rngs=nnx.Rngs(1))
    ref_loss, ref_grads = step(reference)
    model = Llama(cfg, mesh=mesh, impl="fused", rngs=nnx.Rngs(2))
    copy_parameters(reference, model)
    loss, grads = step(model)
    assert abs(float(loss) - float(ref_loss)) < 1e-3 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)),
                    jax.tree.leaves(nnx.to_pure_dict(ref_grads))):
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-2


@pytest.mark.parametrize("fsdp", [False, True], ids=["dp", "fsdp"])
def test_model_training_step_data_and_tensor_parallel(fsdp):
    # dp x tp over the local GPUs: XLA overlaps the data-parallel collectives
    # (the gradients' all-reduce; with FSDP the parameters' all-gathers and the
    # gradients' reduce-scatters) with the backward pass, on its collective
    # stream, where they hold SMs while the fused kernels start on the compute
    # stream. The kernels hand out the work peers wait for by ticket so that
    # cannot deadlock them (custom_calls/signals.py, take_ticket). Loss and
    # gradients against impl="xla" on the same mesh.
    from flax import nnx
    from jax.sharding import Mesh

    from models import PRESETS, Llama
    from models.llama import copy_parameters, cross_entropy

    n = len(jax.devices())
    if n < 4 or n % 2:
        pytest.skip(f"dp=2 x tp needs an even number of 4 or more GPUs ({n} here)")
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, n // 2), ("dp", "tp"))
    cfg = dataclasses.replace(PRESETS["tiny"], layers=2, scan_layers=True)
    tp = n // 2
    if cfg.kv_heads % tp or cfg.vocab % n:
        pytest.skip(f"the tiny model does not split over dp=2 x tp={tp}")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (4, 8 * tp + 1)),
                         jnp.int32)
    step = nnx.jit(nnx.value_and_grad(lambda m: cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])))
    kw = dict(mesh=mesh, batch_axis="dp", fsdp=fsdp)
    reference = Llama(cfg, impl="xla", rngs=nnx.Rngs(1), **kw)
    ref_loss, ref_grads = step(reference)
    model = Llama(cfg, impl="fused", rngs=nnx.Rngs(2), **kw)
    copy_parameters(reference, model)
    for _ in range(3):  # back to back: the same step, the same numbers
        loss, grads = step(model)
        assert abs(float(loss) - float(ref_loss)) < 1e-3 * abs(float(ref_loss))
        for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)),
                        jax.tree.leaves(nnx.to_pure_dict(ref_grads))):
            assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-2


def test_fused_ops_one_process_per_gpu():
    # jax.distributed with one process per GPU, as SLURM-style launchers start
    # jobs: the workspace's cuda-ipc path (buffers by their owners, IPC handles
    # through the key-value store), ranks alternating between processes; both
    # ops with fresh data, the gradient, a 2-D mesh, a process that skips a
    # call (a timeout in bounded time, then reset): tests/multiprocess_worker.py.
    from tests.test_multiprocess import _run_workers

    # This process already holds most of every GPU's memory (XLA preallocates):
    # the workers allocate as they go.
    _run_workers(len(jax.devices()), 1, "gpu",
                 env_extra={"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                            "CUDA_MODULE_LOADING": "EAGER"})
