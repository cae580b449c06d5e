"""One process of the multi-process fused-op check (driven by test_multiprocess.py).

    python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES [MODE]

Every process runs the same program (jax.distributed over CPU devices, Gloo
for XLA's own collectives). Ranks alternate between processes, so every
fused call moves data between processes through the ``host-shared``
workspace; each process checks its own shards against float64 on the host
and the lax collective, then prints one "OK" line.

With ``fake-cuda`` (and ``JAX_FLUX_LIBCUDA`` naming tests/fake_cuda's
library), the workspace takes its GPU path instead: ``cuda-ipc`` through
``custom_calls.cuda_driver``, handles through the key-value store; each
process sees only its own GPU and there is no NVML, so the links go
unchecked with a warning. ``fake-cuda-several-gpus``: the same with several
"GPUs" a process, the tp axis inside each process or across them, the links
across processes asked of the fake NVML. ``fake-cuda-pcie``: NVML says those
links lack native atomics; a tp axis across processes is refused.
``exchange-timeout``: one process
never lowers; the other must fail in bounded time. ``two-machines``: process
1 says it is on another machine; a tp axis inside each process still runs,
one across them is a ValueError in both. ``gpu``: the default
checks on real GPUs, LOCAL_DEVICES of them a process (NCCL for XLA's
collectives, the ``cuda-ipc`` workspace; tests/test_gpu_multi.py). The
refusal and failure modes are in tests/multiprocess_refusals.py.
"""

import os
import re
import sys
import warnings

from tests import multiprocess_refusals as refusals
from tests.multiprocess_refusals import global_array, meshes, use_gpu_workspace_path


def _setup(process_id: int, num_processes: int, port: int, local_devices: int,
           gpu: bool = False):
    """jax.distributed over CPU devices (Gloo for XLA's collectives), or with
    ``gpu`` over this process's share of the host's GPUs (NCCL)."""
    if not gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    import jax

    kw = {}
    if gpu:
        kw["local_device_ids"] = list(range(process_id * local_devices,
                                            (process_id + 1) * local_devices))
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120, **kw)
    return jax


# Relative error allowed against float64: float32 operands run exactly in the
# interpreter, through tf32 tensor cores on GPUs (precision DEFAULT, as XLA's dot).
_TOL = {"cpu": 1e-5, "gpu": 2e-3}


def _check(name, out, ref_out, ref64, tol):
    import numpy as np

    from jax_flux import testing

    for shard, ref_shard in zip(out.addressable_shards, ref_out.addressable_shards):
        err = testing.relative_error(shard.data, ref64[shard.index])
        err_lax = testing.relative_error(shard.data, np.asarray(ref_shard.data, np.float64))
        if not (err < tol and err_lax < tol):
            raise AssertionError(f"{name}: shard {shard.index} on {shard.device}: error "
                                 f"{err:.2e} vs float64, {err_lax:.2e} vs lax (tolerance {tol})")


def _peer_never_arrives(jax, mesh, process_id: int, tol: float) -> None:
    """Process 1 skips a fused call: process 0's ranks must fail within their timeout
    (not hang); after workspace.reset() everywhere, both processes run it again."""
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax.sharding import NamedSharding

    import jax_flux
    from jax_flux import AllGatherMatmulConfig, errors, testing, workspace
    from jax_flux._exchange import kv_client as _kv_client

    op = "all_gather_matmul"
    (sx, sw), _ = testing._SPECS[op]
    world = mesh.devices.size
    x, w, x64, w64 = testing.random_operands(world * 2, 8, 2 * world, jnp.float32, seed=11)
    xs = global_array(jax, NamedSharding(mesh, sx), np.asarray(x))
    ws = global_array(jax, NamedSharding(mesh, sw), np.asarray(w))
    quick = testing.sharded(op, mesh, "fused", AllGatherMatmulConfig(timeout_s=2.0))
    quick.lower(xs, ws).compile()  # both processes: the workspace exchange happens here
    client = _kv_client()
    if process_id == 0:
        with pytest.raises(Exception, match="gave up after about 2 s waiting for"):
            jax.block_until_ready(quick(xs, ws))
        client.key_value_set("jax_flux_test/timeout_seen", "1")
        # Each process reads the error records of its own ranks (host memory).
        failed = errors.failures()
        assert len(failed) == len(jax.local_devices()), failed
        assert all(re.search(r"rank \d+ of axis 'tp' gave up waiting for row chunk 0 of "
                             r"rank \d+", m) for m in failed), failed
        with pytest.raises(jax_flux.PeerTimeoutError):
            errors.check()
    else:
        client.blocking_key_value_get("jax_flux_test/timeout_seen", 120_000)
        assert errors.failures() == []  # its ranks never ran the call
    workspace.reset()
    assert errors.failures() == []
    client.wait_at_barrier("jax_flux_test/reset", 120_000)
    # Recovery with the default (60 s) timeout: a loaded CI host may be slow.
    out = testing.sharded(op, mesh, "fused")(xs, ws)
    for shard in out.addressable_shards:
        err = testing.relative_error(shard.data, (x64 @ w64)[shard.index])
        assert err < tol, f"after reset: shard {shard.index}: error {err:.2e}"


