"""Fused-kernel configs (validation, defaults) and the symmetric workspace's bookkeeping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, testing, workspace
from tests.helpers import mesh_of


@pytest.mark.parametrize("kwargs,match", [
    ({"block_m": 48}, "block_m must be a power of two"),
    ({"block_k": 0}, "block_k must be a power of two"),
    ({"num_warps": 3}, "num_warps must be a power of two"),
    ({"num_stages": 0}, "num_stages must be an int >= 1"),
    ({"chunk_rows": 0}, "chunk_rows must be an int >= 1"),
    ({"comm_programs": 0}, "comm_programs must be an int >= 1"),
    ({"comm_programs": 4, "num_programs": 4}, r"num_programs \(4\) must exceed comm_programs"),
    ({"timeout_s": 0}, "timeout_s must be in"),
    ({"programs_per_sm": 0}, "programs_per_sm must be 1 to 4"),
    ({"pull": 1}, "pull must be a bool"),
])
def test_invalid_all_gather_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllGatherMatmulConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"block_n": 100}, "block_n must be a power of two"),
    ({"reduce_programs": -1}, "reduce_programs must be an int >= 0"),
    ({"reduce_programs": 8, "num_programs": 8}, r"num_programs \(8\) must exceed reduce_programs"),
])
def test_invalid_reduce_scatter_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MatmulReduceScatterConfig(**kwargs)


def test_configs_are_frozen_and_hashable():
    cfg = AllGatherMatmulConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_m = 64
    assert hash(cfg) == hash(AllGatherMatmulConfig())


@pytest.mark.parametrize("interpreting", [True, False])
@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (8, 12288, 49152 // 8), (1024, 12288, 6144),
                                   (13, 40, 7)])
def test_default_configs_are_valid(interpreting, m, k, n):
    for cls in (AllGatherMatmulConfig, MatmulReduceScatterConfig):
        cfg = cls.default(m, k, n, 8, interpreting)
        assert isinstance(cfg, cls)
        assert cfg.patience_ms() >= 1


def test_float32_results_get_the_gemm_rs_default_that_does_not_spill():
    # GEMM-RS's epilogue sums float32 partials into a float32 tile: 4 warps spill
    # into the K loop (tests/compile_for_gpu.py: rs0_f32out), so 8; the AG-GEMM
    # default depends on what it copies (the operands) only.
    rs = MatmulReduceScatterConfig.default
    assert rs(512, 6144, 12288, 8, False).num_warps == 4
    assert rs(512, 6144, 12288, 8, False, itemsize=2, out_itemsize=4).num_warps == 8
    ag = AllGatherMatmulConfig.default
    assert ag(512, 12288, 6144, 8, False, itemsize=2, out_itemsize=4) == ag(512, 12288, 6144, 8,
                                                                            False, itemsize=2)


def test_wrong_config_type_is_rejected():
    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(16, 16, 16, jnp.float32)
    f = jax.shard_map(lambda x, w: jax_flux.all_gather_matmul(
        x, w, "tp", impl="fused", config=MatmulReduceScatterConfig()),
        mesh=mesh, in_specs=(P("tp"), P(None, "tp")), out_specs=P(None, "tp"))
    with pytest.raises(ValueError, match="takes an AllGatherMatmulConfig"):
        jax.eval_shape(f, x, w)


def test_workspace_is_inspectable_and_grows():
    # Devices 7, 6, 5, 4: a mesh no other test builds, so its workspace starts
    # here at this test's size whatever ran before in this process (mesh_of(4)'s
    # had been grown past run(4096)'s need by an earlier file).
    mesh = testing.mesh(jax.devices()[4:][::-1])
    axis = "tp"

    def run(m):
        x, w, x64, w64 = testing.random_operands(4 * m, 16, 8, jnp.float32, seed=m)
        xs, ws = testing.place("all_gather_matmul", mesh, x, w)
        out = testing.sharded("all_gather_matmul", mesh, "fused")(xs, ws)
        assert testing.relative_error(out, x64 @ w64) < 1e-5

    def current():  # this mesh's
        live = [ws for ws in workspace.info()
                if not ws["retired"] and ws["key"][1] == axis and ws["world"] == 4
                and ws["key"][2] == workspace._mesh_signature(mesh)]
        assert len(live) == 1
        return live[0]

    run(4)
    first = current()
    assert first["location"] == "host" and first["groups"] == 1
    assert first["total_bytes"] == 4 * first["bytes_per_rank"]
    run(4096)  # needs 4 * 4096 * 16 * 4 bytes of gather buffer per rank: more than before
    grown = current()
    assert grown["bytes_per_rank"] > first["bytes_per_rank"]
    assert any(ws["retired"] and ws["key"] == first["key"] for ws in workspace.info())
    run(4)  # the program compiled first still runs on its (retired) workspace


def test_two_dimensional_mesh_has_one_workspace_group_per_row():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    x, w, x64, w64 = testing.random_operands(2 * 4 * 3, 12, 8, jnp.float32, seed=2)
    # Rows of x split over dp then tp; each dp row gathers only within its tp group.
    f = jax.jit(jax.shard_map(
        lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", impl="fused"), mesh=mesh,
        in_specs=(P(("dp", "tp")), P(None, "tp")), out_specs=P("dp", "tp")))
    out = f(x, w)
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    groups = [ws for ws in workspace.info() if not ws["retired"] and ws["groups"] == 2]
    assert groups and groups[0]["world"] == 4


def test_workspace_follows_the_concrete_mesh_axis_order_and_device_order():
    # tp is the first mesh axis and the devices are shuffled: each rank's buffer
    # must still be found by (group, rank) as the kernel computes them.
    devices = np.asarray(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]].reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("tp", "dp"))
    x, w, x64, w64 = testing.random_operands(2 * 4 * 3, 12, 8, jnp.float32, seed=4)
    f = jax.jit(jax.shard_map(
        lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", impl="fused"), mesh=mesh,
        in_specs=(P(("dp", "tp")), P(None, "tp")), out_specs=P("dp", "tp")))
    assert testing.relative_error(f(x, w), x64 @ w64) < 1e-5
    keys = [ws["key"] for ws in workspace.info() if not ws["retired"]]
    assert any(k[2] and k[2][1] == tuple(int(d.id) for d in devices.flat) for k in keys)


@pytest.mark.parametrize("axes", [("a", "b"), ("b", "a"), "b"])
def test_workspace_slots_put_each_rank_on_its_own_device(axes):
    # The device of (group, rank) in the workspace is the one whose shard_map
    # program has that group (the other axes, row-major) and that
    # lax.axis_index(axes): on GPUs each rank's buffer is its own GPU's memory.
    from jax import lax
    from jax.sharding import Mesh

    from jax_flux._axes import axis_names

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("dp", "a", "b"))
    tp = axis_names(axes)
    others = [n for n in mesh.axis_names if n not in tp]

    def body():
        group = lax.axis_index(tuple(others)) if others else 0
        return jnp.stack([group, lax.axis_index(axes)])[None]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(),
                                out_specs=P(("dp", "a", "b"))))()
    where = {s.device: tuple(int(v) for v in np.asarray(s.data)[0])
             for s in out.addressable_shards}
    world = int(np.prod([mesh.shape[n] for n in tp]))
    req = workspace.TableRequest("all_gather_matmul", axes, world, 8 // world, 1024)
    slots = workspace._slots(req, mesh, "cpu")
    assert {d: (g, r) for g, row in enumerate(slots) for r, d in enumerate(row)} == where
