"""Fused AllGather-GEMM: the real kernel through Triton's interpreter on 8 CPU devices.

Each emulated device runs its kernel on its own thread; rows move between
ranks only through the host-memory symmetric workspace, by the kernels' own
pushes and signals.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import AllGatherMatmulConfig, testing
from tests.helpers import (ag_with_gathered, count_peer_idle_asks, expect_timeout_then_recover,
                           fused_fn, mesh_of)

OP = "all_gather_matmul"
# Small tiles and chunks so one tile spans several chunks and ragged edges abound.
SMALL = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=5,
                              comm_programs=2, copy_rows=4, copy_cols=16, num_programs=5)
# PULL: each rank stages its shard in its own workspace and the peers' programs
# copy it in; two communication programs, so one pulls while the other stages.
SMALL_PULL = dataclasses.replace(SMALL, pull=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("m_local,k,n_local,cfg", [
    (13, 40, 7, SMALL), (16, 16, 16, SMALL), (1, 24, 3, SMALL),
    (13, 40, 7, SMALL_PULL), (1, 24, 3, SMALL_PULL),
], ids=lambda v: ("pull" if v.pull else "push") if isinstance(v, AllGatherMatmulConfig) else v)
def test_ragged_shapes(m_local, k, n_local, cfg, dtype):
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * m_local, k, 8 * n_local, dtype, seed=k)
    xs, ws = testing.place(OP, mesh, x, w)
    out = fused_fn(OP, mesh, cfg)(xs, ws)
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("cfg", [SMALL, SMALL_PULL], ids=["push", "pull"])
def test_weight_read_transposed_in_place(cfg, dtype):
    # w given as w^T [n, K], as GEMM-RS's backward pass hands it over: the
    # kernel reads it in place; ragged in every dim. float8 operands (a bfloat16
    # result): the layout Hopper's FP8 MMAs want.
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * 13, 40, 8 * 7, dtype, seed=4)
    xs, wts = testing.place(OP, mesh, x, w, w_transposed=True)
    out_dtype = jnp.bfloat16 if jnp.dtype(dtype).itemsize == 1 else None
    out = testing.sharded(OP, mesh, "fused", cfg, w_transposed=True,
                          preferred_element_type=out_dtype)(xs, wts)
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(out_dtype or dtype)]


@pytest.mark.parametrize("cfg", [SMALL, SMALL_PULL], ids=["push", "pull"])
def test_float8_weight_with_float16_activations(cfg):
    # Mixed operands: float16 rows gathered, an e5m2 w widened tile by tile in
    # registers; ragged in every dim.
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * 13, 40, 8 * 7, jnp.float16, seed=5,
                                             w_dtype=jnp.float8_e5m2)
    xs, ws = testing.place(OP, mesh, x, w)
    out = testing.sharded(OP, mesh, "fused", cfg)(xs, ws)
    assert out.dtype == jnp.float16
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(jnp.float16)]


def test_default_config_every_axis_size():
    for size in (1, 2, 3, 8):
        mesh = mesh_of(size)
        x, w, x64, w64 = testing.random_operands(6 * size, 20, 4 * size, jnp.float32, seed=size)
        xs, ws = testing.place(OP, mesh, x, w)
        out = testing.sharded(OP, mesh, "fused")(xs, ws)
        assert testing.relative_error(out, x64 @ w64) < 1e-5, size


def test_fifty_back_to_back_calls_with_fresh_data():
    # A stale-buffer detector: a wait satisfied by an earlier call's signal
    # would multiply that call's rows, and the check of this call would fail.
    mesh = mesh_of(8)
    f = fused_fn(OP, mesh, SMALL)
    for i in range(50):
        x, w, x64, w64 = testing.random_operands(8 * 6, 16, 8 * 2, jnp.float32, seed=100 + i)
        xs, ws = testing.place(OP, mesh, x, w)
        assert testing.relative_error(f(xs, ws), x64 @ w64) < 1e-5, f"call {i}"


@pytest.mark.parametrize("pull", [False, True], ids=["push", "pull"])
def test_several_fused_calls_in_one_program_and_across_programs(pull):
    # No host sync between the calls of a program: a rank may start its next
    # call while a peer still reads this one's rows, what the start barrier is
    # for (push: before writing into a peer; pull: before restaging its own).
    # Push without it failed here (a later call's signal, 3 runs of 3); pull
    # without it still passed (2 runs of 2: a peer copies the staged rows at
    # the start of its call, long before the stager can finish one).
    mesh = mesh_of(8)
    # Pull: the interpreter's default tiles for these shapes (config=None), pulled.
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=4,
                                comm_programs=1, copy_rows=16, copy_cols=16,
                                pull=True) if pull else None

    def body(x, w1, w2):
        a = jax_flux.all_gather_matmul(x, w1, "tp", impl="fused", config=cfg)
        b = jax_flux.all_gather_matmul(x, w2, "tp", impl="fused", config=cfg)  # independent of a
        c = jax_flux.all_gather_matmul(x * 2, w1, "tp", impl="fused", config=cfg)
        return a, b, c

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P(None, "tp"), P(None, "tp")),
                              out_specs=(P(None, "tp"),) * 3))
    g = fused_fn(OP, mesh, cfg)
    for i in range(3):
        x, w1, x64, w164 = testing.random_operands(8 * 4, 12, 16, jnp.float32, seed=i)
        _, w2, _, w264 = testing.random_operands(8 * 4, 12, 24, jnp.float32, seed=50 + i)
        a, b, c = f(x, w1, w2)
        assert testing.relative_error(a, x64 @ w164) < 1e-5
        assert testing.relative_error(b, x64 @ w264) < 1e-5
        assert testing.relative_error(c, 2 * x64 @ w164) < 1e-5
        xs, ws = testing.place(OP, mesh, x, w1)
        assert testing.relative_error(g(xs, ws), x64 @ w164) < 1e-5


def test_gathered_x_output():
    mesh = mesh_of(8)
    x, w, x64, _ = testing.random_operands(8 * 7, 20, 16, jnp.bfloat16, seed=3)
    _, xg = ag_with_gathered(mesh, SMALL)(x, w)
    for r in range(8):  # every rank holds all of x, bit for bit
        np.testing.assert_array_equal(np.asarray(xg[r], np.float64), x64)


def test_lowered_program_has_our_call_and_no_collective():
    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(32, 16, 16, jnp.float32)
    xs, ws = testing.place(OP, mesh, x, w)
    text = testing.sharded(OP, mesh, "fused").lower(xs, ws).as_text()
    assert "cpu_callback" in text
    for name in ("all_gather", "reduce_scatter", "all_reduce", "collective_permute", "all_to_all"):
        assert f"stablehlo.{name}" not in text, name


@pytest.mark.parametrize("pull", [False, True], ids=["push", "pull"])
def test_a_rank_that_skips_its_call_times_out_with_a_clear_error(pull):
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=8,
                                timeout_s=2.0, pull=pull)

    def body(x, w):
        skip = lax.axis_index("tp") == 3
        zeros = lax.pcast(jnp.zeros((8 * x.shape[0], w.shape[1]), x.dtype), "tp", to="varying")
        return lax.cond(skip, lambda: zeros,
                        lambda: jax_flux.all_gather_matmul(x, w, "tp", impl="fused",
                                                           config=cfg))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P(None, "tp")),
                              out_specs=P(None, "tp")))
    x, w, _, _ = testing.random_operands(8 * 8, 16, 16, jnp.float32)
    expect_timeout_then_recover(f, x, w, OP, mesh,
                                r"all_gather_matmul\(impl='fused'\): rank \d of axis "
                                r"'tp' gave up .* waiting for row chunk 0 of rank 3")


def test_without_tile_rotation():
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=5,
                                comm_programs=2, num_programs=5, rotate=False)
    x, w, x64, w64 = testing.random_operands(8 * 13, 24, 8 * 3, jnp.float32, seed=8)
    xs, ws = testing.place(OP, mesh, x, w)
    assert testing.relative_error(fused_fn(OP, mesh, cfg)(xs, ws), x64 @ w64) < 1e-5


@pytest.mark.parametrize("group_m", [1, 5, 8])
def test_grouped_tile_order_with_a_partial_group(group_m):
    """8 sources x 3 row tiles taken row-major (1), or in groups that span
    sources with a partial last group (5: 4 groups of 5, then 4; 8): every
    tile once, and the gathered x (written with tile column 0) whole."""
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=16,
                                comm_programs=2, copy_rows=4, copy_cols=16, num_programs=5,
                                group_m=group_m)
    x, w, x64, w64 = testing.random_operands(8 * 40, 24, 8 * 40, jnp.float32, seed=group_m)
    y, xg = ag_with_gathered(mesh, cfg)(x, w)
    assert testing.relative_error(y, x64 @ w64) < 1e-5
    for r in range(8):
        np.testing.assert_array_equal(np.asarray(xg[r], np.float64), x64)


@pytest.mark.parametrize("m_local,k,n_local", [(8, 40, 24), (40, 24, 16)])
def test_the_gpu_default_config_is_right_too(m_local, k, n_local):
    """What config=None picks on a GPU (more communication programs than the
    interpreter's grid, copy tiles wider than x) runs right in the interpreter."""
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig.default(m_local, k, n_local, 8, interpreting=False)
    assert cfg.comm_programs > 1
    x, w, x64, w64 = testing.random_operands(8 * m_local, k, 8 * n_local, jnp.float32, seed=k)
    xs, ws = testing.place(OP, mesh, x, w)
    assert testing.relative_error(fused_fn(OP, mesh, cfg)(xs, ws), x64 @ w64) < 1e-5



@pytest.mark.parametrize("rotate", [True, False])
def test_pull_back_to_back_calls_with_fresh_data_and_the_gathered_x(rotate):
    # A stale-buffer detector for the staged shards: a pull satisfied by an
    # earlier call's staging signal would copy that call's rows.
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=5,
                                comm_programs=2, copy_rows=4, copy_cols=16, num_programs=5,
                                pull=True, rotate=rotate, group_m=5)
    f = ag_with_gathered(mesh, cfg)
    for i in range(10):
        x, w, x64, w64 = testing.random_operands(8 * 11, 16, 8 * 2, jnp.float32, seed=300 + i)
        y, xg = f(x, w)
        assert testing.relative_error(y, x64 @ w64) < 1e-5, f"call {i}"
        for r in range(8):
            np.testing.assert_array_equal(np.asarray(xg[r], np.float64), x64)



def test_each_communication_program_asks_each_peer_once_a_call_whether_it_is_idle(monkeypatch):
    # The start barrier is a round trip to the peer's memory; a peer found idle
    # stays so for the call (signals.peer_idle): at most once a program and
    # peer, not once a chunk (here 4 chunks a peer, 2 communication programs).
    mesh = mesh_of(8)
    cfg = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=16,
                                comm_programs=2)
    f = fused_fn(OP, mesh, cfg)
    x, w, x64, w64 = testing.random_operands(8 * 64, 32, 8 * 16, jnp.float32, seed=4)
    asks = count_peer_idle_asks(monkeypatch)
    out = f(*testing.place(OP, mesh, x, w))
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    assert 0 < asks[0] <= 8 * 2 * 7, asks[0]