def _several_gpus_a_process(jax, process_id: int, num_processes: int,
                            local_devices: int) -> None:
    """Several "GPUs" a process over the fake driver (the workspace's cuda-ipc path):

    * the usual multi-host layout, the tp axis inside each process (dp across
      processes): this process's GPUs of a group get peer access to each other;
    * a tp axis spanning processes with several GPUs in each: every peer in
      another process is mapped once per GPU of this process, in that GPU's
      context, and each rank's row of the address table holds its own mappings.
    Both ops, checked against float64."""
    import ctypes

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_flux
    from jax_flux import testing, workspace

    use_gpu_workspace_path()
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")
    inside, across = meshes(jax, num_processes, local_devices)
    world, spread = across.size, list(across.devices.flat)
    layouts = {"tp inside processes": inside, "tp across processes": across}
    for layout, mesh in layouts.items():
        tp = mesh.shape["tp"]
        cases = {
            "all_gather_matmul": ((P(("dp", "tp")), P(None, "tp")), P("dp", "tp"),
                                  (world * 3, 16, world * 2)),
            "matmul_reduce_scatter": ((P("dp", "tp"), P("tp", None)), P(("dp", "tp")),
                                      (world * 3, 8 * tp, 12)),
        }
        for op, ((sx, sw), so, (m, k, n)) in cases.items():
            fn = getattr(jax_flux, op)
            f = jax.jit(jax.shard_map(lambda x, w, fn=fn: fn(x, w, "tp", impl="fused"),
                                      mesh=mesh, in_specs=(sx, sw), out_specs=so))
            for call in range(3):
                x, w, x64, w64 = testing.random_operands(m, k, n, jnp.float32, seed=call)
                out = f(global_array(jax, NamedSharding(mesh, sx), np.asarray(x)),
                        global_array(jax, NamedSharding(mesh, sw), np.asarray(w)))
                ref64 = x64 @ w64
                for shard in out.addressable_shards:
                    err = testing.relative_error(shard.data, ref64[shard.index])
                    assert err < 1e-5, (f"{layout}: {op} call {call} shard {shard.index}: "
                                        f"error {err:.2e}")
    locations = sorted({ws["location"] for ws in workspace.info()})
    assert locations == ["cuda-ipc"], locations
    caught.__exit__(None, None, None)
    assert not [w for w in seen if "could not check" in str(w.message)], [str(w.message)
                                                                         for w in seen]
    # NVML was asked (read, write, atomics) about each link from one of this
    # process's GPUs to one of the other's, in the tp-across layout only.
    asked = ctypes.CDLL(os.environ["JAX_FLUX_LIBNVML"]).fakeNvmlP2PQueries()
    assert asked == 3 * local_devices * (world - local_devices), asked

    fake = ctypes.CDLL(os.environ["JAX_FLUX_LIBCUDA"])
    fake.fakeCudaDeviceOf.argtypes = [ctypes.c_uint64]
    ordinals = [d.local_hardware_id for d in jax.local_devices()]
    missing = [(a, b) for a in ordinals for b in ordinals
               if a != b and not fake.fakeCudaPeerAccess(a, b)]
    assert not missing, f"no peer access between this process's GPUs {missing}"
    # Across processes: rank v's row addresses its own process's ranks' buffers
    # (on their GPUs) and the other processes' through mappings opened for v's GPU.
    (ws,) = [w for w in workspace._live.values() if w.groups == 1 and w.world == world]
    table = ws.table().astype(np.uint64)
    addr = table[..., 0] | (table[..., 1] << 32)
    mine = [v for v, d in enumerate(spread) if d.process_index == process_id]
    for v in mine:
        for r, d in enumerate(spread):
            want = (d if d.process_index == process_id else spread[v]).local_hardware_id
            got = fake.fakeCudaDeviceOf(int(addr[v, r]))
            assert got == want, f"rank {v}'s view of rank {r}: device {got}, want {want}"
    print(f"OK process {process_id}: several GPUs a process over cuda-ipc ({list(layouts)}); "
          f"peer access {ordinals}", flush=True)
    jax.distributed.shutdown()


