"""Fused GEMM-ReduceScatter: the real kernel through Triton's interpreter on 8 CPU devices.

Partials move between ranks only through the host-memory symmetric
workspace: each rank's GEMM epilogue stores tiles into their owners' reduce
buffers, and the owners sum them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import MatmulReduceScatterConfig, testing
from tests.helpers import (cotangent, count_peer_idle_asks, expect_timeout_then_recover,
                           fused_fn, mesh_of, scaled_calls)

OP = "matmul_reduce_scatter"
SMALL = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16, reduce_programs=2,
                                  num_programs=5)
# No reduction programs: the GEMM sums the peers' partials into its own tiles.
SMALL_EPILOGUE = dataclasses.replace(SMALL, reduce_programs=0, num_programs=None)
REDUCERS = pytest.mark.parametrize("cfg", [SMALL, SMALL_EPILOGUE],
                                   ids=["reduce_programs", "epilogue"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("m_own,k_local,n", [(13, 5, 40), (16, 16, 16), (1, 3, 24)])
@REDUCERS
def test_ragged_shapes(m_own, k_local, n, dtype, cfg):
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * m_own, 8 * k_local, n, dtype, seed=n)
    xs, ws = testing.place(OP, mesh, x, w)
    out = fused_fn(OP, mesh, cfg)(xs, ws)
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn],
                         ids=lambda d: jnp.dtype(d).name)
@REDUCERS
def test_weight_read_transposed_in_place(cfg, dtype):
    # w given as w^T [N, k], as AG-GEMM's backward pass hands it over: the
    # kernel reads it in place; ragged in every dim. float8 operands (a bfloat16
    # result): the layout Hopper's FP8 MMAs want.
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * 13, 8 * 5, 40, dtype, seed=6)
    xs, wts = testing.place(OP, mesh, x, w, w_transposed=True)
    out_dtype = jnp.bfloat16 if jnp.dtype(dtype).itemsize == 1 else None
    out = testing.sharded(OP, mesh, "fused", cfg, w_transposed=True,
                          preferred_element_type=out_dtype)(xs, wts)
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(out_dtype or dtype)]


@REDUCERS
def test_float8_weight_with_float16_activations(cfg):
    # Mixed operands: an e4m3 w widened tile by tile in registers against
    # float16 x, float16 partials; ragged in every dim.
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(8 * 13, 8 * 5, 40, jnp.float16, seed=7,
                                             w_dtype=jnp.float8_e4m3fn)
    xs, ws = testing.place(OP, mesh, x, w)
    out = testing.sharded(OP, mesh, "fused", cfg)(xs, ws)
    assert out.dtype == jnp.float16
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(jnp.float16)]


def test_default_config_every_axis_size():
    for size in (1, 2, 3, 8):
        mesh = mesh_of(size)
        x, w, x64, w64 = testing.random_operands(6 * size, 5 * size, 20, jnp.float32, seed=size)
        xs, ws = testing.place(OP, mesh, x, w)
        out = testing.sharded(OP, mesh, "fused")(xs, ws)
        assert testing.relative_error(out, x64 @ w64) < 1e-5, size


def test_decode_sized_m():
    # 64 rows in total: 8 per rank, one small tile each.
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(64, 8 * 16, 48, jnp.bfloat16, seed=64)
    xs, ws = testing.place(OP, mesh, x, w)
    out = testing.sharded(OP, mesh, "fused")(xs, ws)
    assert testing.relative_error(out, x64 @ w64) < 2e-2


@REDUCERS
def test_fifty_back_to_back_calls_with_fresh_data(cfg):
    mesh = mesh_of(8)
    f = fused_fn(OP, mesh, cfg)
    for i in range(50):
        x, w, x64, w64 = testing.random_operands(8 * 3, 8 * 2, 16, jnp.float32, seed=200 + i)
        xs, ws = testing.place(OP, mesh, x, w)
        assert testing.relative_error(f(xs, ws), x64 @ w64) < 1e-5, f"call {i}"


@REDUCERS
def test_several_fused_calls_in_one_program(cfg):
    # Back to back with no host sync between them (the loop above syncs on each
    # result), so a rank may start its next call while an owner still sums this
    # one's partials: what the start barrier is for. The calls are independent.
    # Without the barrier this failed 3 runs of 5 (a rank found a later call's
    # signal, its peers timed out), mostly with reduction programs, the
    # epilogue reduction more rarely. Not a proof, a likely catch (two
    # programs a run, to keep the suite's time).
    calls = 4
    f = scaled_calls(OP, mesh_of(8), cfg, calls)
    for i in range(2):
        x, w, x64, w64 = testing.random_operands(8 * 12, 8 * 2, 32, jnp.float32, seed=300 + i)
        for c, z in enumerate(f(x, w)):
            assert testing.relative_error(z, (c + 1) * x64 @ w64) < 1e-5, (i, c)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@REDUCERS
def test_bitwise_repeatable(dtype, cfg):
    mesh = mesh_of(8)
    f = fused_fn(OP, mesh, cfg)
    x, w, _, _ = testing.random_operands(8 * 9, 8 * 4, 24, dtype, seed=9)
    xs, ws = testing.place(OP, mesh, x, w)
    first = np.asarray(f(xs, ws))
    second = np.asarray(f(xs, ws))
    assert first.tobytes() == second.tobytes()


def _tp_mlp(impl):
    def mlp(x, w1, w2):
        h = jax.nn.gelu(jax_flux.all_gather_matmul(x, w1, "tp", impl=impl))
        return jax_flux.matmul_reduce_scatter(h, w2, "tp", impl=impl)

    return jax.shard_map(mlp, mesh=mesh_of(8), in_specs=(P("tp"), P(None, "tp"), P("tp")),
                         out_specs=P("tp"))


def test_tensor_parallel_mlp_and_its_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8 * 4, 24)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((24, 64)) / 5, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((64, 24)) / 8, jnp.float32)
    g, _ = cotangent((8 * 4, 24), jnp.float32)

    def run(impl):
        def with_grad(x, w1, w2):
            out, vjp = jax.vjp(_tp_mlp(impl), x, w1, w2)
            return (out, *vjp(g))

        return [np.asarray(a, np.float64) for a in jax.jit(with_grad)(x, w1, w2)]

    dense_out, dense_vjp = jax.vjp(lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2, x, w1, w2)
    dense = [np.asarray(a, np.float64) for a in (dense_out, *dense_vjp(g))]
    for got, ref, xla in zip(run("fused"), dense, run("xla")):
        assert testing.relative_error(got, ref) < 1e-5
        assert testing.relative_error(got, xla) < 1e-5


@pytest.mark.parametrize("reducers", [1, 0], ids=["reduce_programs", "epilogue"])
def test_a_rank_that_skips_its_call_times_out_with_a_clear_error(reducers):
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16, reduce_programs=reducers,
                                    timeout_s=2.0)

    def body(x, w):
        zeros = lax.pcast(jnp.zeros((x.shape[0] // 8, w.shape[1]), x.dtype), "tp", to="varying")
        return lax.cond(lax.axis_index("tp") == 5, lambda: zeros,
                        lambda: jax_flux.matmul_reduce_scatter(x, w, "tp", impl="fused",
                                                               config=cfg))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "tp"), P("tp")),
                              out_specs=P("tp")))
    x, w, _, _ = testing.random_operands(8 * 4, 8 * 2, 16, jnp.float32)
    expect_timeout_then_recover(f, x, w, OP, mesh,
                                r"matmul_reduce_scatter\(impl='fused'\): rank \d of "
                                r"axis 'tp' gave up .* waiting for partial tile 0 "
                                r"from rank 5")


def test_without_tile_rotation():
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16, reduce_programs=2,
                                    num_programs=5, rotate=False)
    x, w, x64, w64 = testing.random_operands(8 * 13, 8 * 3, 24, jnp.float32, seed=8)
    xs, ws = testing.place(OP, mesh, x, w)
    assert testing.relative_error(fused_fn(OP, mesh, cfg)(xs, ws), x64 @ w64) < 1e-5


def test_every_call_uses_one_signal_data_split():
    # Calls with different shapes share a workspace: one call's data must never
    # overlap another call's signal words, whatever the two layouts.
    from custom_calls import ag_gemm, gemm_rs, signals

    layouts = [ag_gemm.workspace_bytes(8, m, 128, 2, c) for m in (1, 8, 300, 4096)
               for c in (1, 16, 128)]
    layouts += [gemm_rs.workspace_bytes(8, m, n, 2, bm, bn) for m in (1, 8, 1024)
                for n, bm, bn in ((16, 16, 16), (256, 16, 16), (12288, 128, 128))]
    assert {(sig, data) for sig, data, _ in layouts} == {(signals.CONTROL_BYTES,
                                                          signals.DATA_OFF)}
    with pytest.raises(ValueError, match="needs 2097152 signals"):
        gemm_rs.workspace_bytes(8, 4096, 16384, 2, 16, 16)


def test_ag_then_rs_on_one_axis_stays_exact_and_repeatable():
    # Regression: with per-call layouts, AG-GEMM data pushed into a rank's buffer
    # landed in the signal words a later GEMM-RS waits on; a garbage value >= the
    # epoch let the reduction read a partial before it arrived (about 1 call in 8;
    # the layout test above is the deterministic check). 64-wide column tiles:
    # the interpreter's time goes by tiles (16-wide ones took 88 s here).
    from jax_flux import AllGatherMatmulConfig

    mesh = mesh_of(8)
    small = dict(block_m=16, block_n=64, block_k=16)
    ag = fused_fn("all_gather_matmul", mesh,
                  AllGatherMatmulConfig(chunk_rows=16, comm_programs=1, **small))
    rs = fused_fn("matmul_reduce_scatter", mesh, MatmulReduceScatterConfig(reduce_programs=1,
                                                                           **small))
    xa, wa, _, _ = testing.random_operands(64, 128, 256, jnp.bfloat16, seed=11)
    xr, wr, xr64, wr64 = testing.random_operands(64, 128, 256, jnp.bfloat16, seed=12)
    ag_args = testing.place("all_gather_matmul", mesh, xa, wa)
    rs_args = testing.place("matmul_reduce_scatter", mesh, xr, wr)
    first = None
    for call in range(6):
        jax.block_until_ready(ag(*ag_args))
        z = np.asarray(rs(*rs_args))
        assert testing.relative_error(z, xr64 @ wr64) < 2e-2, call
        first = z if first is None else first
        assert np.array_equal(z.view(np.uint16), first.view(np.uint16)), call


@pytest.mark.parametrize("group_m", [1, 5, 8])
@pytest.mark.parametrize("reducers", [2, 0], ids=["reduce_programs", "epilogue"])
def test_grouped_tile_order_with_a_partial_group(group_m, reducers):
    """8 owners x 3 row tiles taken row-major (1), or in groups that span
    owners with a partial last group (5): every partial reaches its owner
    under the signal the owner's reduction waits for."""
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16,
                                    reduce_programs=reducers, group_m=group_m,
                                    num_programs=5 if reducers else None)
    x, w, x64, w64 = testing.random_operands(8 * 40, 8 * 3, 40, jnp.float32, seed=group_m)
    xs, ws = testing.place(OP, mesh, x, w)
    assert testing.relative_error(fused_fn(OP, mesh, cfg)(xs, ws), x64 @ w64) < 1e-5


