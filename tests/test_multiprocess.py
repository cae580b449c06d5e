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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX shared memory in /dev/shm")
def test_fused_ops_across_two_processes():
    port, nproc = _free_port(), 2
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i),
                               str(nproc), str(port), "2"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(f"jax_flux-{procs[0].pid}-")]
    assert not leaked, leaked
    print(f"two processes: {time.monotonic() - start:.1f} s")