def main(process_id: int, num_processes: int, port: int, local_devices: int,
         mode: str = "") -> None:
    """``gpu``: the checks below on real GPUs (``local_devices`` a process), the
    workspace in ``cuda-ipc`` memory."""
    if mode.startswith("fake-cuda"):
        # One machine's GPUs; each process sees only its own, at its own PCI bus ids.
        os.environ["FAKE_CUDA_DEVICES"] = str(local_devices)
        os.environ["FAKE_CUDA_BUS_BASE"] = str(0x10 + process_id * local_devices)
    jax = _setup(process_id, num_processes, port, local_devices, gpu=mode == "gpu")
    if mode == "exchange-timeout":
        return refusals.peer_never_lowers(jax, process_id)
    if mode == "two-machines":
        return refusals.two_machines(jax, process_id, num_processes, local_devices)
    if mode == "fake-cuda-pcie":
        return refusals.pcie_between_processes(jax, process_id, num_processes, local_devices)
    if mode == "fake-cuda-several-gpus":
        return _several_gpus_a_process(jax, process_id, num_processes, local_devices)
    if mode == "fake-cuda":
        expected_location = use_gpu_workspace_path()
    else:
        expected_location = "cuda-ipc" if mode == "gpu" else "host-shared"
    tol = _TOL[jax.devices()[0].platform]
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_flux
    from jax_flux import testing, workspace
    from tests.helpers import cotangent, lax_reference

    world = num_processes * local_devices
    ranks = list(meshes(jax, num_processes, local_devices)[1].devices.flat)
    mesh = testing.mesh(ranks)
    if mode == "fake-cuda":
        refusals.links_unverified(jax, mesh, process_id)
    for op in ("all_gather_matmul", "matmul_reduce_scatter"):
        (sx, sw), _ = testing._SPECS[op]
        fused, ref = testing.sharded(op, mesh, "fused"), lax_reference(op, mesh)
        for call in range(5):  # fresh data each call: a stale buffer shows
            m = world * (3 + call)
            x, w, x64, w64 = testing.random_operands(m, 24, 8 * world, jnp.float32, seed=call)
            xs = global_array(jax, NamedSharding(mesh, sx), np.asarray(x))
            ws = global_array(jax, NamedSharding(mesh, sw), np.asarray(w))
            _check(f"{op} call {call}", fused(xs, ws), ref(xs, ws), x64 @ w64, tol)

    # Gradient of the AG-GEMM: its backward is a fused GEMM-RS across processes too.
    op = "all_gather_matmul"
    (sx, sw), so = testing._SPECS[op]
    x, w, x64, w64 = testing.random_operands(world * 4, 16, 4 * world, jnp.float32, seed=7)
    g, g64 = cotangent((world * 4, 4 * world), jnp.float32)
    args = (global_array(jax, NamedSharding(mesh, sx), np.asarray(x)),
            global_array(jax, NamedSharding(mesh, sw), np.asarray(w)),
            global_array(jax, NamedSharding(mesh, so), np.asarray(g)))
    got = testing.sharded(op, mesh, "fused", grad=True)(*args)
    want = lax_reference(op, mesh, grad=True)(*args)
    for name, a, b, r64 in zip(("out", "dx", "dw"), got, want, (x64 @ w64, g64 @ w64.T,
                                                                x64.T @ g64)):
        _check(f"{op} grad {name}", a, b, r64, tol)

    # A 2-D mesh: one tp group per dp row, each group spanning every process.
    if world % 2 == 0 and world >= 4:
        mesh2 = Mesh(np.asarray(ranks).reshape(2, world // 2), ("dp", "tp"))
        f = jax.jit(jax.shard_map(
            lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", impl="fused"), mesh=mesh2,
            in_specs=(P(("dp", "tp")), P(None, "tp")), out_specs=P("dp", "tp")))
        x, w, x64, w64 = testing.random_operands(world * 3, 12, world * 2, jnp.float32, seed=9)
        xs = global_array(jax, NamedSharding(mesh2, P(("dp", "tp"))), np.asarray(x))
        ws = global_array(jax, NamedSharding(mesh2, P(None, "tp")), np.asarray(w))
        out = f(xs, ws)
        ref64 = x64 @ w64
        for shard in out.addressable_shards:
            err = testing.relative_error(shard.data, ref64[shard.index])
            assert err < tol, f"2-D mesh shard {shard.index}: error {err:.2e}"

    _peer_never_arrives(jax, mesh, process_id, tol)

    locations = sorted({ws["location"] for ws in workspace.info()})
    assert locations == [expected_location], locations
    print(f"OK process {process_id}: {len(workspace.info())} workspaces, {locations}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]), *sys.argv[5:6])