def test_epilogue_reduction_config():
    """reduce_programs=0 is valid: no reduction programs, any grid of at least one."""
    assert MatmulReduceScatterConfig(reduce_programs=0, num_programs=2).reduce_programs == 0
    with pytest.raises(ValueError, match=r"reduce_programs must be an int >= 0, got -1"):
        MatmulReduceScatterConfig(reduce_programs=-1)
    with pytest.raises(ValueError, match=r"num_programs \(3\) must exceed reduce_programs"):
        MatmulReduceScatterConfig(reduce_programs=4, num_programs=3)


@pytest.mark.parametrize("m_own,k_local,n", [(8, 5, 40), (40, 3, 24)])
def test_the_gpu_default_config_is_right_too(m_own, k_local, n):
    """What config=None picks on a GPU runs right in the interpreter."""
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig.default(m_own, k_local, n, 8, interpreting=False)
    x, w, x64, w64 = testing.random_operands(8 * m_own, 8 * k_local, n, jnp.float32, seed=n)
    xs, ws = testing.place(OP, mesh, x, w)
    assert testing.relative_error(fused_fn(OP, mesh, cfg)(xs, ws), x64 @ w64) < 1e-5


@pytest.mark.parametrize("reducers", [2, 0], ids=["reduce_programs", "epilogue"])
def test_each_program_asks_each_owner_once_a_call_whether_it_is_idle(monkeypatch, reducers):
    # The start barrier is a round trip to the owner's memory; an owner found
    # idle stays so for the call (signals.peer_idle): at most once a program and
    # owner, not once a tile (here 56 or 64 tiles a rank, 4 programs).
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16,
                                    reduce_programs=reducers, num_programs=4)
    f = fused_fn(OP, mesh, cfg)
    x, w, x64, w64 = testing.random_operands(8 * 64, 32, 32, jnp.float32, seed=4)
    asks = count_peer_idle_asks(monkeypatch)
    out = f(*testing.place(OP, mesh, x, w))
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    gemm_programs = 4 - reducers
    owners = 8 if reducers else 7  # the epilogue sums its own tiles in place
    assert 0 < asks[0] <= 8 * gemm_programs * owners, asks[0]
