"""GPU tests (marked ``gpu``): the kernels compiled through jax-triton, world size 1.

Run on a GPU host with ``JAX_FLUX_TEST_PLATFORM=gpu pytest -m gpu``. Without
a GPU they are skipped; the skip itself is tested here.
"""

import jax
import jax.numpy as jnp
import pytest

from jax_flux import testing
from tests import conftest


def test_gpu_marker_skips_exactly_when_no_gpu(request):
    gpu_items = [i for i in request.session.items if "gpu" in i.keywords]
    assert gpu_items, "the gpu tests should be collected"
    for item in gpu_items:
        skipped = any(m.name == "skip" for m in item.iter_markers())
        assert skipped == (not conftest.gpu_available()), item.nodeid


def test_gpu_available_follows_the_devices(monkeypatch):
    class Dev:
        def __init__(self, platform):
            self.platform = platform

    monkeypatch.setattr(jax, "devices", lambda *a: [Dev("cpu")] * 8)
    assert not conftest.gpu_available()
    monkeypatch.setattr(jax, "devices", lambda *a: [Dev("gpu")])
    try:
        import jax_triton  # noqa: F401
        has_jax_triton = True
    except Exception:
        has_jax_triton = False
    assert conftest.gpu_available() == has_jax_triton


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(512, 256, 384), (333, 200, 129)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_through_jax_triton(shape, dtype):
    from custom_calls.gemm import matmul

    a, b, a64, b64 = testing.random_operands(*shape, dtype)
    precision = "ieee" if dtype == jnp.float32 else "tf32"
    c = jax.jit(lambda a, b: matmul(a, b, input_precision=precision))(a, b)
    assert testing.relative_error(c, a64 @ b64) < testing.TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["xla", "ring", "auto"])
@pytest.mark.parametrize("op", list(testing.OPS))
def test_ops_world_size_1(op, impl):
    mesh = testing.mesh(jax.devices()[:1])
    x, w, x64, w64 = testing.random_operands(256, 128, 192, jnp.bfloat16)
    xs, ws = testing.place(op, mesh, x, w)
    out = testing.sharded(op, mesh, impl)(xs, ws)
    assert testing.relative_error(out, x64 @ w64) < 2e-2


def test_asking_for_the_gpu_where_it_cannot_run_is_an_error_not_a_skip():
    # JAX_FLUX_TEST_PLATFORM=gpu on a host where JAX sees no GPU (or jax-triton is
    # missing): the GPU tests would all be skipped and pytest would pass; it refuses.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_FLUX_TEST_PLATFORM="gpu", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                        "gpu", "tests/test_gpu.py"], cwd=root, env=env, capture_output=True,
                       text=True)
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout[-2000:] + r.stderr[-2000:]
    assert "the GPU tests cannot run: JAX sees no GPU" in r.stdout + r.stderr
