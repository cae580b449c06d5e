"""Test setup: 8 emulated CPU devices and Triton's interpreter, unless asked for the GPU.

Set ``JAX_FLUX_TEST_PLATFORM=gpu`` to run on the local GPUs (the ``gpu``
tests need it); by default JAX is pinned to the CPU so the suite means the
same thing on every host. All of this must happen before jax is imported.
"""

import os
import shutil
import tempfile

ON_GPU = os.environ.get("JAX_FLUX_TEST_PLATFORM", "cpu") == "gpu"
if not ON_GPU:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TRITON_INTERPRET", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# On the CPU, XLA's LLVM passes are most of the suite's compile time (the tiny
# model's benchmark: 15 s -> 11 s without them) and buy nothing for test-sized
# arrays; HLO passes (fusion, layouts), and so the programs tests inspect, are
# the same. GPU runs keep XLA's default.
if not ON_GPU and "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

# A fused call that fails raises from the program (the GPU default would only
# report it through the watchdog), and a watchdog a test starts never ends the
# test process; tests of the asynchronous mode set these themselves.
os.environ.setdefault("JAX_FLUX_STATUS_CHECK", "sync")
os.environ.setdefault("JAX_FLUX_ON_PEER_TIMEOUT", "log")

# Tests never read or write the user's autotuning cache. A pytest process (each
# pytest-xdist worker too) makes its own folder for it and removes it when its session
# ends (pytest_unconfigure; xdist workers end without running atexit handlers); a
# subprocess a test starts (which may end by os._exit) uses its parent's.
_inherited = os.path.dirname(os.environ.get("JAX_FLUX_AUTOTUNE_CACHE", ""))
if os.path.basename(_inherited).startswith("jax_flux_tests_") and os.path.isdir(_inherited):
    _cache_dir = None
else:
    _cache_dir = tempfile.mkdtemp(prefix="jax_flux_tests_")
    os.environ["JAX_FLUX_AUTOTUNE_CACHE"] = os.path.join(_cache_dir, "autotune.json")

import jax  # noqa: E402
import pytest  # noqa: E402


def gpu_missing() -> str | None:
    """Why the GPU tests cannot run here (None: JAX's default backend is a CUDA GPU
    and jax-triton imports)."""
    try:
        platforms = sorted({d.platform for d in jax.devices()})
    except RuntimeError as e:
        return f"JAX has no devices: {e}"
    if "gpu" not in platforms:
        return f"JAX sees no GPU (platforms: {', '.join(platforms)})"
    try:
        import jax_triton  # noqa: F401
    except Exception as e:
        return f"jax_triton does not import ({type(e).__name__}: {e})"
    return None


def gpu_available() -> bool:
    """True when JAX's default backend is a CUDA GPU and jax-triton imports."""
    return gpu_missing() is None


def pytest_unconfigure(config):
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)


# The files that take longest, longest first (seconds on a 2-core host, one
# worker: test_fused_gemm_rs ~100, test_benchmarks ~100, test_fused_ag_gemm ~85,
# test_models ~75, test_model_layouts ~50, test_kernels_compile ~40 in one
# test). pytest-xdist's --dist loadfile hands files to the first free worker in
# collection order, and by default puts the files with most tests first, which
# left test_kernels_compile (2 tests) for the end: its one test ran alone on one
# worker while the other sat idle. Longest first keeps both busy to the end.
# A file missing here only costs balance, never a result.
_LONGEST_FIRST = ("test_fused_gemm_rs.py", "test_benchmarks.py", "test_fused_ag_gemm.py",
                  "test_models.py", "test_model_layouts.py", "test_kernels_compile.py",
                  "test_ops.py", "test_multiprocess.py", "test_ops_dtypes.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7: keep our order
        config.option.loadscopereorder = False


def _longest_first(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    # A stable sort: each file's tests keep their order, the other files theirs.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    missing = gpu_missing()
    if missing is None:
        return
    if ON_GPU and any("gpu" in item.keywords for item in items):
        # Asked for the GPU (JAX_FLUX_TEST_PLATFORM=gpu): a skip would pass silently.
        raise pytest.UsageError(f"JAX_FLUX_TEST_PLATFORM=gpu, but the GPU tests cannot run: "
                                f"{missing}")
    skip = pytest.mark.skip(reason="needs a CUDA GPU with jax-triton "
                                   "(run with JAX_FLUX_TEST_PLATFORM=gpu on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if not ON_GPU:
        assert len(jax.devices()) == 8, "jax was imported before tests/conftest.py set XLA_FLAGS"


@pytest.fixture(scope="module")
def single_device():
    """The one-device model after one AdamW step (tests.model_helpers), once a module."""
    from tests.model_helpers import single_device_step

    return single_device_step()


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    """custom_calls.cuda_driver over tests/fake_cuda's libcuda for one module's tests."""
    from custom_calls import cuda_driver
    from jax_flux import workspace
    from tests.helpers import build_fake_libcuda

    lib = build_fake_libcuda(tmp_path_factory.mktemp("fake_cuda"))
    mp = pytest.MonkeyPatch()
    mp.setenv("JAX_FLUX_LIBCUDA", lib)
    cuda_driver.lib.cache_clear()
    cuda_driver.context.cache_clear()
    yield lib
    mp.undo()
    cuda_driver.lib.cache_clear()
    cuda_driver.context.cache_clear()
    # Forget the workspaces in fake memory: later workspace.reset() calls
    # must not reach for a driver that is gone.
    with workspace._lock:
        for key in [k for k, ws in workspace._live.items() if ws.location.startswith("cuda")]:
            del workspace._live[key]
        workspace._retired[:] = [ws for ws in workspace._retired
                                 if not ws.location.startswith("cuda")]
