"""The multi-process check's refusal and failure modes (run by
tests/multiprocess_worker.py, which says how): a process that never lowers,
a tp group across machines, GPU links without native atomics or that cannot
be asked about; and the helpers both files use.
"""


def global_array(jax, sharding, host):
    """A global array of ``host`` (the same in every process), laid out by ``sharding``."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def meshes(jax, num_processes: int, local_devices: int):
    """("dp", "tp") meshes over every process's devices: (the tp axis inside each
    process, one tp group across all of them with rank r on process
    r % num_processes, so neighbours are always in other processes)."""
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()  # process 0's, then process 1's, ...
    spread = [devices[(r % num_processes) * local_devices + r // num_processes]
              for r in range(len(devices))]
    return (Mesh(np.asarray(devices).reshape(num_processes, local_devices), ("dp", "tp")),
            Mesh(np.asarray(spread).reshape(1, len(devices)), ("dp", "tp")))


def use_gpu_workspace_path() -> str:
    """Routes the workspace through its CUDA backends (over the fake driver)."""
    from jax_flux import workspace

    host_location = workspace._location
    gpu = {"host": "cuda", "host-shared": "cuda-ipc"}
    workspace._location = lambda platform, slots: gpu[host_location(platform, slots)]
    return "cuda-ipc"


def links_unverified(jax, mesh, process_id: int) -> None:
    """One GPU a process, each hidden from the other's driver, and no NVML: the
    links cannot be asked about. Lowering warns, naming them, once."""
    import warnings

    import numpy as np
    import pytest
    from jax.sharding import NamedSharding

    from jax_flux import testing

    op = "all_gather_matmul"
    (sx, sw), _ = testing._SPECS[op]
    x, w, _, _ = testing.random_operands(8, 8, 8, np.float32)
    args = (global_array(jax, NamedSharding(mesh, sx), np.asarray(x)),
            global_array(jax, NamedSharding(mesh, sw), np.asarray(w)))
    with pytest.warns(UserWarning, match=r"could not check that the links \[\('0000:10:00.0 "
                      r"\(process 0\)', '0000:11:00.0 \(process 1\)'\), \('0000:11:00.0 "
                      r"\(process 1\)', '0000:10:00.0 \(process 0\)'\)\] \(from, to\) have "
                      r"native atomics .*hidden from this process's CUDA, and NVML"):
        testing.sharded(op, mesh, "fused").lower(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.sharded(op, mesh, "fused").lower(*args)  # checked once a workspace
    print(f"process {process_id}: unverifiable links named in a warning", flush=True)


def peer_never_lowers(jax, process_id: int) -> None:
    """Only process 0 lowers a fused program: it must fail within the exchange
    timeout, naming the process whose buffer never came, not hang."""
    import numpy as np
    import pytest
    from jax.sharding import NamedSharding

    from jax_flux import testing
    from jax_flux._exchange import kv_client as _kv_client

    op = "all_gather_matmul"
    (sx, sw), _ = testing._SPECS[op]
    mesh = testing.mesh(jax.devices())
    client = _kv_client()
    if process_id == 0:
        x, w, _, _ = testing.random_operands(8, 8, 8, np.float32)
        xs = global_array(jax, NamedSharding(mesh, sx), np.asarray(x))
        ws = global_array(jax, NamedSharding(mesh, sw), np.asarray(w))
        with pytest.raises(RuntimeError,
                           match="process 1 .*did not publish its (machine|buffer) within 3 s"):
            testing.sharded(op, mesh, "fused").lower(xs, ws)
        client.key_value_set("jax_flux_test/lowering_failed", "1")
    else:
        client.blocking_key_value_get("jax_flux_test/lowering_failed", 120_000)
    print(f"OK process {process_id}: exchange timeout reported", flush=True)
    jax.distributed.shutdown()


def pcie_between_processes(jax, process_id: int, num_processes: int,
                            local_devices: int) -> None:
    """The fake NVML says the links between the two processes' GPUs lack native
    atomics (PCIe P2P): a tp axis inside each process runs (its links asked of
    the driver); one across them is a ValueError in every process when the
    program is lowered, naming the links by PCI bus id, before anything is
    allocated."""
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_flux
    from jax_flux import testing, workspace

    use_gpu_workspace_path()
    inside, across = meshes(jax, num_processes, local_devices)
    world = across.size
    specs = (P("dp", "tp"), P("tp", None))

    def program(mesh):
        return jax.jit(jax.shard_map(
            lambda x, w: jax_flux.matmul_reduce_scatter(x, w, "tp", impl="fused"), mesh=mesh,
            in_specs=specs, out_specs=P(("dp", "tp"))))

    x, w, x64, w64 = testing.random_operands(world * 3, 8 * world, 12, jnp.float32, seed=5)
    out = program(inside)(global_array(jax, NamedSharding(inside, specs[0]), np.asarray(x)),
                          global_array(jax, NamedSharding(inside, specs[1]), np.asarray(w)))
    for shard in out.addressable_shards:
        err = testing.relative_error(shard.data, (x64 @ w64)[shard.index])
        assert err < 1e-5, f"tp inside a process: shard {shard.index}: error {err:.2e}"
    before = len(workspace.info())
    args = (global_array(jax, NamedSharding(across, specs[0]), np.asarray(x)),
            global_array(jax, NamedSharding(across, specs[1]), np.asarray(w)))
    # Process 0's GPUs are at buses 0x10, 0x11; process 1's at 0x12, 0x13.
    with pytest.raises(ValueError, match=r"matmul_reduce_scatter\(impl='fused'\) over axis "
                       r"'tp' needs every pair of a group's GPUs linked with native atomics "
                       r"\(NVLink\), but found peer access without native atomics \(PCIe, not "
                       r"NVLink\) between GPUs \[\('0000:10:00.0 \(process 0\)', '0000:12:00.0 "
                       r"\(process 1\)'\), .*\('0000:13:00.0 \(process 1\)', '0000:11:00.0 "
                       r"\(process 0\)'\)\] \(from, to\)"):
        program(across).lower(*args)
    with pytest.raises(ValueError, match="PCIe, not NVLink"):  # asked again, not a KV error
        program(across).lower(*args)
    assert len(workspace.info()) == before, "a workspace was allocated for the refused mesh"
    print(f"OK process {process_id}: tp inside processes runs, across PCIe refused", flush=True)
    jax.distributed.shutdown()


def two_machines(jax, process_id: int, num_processes: int, local_devices: int) -> None:
    """Process 1 claims another machine (its workspace handles would not open
    here): a tp axis inside each process (dp across the "machines") runs the
    fused op; a tp axis across them fails in every process when the program
    is lowered, naming the ranks and hosts, before anything is allocated."""
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import os
    import tempfile

    import jax_flux
    from jax_flux import AllGatherMatmulConfig, _exchange, autotune, testing, workspace

    if process_id == 1:
        _exchange.machine = lambda: ("another-boot-id", "host-b")
    inside, across = meshes(jax, num_processes, local_devices)
    world = across.size
    specs = (P(("dp", "tp")), P(None, "tp"))

    def program(mesh):
        return jax.jit(jax.shard_map(
            lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", impl="fused"), mesh=mesh,
            in_specs=specs, out_specs=P("dp", "tp")))

    x, w, x64, w64 = testing.random_operands(world * 3, 16, world * 2, jnp.float32, seed=3)
    xs = global_array(jax, NamedSharding(inside, specs[0]), np.asarray(x))
    ws = global_array(jax, NamedSharding(inside, specs[1]), np.asarray(w))
    out = program(inside)(xs, ws)
    for shard in out.addressable_shards:
        err = testing.relative_error(shard.data, (x64 @ w64)[shard.index])
        assert err < 1e-5, f"tp inside a machine: shard {shard.index}: error {err:.2e}"
    before = len(workspace.info())
    xs = global_array(jax, NamedSharding(across, specs[0]), np.asarray(x))
    ws = global_array(jax, NamedSharding(across, specs[1]), np.asarray(w))
    with pytest.raises(ValueError, match=r"all_gather_matmul\(impl='fused'\) over axis 'tp' "
                       r"needs all of a group's 4 ranks on one machine .* group 0 spans 2 "
                       r"machines: ranks \[0, 2\] on host .*\(process \[0\]\); ranks \[1, "
                       r"3\] on host 'host-b' \(process \[1\]\)"):
        program(across).lower(xs, ws)
    with pytest.raises(ValueError, match="spans 2 machines"):  # asked again, not a KV error
        program(across).lower(xs, ws)
    # impl="auto" where fused was measured fastest: every process takes the
    # faster of the rest (xla), with the refusal in a warning.
    os.environ["JAX_FLUX_AUTOTUNE_CACHE"] = os.path.join(tempfile.mkdtemp(), "autotune.json")
    autotune.record(autotune.AG, autotune.key(autotune.AG, jax.devices()[0].device_kind, 3,
                                              16, 2, jnp.float32, world),
                    AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16), 0.5,
                    baselines_ms={"xla": 1.0, "ring": 2.0})
    auto = jax.jit(jax.shard_map(lambda x, w: jax_flux.all_gather_matmul(x, w, "tp"),
                                 mesh=across, in_specs=specs, out_specs=P("dp", "tp")))
    with pytest.warns(UserWarning, match=r"all_gather_matmul\(impl='auto'\): .* runs "
                                         r"impl='xla' .*spans 2 machines"):
        out = auto(xs, ws)
    for shard in out.addressable_shards:
        err = testing.relative_error(shard.data, (x64 @ w64)[shard.index])
        assert err < 1e-5, f"auto across machines: shard {shard.index}: error {err:.2e}"
    assert len(workspace.info()) == before, "a workspace was allocated for the refused mesh"
    print(f"OK process {process_id}: tp inside machines runs, across machines refused, "
          f"auto runs xla there", flush=True)
    jax.distributed.shutdown()
