"""Shared test helpers: meshes over subsets of the 8 CPU devices, the lax reference in shard_map,
an output and its gradients in the same harness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_flux import ag_gemm, gemm_rs, testing


@functools.lru_cache(maxsize=None)
def mesh_of(size: int):
    return testing.mesh(jax.devices()[:size])


@functools.lru_cache(maxsize=None)
def lax_reference(op_name: str, mesh, grad: bool = False, out_dtype=None):
    """The same global view as testing.sharded, through the plain lax collectives
    (no custom_vjp): what the ops and their gradients must match."""
    in_specs, out_spec = testing._SPECS[op_name]
    ref = {"all_gather_matmul": ag_gemm.reference,
           "matmul_reduce_scatter": gemm_rs.reference}[op_name]
    fn = jax.shard_map(lambda x, w: ref(x, w, "tp", out_dtype=out_dtype), mesh=mesh,
                       in_specs=in_specs, out_specs=out_spec)
    if not grad:
        return jax.jit(fn)

    def with_grad(x, w, g):
        out, vjp = jax.vjp(fn, x, w)
        return (out, *vjp(g))

    return jax.jit(with_grad)


def cotangent(shape, dtype, seed=1):
    g64 = np.random.default_rng(seed).standard_normal(shape)
    g = jax.numpy.asarray(g64, dtype)
    return g, np.asarray(g, np.float64)


def scaled_calls(op_name: str, mesh, config, calls: int):
    """Jitted global-view f(x, w) -> (op(x, w), op(2x, w), ...): ``calls`` fused
    calls back to back in one program, no host sync between them, each with its
    own result (a call that reads another's data shows)."""
    in_specs, out_spec = testing._SPECS[op_name]
    op = testing.OPS[op_name]

    def body(x, w):
        return tuple(op(x * (c + 1), w, "tp", impl="fused", config=config) for c in range(calls))

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                                 out_specs=(out_spec,) * calls))


def fused_fn(op_name: str, mesh, config=None, **kw):
    """Jitted global-view fused op (no caching: configs vary per test)."""
    from jax_flux import testing as t

    in_specs, out_spec = t._SPECS[op_name]
    op = t.OPS[op_name]
    return jax.jit(jax.shard_map(lambda x, w: op(x, w, "tp", impl="fused", config=config, **kw),
                                 mesh=mesh, in_specs=in_specs, out_specs=out_spec))


def expect_timeout_then_recover(f, x, w, op_name: str, mesh, match: str):
    """f(x, w) must fail with a peer-timeout message matching ``match``; after
    ``workspace.reset()`` the fused op must work again on the same mesh."""
    import pytest

    from jax_flux import testing as t
    from jax_flux import workspace

    try:
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(f(x, w))
    finally:
        workspace.reset()
    xs, ws = t.place(op_name, mesh, x, w)
    out = t.sharded(op_name, mesh, "fused")(xs, ws)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert t.relative_error(out, ref) < 1e-5


def build_fake_libcuda(out_dir) -> str:
    """Compiles tests/fake_cuda/fake_libcuda.c against the real cuda.h; skips the
    calling test when there is no C compiler or no cuda.h on this host."""
    import glob
    import os

    import pytest

    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/usr"]
    include = next((os.path.join(r, "include") for r in roots
                    if r and os.path.exists(os.path.join(r, "include", "cuda.h"))), None)
    if include is None:
        pytest.skip("the fake CUDA driver needs cuda.h")
    return _build_fake("fake_libcuda.c", "libcuda_fake.so", out_dir, "-I", include)


def build_fake_libnvml(out_dir) -> str:
    """Compiles tests/fake_cuda/fake_libnvml.c; skips the calling test without a C compiler."""
    return _build_fake("fake_libnvml.c", "libnvml_fake.so", out_dir)


def _build_fake(source: str, name: str, out_dir, *flags: str) -> str:
    import os
    import shutil
    import subprocess

    import pytest

    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip(f"tests/fake_cuda/{source} needs a C compiler")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cuda", source)
    out = os.path.join(str(out_dir), name)
    subprocess.run([gcc, "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", *flags,
                    src, "-o", out], check=True, capture_output=True, text=True)
    return out


def equations(jaxpr, names):
    """Equations of primitives ``names`` in ``jaxpr`` and every jaxpr nested in its
    params (each time it is used)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner, names)


def count_equations(jaxpr, names) -> int:
    """How many ``equations(jaxpr, names)`` there are."""
    return sum(1 for _ in equations(jaxpr, names))


def ag_with_gathered(mesh, cfg):
    """The fused AG-GEMM returning (y, every rank's gathered x stacked [P, P*m, K])."""
    def body(x, w):
        y, xg = ag_gemm.fused(x, w, "tp", mesh.shape["tp"], cfg, return_gathered=True)
        return y, xg[None]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P(None, "tp")),
                                 out_specs=(P(None, "tp"), P("tp"))))


def count_peer_idle_asks(monkeypatch) -> list:
    """Counts, in ``[0]``, the kernels' calls of ``signals.wait_peer_idle`` (a round
    trip to a peer's memory on a GPU) from here on, over every rank's programs."""
    import threading

    from custom_calls import signals

    count, lock, real = [0], threading.Lock(), signals.wait_peer_idle

    def counting(*args):
        with lock:
            count[0] += 1
        return real(*args)

    monkeypatch.setattr(signals, "wait_peer_idle", counting)
    return count


def out_and_grads(fn, mesh, in_specs, out_spec, x, w, seed=4):
    """(out, dx, dw) of the global view of ``fn`` over ``mesh``, the gradients for
    a random cotangent (a permutation of the output's rows would show)."""
    f = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec)
    shape = jax.eval_shape(f, x, w)
    g = jnp.asarray(np.random.default_rng(seed).standard_normal(shape.shape), shape.dtype)

    def run(x, w):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(g))

    return jax.jit(run)(x, w)


def assert_close(got, want, tol=1e-5):
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert testing.relative_error(a, np.asarray(b, np.float64)) < tol
