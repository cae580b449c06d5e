"""The GPU workspace code path on CPU: custom_calls.cuda_driver over a fake libcuda.

``tests/fake_cuda/fake_libcuda.c`` is compiled against the real cuda.h (so
its functions have the real prototypes and exported names) and keeps
"device" memory in host shared memory. That checks what can be checked
without a GPU: the ctypes marshalling of every workspace call, context
push/pop, zeroing (the fake hands out non-zero memory), peer access, error
names; and the fused ops running with their workspace in ``cuda`` memory,
read and written by the interpreted kernels; the one-GPU rank emulation's
compiles, loads and launches (recorded by the fake, parameter by parameter).
The IPC exchange across processes, and the link check that asks NVML
(tests/fake_cuda/fake_libnvml.c) about GPUs in other processes, are in
test_multiprocess.py. What it cannot
check: real device memory, real peer access, kernels on a GPU
(tests/test_gpu_fused.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flux
from custom_calls import cuda_driver
from jax_flux import autotune, testing, workspace
from tests.helpers import build_fake_libcuda, fused_fn, mesh_of


def test_driver_memory_calls(fake_driver):
    ptr = cuda_driver.allocate(3, 4096)
    host = np.empty(4096, np.uint8)
    cuda_driver.to_host(3, ptr, host)
    assert not host.any(), "allocate must hand out zeroed memory"
    data = np.arange(1024, dtype=np.float32)
    cuda_driver.to_device(3, ptr, data)
    back = np.empty_like(data)
    cuda_driver.to_host(3, ptr, back)
    assert np.array_equal(back, data)
    cuda_driver.fill(3, ptr, 16, 0xFF)
    cuda_driver.to_host(3, ptr, back)
    assert np.isnan(back[:4]).all() and np.array_equal(back[4:], data[4:])
    assert cuda_driver.multiprocessor_count(0) == 132


def test_driver_peer_access_and_errors(fake_driver):
    cuda_driver.enable_peer_access([0, 1, 2])
    cuda_driver.enable_peer_access([2, 1, 0])  # already enabled: not an error
    with pytest.raises(cuda_driver.CudaError, match="cuDeviceGet\\(99\\) failed: "
                                                    "CUDA_ERROR_INVALID_DEVICE"):
        cuda_driver.allocate(99, 256)
    ptr = cuda_driver.allocate(0, 256)
    handle = cuda_driver.export_handle(0, ptr)
    assert len(handle) == 64 and b"\0" in handle
    with pytest.raises(cuda_driver.CudaError, match="cuIpcOpenMemHandle"):
        cuda_driver.open_handle(1, handle)  # a process cannot open its own handle


def test_driver_names_gpus_by_pci_bus_id(fake_driver):
    # What processes that each see only their own GPUs tell each other.
    ids = [cuda_driver.bus_id(o) for o in range(8)]
    assert ids[:2] == ["0000:10:00.0", "0000:11:00.0"] and len(set(ids)) == 8
    assert [cuda_driver.ordinal_of_bus(b) for b in ids] == list(range(8))
    assert cuda_driver.ordinal_of_bus("0000:7F:00.0") is None  # a GPU this process is not shown


@pytest.mark.parametrize("atomics", ["1", "0"])
def test_nvml_link_status(tmp_path, monkeypatch, atomics):
    from custom_calls import nvml
    from tests.helpers import build_fake_libnvml

    monkeypatch.setenv("JAX_FLUX_LIBNVML", build_fake_libnvml(tmp_path))
    monkeypatch.setenv("FAKE_NVML_GPUS", "4")
    monkeypatch.setenv("FAKE_NVML_P2P_ATOMICS", atomics)
    nvml.lib.cache_clear()
    nvml._device.cache_clear()
    try:
        assert nvml.link("0000:10:00.0", "0000:13:00.0") == {
            "access": True, "native_atomics": atomics == "1"}
        with pytest.raises(nvml.NvmlError, match=r"nvmlDeviceGetHandleByPciBusId\('0000:14:00.0'"
                                                 r"\) failed: Not Found"):
            nvml.link("0000:10:00.0", "0000:14:00.0")
        monkeypatch.setenv("JAX_FLUX_LIBNVML", str(tmp_path / "absent.so"))
        nvml.lib.cache_clear()
        with pytest.raises(nvml.NvmlError, match="absent.so.* is not loadable here"):
            nvml.link("0000:10:00.0", "0000:11:00.0")
    finally:
        nvml.lib.cache_clear()
        nvml._device.cache_clear()


def test_missing_driver_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("JAX_FLUX_LIBCUDA", "/nonexistent/libcuda.so.1")
    cuda_driver.lib.cache_clear()
    try:
        with pytest.raises(cuda_driver.CudaError, match="needs the CUDA driver"):
            cuda_driver.allocate(0, 256)
    finally:
        cuda_driver.lib.cache_clear()


@pytest.mark.parametrize("op", list(testing.OPS))
def test_fused_ops_with_the_workspace_in_cuda_memory(fake_driver, op, monkeypatch):
    host_location = workspace._location
    monkeypatch.setattr(workspace, "_location",
                        lambda platform, slots: {"host": "cuda"}[host_location(platform, slots)])
    mesh = mesh_of(8)
    f = fused_fn(op, mesh)  # a fresh program: lowered (and its workspace resolved) here
    for call in range(3):
        x, w, x64, w64 = testing.random_operands(8 * 5, 24, 16, jnp.float32, seed=call)
        out = f(*testing.place(op, mesh, x, w))
        assert testing.relative_error(out, x64 @ w64) < 1e-5
    live = [ws for ws in workspace.info() if ws["location"] == "cuda" and not ws["retired"]]
    assert live and live[0]["world"] == 8 and live[0]["owned_bytes"] == 8 * live[0]["bytes_per_rank"]
    workspace.reset()  # cuMemsetD8 on every owned buffer
    x, w, x64, w64 = testing.random_operands(8 * 5, 24, 16, jnp.float32, seed=9)
    out = f(*testing.place(op, mesh, x, w))
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    del f
    jax.clear_caches()  # programs compiled here hold fake-driver addresses


@pytest.mark.parametrize("atomics,match", [
    ("0", r"peer access without native atomics \(PCIe, not NVLink\) between GPUs \[\(0, 1\), "),
    (None, r"no peer access between GPUs \[\(0, 1\), \(0, 2\)")])
def test_gpus_linked_without_native_atomics_are_refused_when_lowered(fake_driver, monkeypatch,
                                                                    tmp_path, atomics, match):
    # Over PCIe P2P the kernels' atomics on a peer's memory are a read then a
    # write, which can undo a peer's epoch: refused before anything is allocated.
    from jax_flux import _cuda_workspace

    monkeypatch.setattr(_cuda_workspace, "_links_checked", set())  # earlier tests passed it
    host_location = workspace._location
    monkeypatch.setattr(workspace, "_location",
                        lambda platform, slots: {"host": "cuda"}[host_location(platform, slots)])
    if atomics is None:  # GPU 0 sees no peer at all
        real = cuda_driver.p2p_attributes
        monkeypatch.setattr(cuda_driver, "p2p_attributes", lambda a, b: dict(
            real(a, b), access=0) if a == 0 else real(a, b))
    else:
        monkeypatch.setenv("FAKE_CUDA_P2P_ATOMICS", atomics)  # read by cuInit
        cuda_driver.lib.cache_clear()
    before = len(workspace.info())
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * 5, 24, 16, jnp.float32, seed=0)
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    try:
        for op in testing.OPS:
            with pytest.raises(ValueError, match=match) as e:
                fused_fn(op, mesh)(*testing.place(op, mesh, x, w))
            assert f"{op}(impl='fused') over axis 'tp'" in str(e.value)
            assert "impl='xla' or 'ring'" in str(e.value)
            # impl="auto" where fused was measured fastest: the faster of the
            # rest (xla here), with the refusal in a warning.
            dims = (5, 24, 2) if op == autotune.AG else (5, 3, 16)
            autotune.record(op, autotune.key(op, jax.devices()[0].device_kind, *dims,
                                             jnp.float32, 8),
                            autotune.CONFIG_CLASSES[op](block_m=16, block_n=16, block_k=16),
                            0.5, baselines_ms={"xla": 1.0, "ring": 2.0})
            with pytest.warns(UserWarning, match=rf"{op}\(impl='auto'\).* runs impl='xla' "
                                                 rf".*{match}"):
                out = testing.sharded.__wrapped__(op, mesh)(*testing.place(op, mesh, x, w))
            np.testing.assert_allclose(out, x64 @ w64, rtol=1e-5, atol=1e-5)
        assert len(workspace.info()) == before  # nothing allocated
        assert not _cuda_workspace._links_checked  # nothing passed the check
    finally:
        monkeypatch.delenv("FAKE_CUDA_P2P_ATOMICS", raising=False)
        cuda_driver.lib.cache_clear()
        jax.clear_caches()


def test_error_records_in_pinned_host_memory(fake_driver, monkeypatch):
    # On GPUs each rank's error record is cuMemHostAlloc'd (mapped, portable):
    # the kernels write it through its device address, the watchdog reads it on
    # the host with no CUDA call. The fake hands out non-zero host memory.
    import ctypes

    from jax_flux import errors
    from tests.test_errors import _operands, _skipping

    host_location = workspace._location
    monkeypatch.setattr(workspace, "_location",
                        lambda platform, slots: {"host": "cuda"}[host_location(platform, slots)])
    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    lib = ctypes.CDLL(fake_driver)
    mesh = mesh_of(8)
    _, _, (xs, ws) = _operands("all_gather_matmul", mesh)
    try:
        f = _skipping("all_gather_matmul", mesh)
        jax.block_until_ready(f(xs, ws))  # async: the program itself does not raise
        cuda_records = [r for w, r in workspace.records() if w.location == "cuda"]
        assert cuda_records and len(cuda_records) <= lib.fakeCudaHostAllocCount()
        failed = [r for r in cuda_records if r.words()[0] != 0]
        assert len(failed) == 7  # every rank but the one that skipped
        with pytest.raises(jax_flux.PeerTimeoutError, match=r"waiting for row chunk 0 of rank 3"):
            errors.check()
    finally:
        errors.watchdog.stop()
        workspace.reset()
        errors.check()
        del f
        jax.clear_caches()


def test_rank_emulation_launches_over_the_fake_driver(tmp_path):
    # The 8-ranks-on-one-GPU harness, up to the launch: real sm_90 compiles
    # (Triton in compiled mode, so a subprocess), loads and launches recorded
    # by the fake and checked parameter by parameter.
    import os
    import subprocess
    import sys

    lib = build_fake_libcuda(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # TRITON_CACHE_DIR empty, as importing jax-triton leaves it (the GPU tests
    # import it before they compile the emulation's kernels): Triton's default
    # under TRITON_HOME is used then.
    env.update(JAX_FLUX_LIBCUDA=lib, TRITON_INTERPRET="0", PYTHONPATH=root,
               TRITON_CACHE_DIR="", TRITON_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "tests.fake_cuda.emulation_check"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]
