"""Fused ops across processes: jax.distributed over CPU devices, the ``host-shared`` workspace.

The same exchange (each process allocates its ranks' buffers and publishes
their handles through jax.distributed's key-value store; peers map them)
serves CUDA IPC for one process per GPU. Two processes with two CPU devices
each run ``tests/multiprocess_worker.py``; ranks alternate between them.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_workers(nproc: int, local_devices: int, *extra: str, env_extra=None) -> list:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i),
                               str(nproc), str(port), str(local_devices), *extra], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(nproc)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out)
    finally:
        for p in procs:
            p.kill()
    tails = "\n".join(f"--- process {i} (rc {p.returncode}):\n" + "\n".join(log.splitlines()[-25:])
                      for i, (p, log) in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p in procs), tails
    for i, log in enumerate(logs):
        assert f"OK process {i}" in log, tails
    leaked = [n for n in os.listdir("/dev/shm")
              if any(n.startswith(f"{prefix}-{p.pid}-") for p in procs
                     for prefix in ("jax_flux", "fake_cuda"))]
    assert not leaked, leaked
    print(f"{nproc} processes: {time.monotonic() - start:.1f} s")
    return logs


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="POSIX shared memory in /dev/shm")


@linux_only
def test_fused_ops_across_two_processes():
    _run_workers(2, 2)


@linux_only
def test_fused_ops_across_processes_through_the_cuda_ipc_workspace_path(tmp_path):
    # One "GPU" per process, the workspace's cuda-ipc backend over the fake
    # driver: cuMemAlloc by the owner, 64-byte IPC handles through the
    # key-value store, cuIpcOpenMemHandle (handle by value) in the peer.
    from tests.helpers import build_fake_libcuda

    # Each process sees only its own GPU and there is no NVML: the links cannot
    # be checked, and lowering says so in a warning.
    lib = build_fake_libcuda(tmp_path)
    _run_workers(2, 1, "fake-cuda", env_extra={
        "JAX_FLUX_LIBCUDA": lib, "JAX_FLUX_LIBNVML": str(tmp_path / "no-libnvidia-ml.so.1")})


@linux_only
def test_cuda_ipc_workspace_with_several_gpus_a_process(tmp_path):
    # Two processes with two "GPUs" each, over the fake driver. The usual
    # multi-host layout (tp inside a process): peer access between a process's
    # own GPUs. tp across processes: each peer mapped once per local GPU, in
    # its context, and each rank's table row holding its own mappings. The
    # links to the other process's GPUs are asked of NVML.
    _run_workers(2, 2, "fake-cuda-several-gpus", env_extra=_fake_machine(tmp_path, 4))


@linux_only
def test_a_tp_group_across_processes_over_pcie_is_refused_when_lowered(tmp_path):
    # NVML says the links between the processes' GPUs lack native atomics.
    _run_workers(2, 2, "fake-cuda-pcie",
                 env_extra={**_fake_machine(tmp_path, 4), "FAKE_NVML_P2P_ATOMICS": "0"})


def _fake_machine(tmp_path, gpus: int) -> dict:
    """The fake driver and NVML of one machine with ``gpus`` GPUs."""
    from tests.helpers import build_fake_libcuda, build_fake_libnvml

    return {"JAX_FLUX_LIBCUDA": build_fake_libcuda(tmp_path),
            "JAX_FLUX_LIBNVML": build_fake_libnvml(tmp_path), "FAKE_NVML_GPUS": str(gpus)}


@linux_only
def test_a_tp_group_across_machines_is_refused_when_lowered():
    # Process 1 claims another machine: its handles would not open in process 0.
    _run_workers(2, 2, "two-machines")


@linux_only
def test_a_process_that_never_lowers_is_an_error_not_a_hang():
    _run_workers(2, 1, "exchange-timeout",
                 env_extra={"JAX_FLUX_WORKSPACE_EXCHANGE_TIMEOUT_S": "3"})
