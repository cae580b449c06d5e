"""Interpreted launches whose programs run concurrently (custom_calls._program_threads)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from custom_calls import _program_threads
from custom_calls._interpreter_launch import run_interpreted
from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, testing
from tests.helpers import ag_with_gathered, equations, fused_fn, mesh_of, scaled_calls


@triton.jit
def _wait_for_the_last_program(flag_ptr, order_ptr, seen_ptr, MAX_SPINS: tl.constexpr):
    # Program 0 spins until the last program has set the flag: a wait on a
    # higher id, which only a concurrent run can satisfy. Every program records
    # when it started (a ticket).
    pid = tl.program_id(0)
    tl.store(order_ptr + pid, tl.atomic_add(flag_ptr + 1, 1, sem="acq_rel"))
    if pid == tl.num_programs(0) - 1:
        tl.atomic_xchg(flag_ptr, 1, sem="release")
    if pid == 0:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
        spins = 0
        while (seen == 0) & (spins < MAX_SPINS):
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
            spins += 1
        tl.store(seen_ptr, seen)


def _launch(programs: int = 4):
    flag = np.zeros(2, np.int32)
    order, seen = run_interpreted(
        _wait_for_the_last_program, (programs,), [flag], scalars=(),
        out_shapes=[np.zeros(programs, np.int32), np.zeros(1, np.int32)],
        input_output_aliases=(), zeroed_outputs=(), metaparams=(("MAX_SPINS", 2000),))
    return list(order), int(seen[0])


def test_the_interpreter_runs_programs_one_after_another_by_default():
    assert _program_threads.active() is None
    order, seen = _launch()
    assert order == [0, 1, 2, 3] and seen == 0  # program 0 gave up on program 3


def test_concurrent_programs_start_in_shuffled_order_and_see_each_other():
    orders = set()
    for seed in range(4):
        with _program_threads.concurrent_programs(seed=seed):
            order, seen = _launch()
        assert seen == 1, seed
        assert sorted(order) == [0, 1, 2, 3], order
        orders.add(tuple(order))
    assert len(orders) > 1 and orders != {(0, 1, 2, 3)}
    assert _program_threads.active() is None


def test_a_program_error_reaches_the_caller(monkeypatch):
    monkeypatch.setenv(_program_threads.ENV, "concurrent:3")
    assert _program_threads.active() == _program_threads.Mode(seed=3)
    with pytest.raises(Exception, match="MAX_SPINS"):  # a missing constexpr, in every program
        run_interpreted(_wait_for_the_last_program, (2,), [np.zeros(2, np.int32)], scalars=(),
                        out_shapes=[np.zeros(2, np.int32), np.zeros(1, np.int32)],
                        input_output_aliases=(), zeroed_outputs=(), metaparams=())


@pytest.mark.parametrize("value", ["concurrent:x", "threads"])
def test_a_bad_mode_in_the_environment_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(_program_threads.ENV, value)
    with pytest.raises(ValueError, match="JAX_FLUX_INTERPRETER_PROGRAMS must be"):
        _program_threads.active()


# The fused kernels with every program of a rank's launch running at once, in
# a shuffled order (what a GPU may do), against the float64 reference: the
# invariant of custom_calls/ag_gemm.py (a wait targets work that waits on
# nothing of its call, or on lower ids only) makes them right both ways.

_TILES = dict(block_m=16, block_n=16, block_k=16)
AG_CONFIGS = {
    "push": AllGatherMatmulConfig(chunk_rows=5, comm_programs=2, copy_rows=4, copy_cols=16,
                                  num_programs=5, group_m=5, **_TILES),
    "pull": AllGatherMatmulConfig(chunk_rows=5, comm_programs=2, copy_rows=4, copy_cols=16,
                                  num_programs=5, group_m=5, pull=True, **_TILES),
}
RS_CONFIGS = {
    "reduce_programs": MatmulReduceScatterConfig(reduce_programs=2, num_programs=5, **_TILES),
    # The GPU default: the own tiles' epilogue sums the peers' partials, the
    # tiles handed out by ticket (the whole grid, 4 programs a rank here, in
    # order too: there program 0 takes every tile).
    "epilogue": MatmulReduceScatterConfig(reduce_programs=0, **_TILES),
    "epilogue_unrotated_groups_of_5": MatmulReduceScatterConfig(reduce_programs=0, rotate=False,
                                                                group_m=5, **_TILES),
}


@pytest.mark.parametrize("name", list(AG_CONFIGS))
def test_ag_gemm_with_concurrent_programs(name):
    mesh = mesh_of(8)
    f = ag_with_gathered(mesh, AG_CONFIGS[name])
    with _program_threads.concurrent_programs(seed=1):
        for call in range(2):  # fresh data each call: stale rows would show
            x, w, x64, w64 = testing.random_operands(8 * 11, 20, 8 * 20, jnp.bfloat16,
                                                     seed=40 + call)
            y, xg = f(x, w)
            assert testing.relative_error(y, x64 @ w64) < testing.TOLERANCE[jnp.dtype(x.dtype)]
            for r in range(8):
                np.testing.assert_array_equal(np.asarray(xg[r], np.float64), x64)


def _grids(jaxpr) -> list:
    """The grids of the kernel launches in ``jaxpr`` (nested jaxprs included)."""
    return [eqn.params["grid"] for eqn in equations(jaxpr, ("jax_flux_triton_call",))]


@pytest.mark.parametrize("name", list(RS_CONFIGS))
def test_gemm_rs_with_concurrent_programs_is_right_and_bitwise_repeatable(name):
    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(8 * 13, 8 * 5, 24, jnp.float32)
    f = fused_fn("matmul_reduce_scatter", mesh, RS_CONFIGS[name])
    in_order = _grids(jax.make_jaxpr(f)(x, w).jaxpr)
    with _program_threads.concurrent_programs():
        concurrent = _grids(jax.make_jaxpr(f)(x, w).jaxpr)
    grid = (4,) if name.startswith("epilogue") else (5,)
    assert in_order == concurrent == [grid]  # the grid does not depend on the schedule
    outs = []
    # Fresh data back to back (schedule 1), then the last inputs again under
    # another schedule: the same bits, as the sum's order is fixed, not the schedule's.
    for seed, data in ((1, 50), (1, 51), (2, 51)):
        with _program_threads.concurrent_programs(seed=seed):
            x, w, x64, w64 = testing.random_operands(8 * 13, 8 * 5, 24, jnp.float32, seed=data)
            outs.append(np.asarray(f(*testing.place("matmul_reduce_scatter", mesh, x, w))))
        assert testing.relative_error(outs[-1], x64 @ w64) < 1e-5, (seed, data)
    assert outs[1].tobytes() == outs[2].tobytes()


def test_ag_gemm_pull_calls_back_to_back_under_long_delays():
    # A pulling rank restages its shard for its next call only once every peer
    # has finished the last one (the start barrier): a peer may still be
    # copying it. Programs started up to 20 ms late, three calls in one program
    # (no host sync between them): without that barrier 7 runs of 7 failed here
    # (a later call's rows read, or its signal found), while the in-order runs
    # of tests/test_fused_ag_gemm.py passed.
    cfg = AllGatherMatmulConfig(chunk_rows=1, comm_programs=1, copy_rows=16, copy_cols=16,
                                pull=True, **_TILES)
    f = scaled_calls("all_gather_matmul", mesh_of(8), cfg, 3)
    x, w, x64, w64 = testing.random_operands(8 * 4, 16, 16, jnp.float32, seed=7)
    with _program_threads.concurrent_programs(seed=0, max_delay_s=0.02):
        outs = f(x, w)
        for c, y in enumerate(outs):
            assert testing.relative_error(y, (c + 1) * x64 @ w64) < 1e-5, c


# Only some programs of a launch running at a time: on a GPU another stream's
# kernel (NCCL's, say) may hold SMs when ours starts, so a launch's programs
# start as SMs free up. Work that peers wait for (AG-GEMM's communication, the
# partials of GEMM-RS's epilogue reduction) goes by ticket to the programs
# that run (signals.take_ticket), so the kernels finish with any number of
# them resident. With the work tied to program ids (before the tickets),
# AG-GEMM, push and pull, ran out its timeout here with 1 resident program of
# 5 (a GEMM program that started first spun on rows its rank's communication
# programs, not started, had to send), and so did the epilogue reduction with
# 1 of 4 (an own tile waiting for a peer's partial whose program had not
# started); with 2 of 4 it passed by the draw.
RESIDENT_CASES = ([("all_gather_matmul", name, AG_CONFIGS[name], 1) for name in AG_CONFIGS] +
                  [("matmul_reduce_scatter", name, RS_CONFIGS[name], r)
                   for name, r in (("reduce_programs", 2), ("epilogue", 1), ("epilogue", 2))])


@pytest.mark.parametrize("op,name,config,resident", RESIDENT_CASES,
                         ids=[f"{c[1]}-{c[3]}_resident" for c in RESIDENT_CASES])
def test_fused_kernels_finish_with_only_some_programs_resident(op, name, config, resident):
    mesh = mesh_of(8)
    f = fused_fn(op, mesh, dataclasses.replace(config, timeout_s=30.0))
    m, k, n = (8 * 11, 20, 8 * 20) if op == "all_gather_matmul" else (8 * 13, 8 * 5, 24)
    for call in range(2):  # back to back: the tickets start again at 0
        x, w, x64, w64 = testing.random_operands(m, k, n, jnp.float32, seed=60 + call)
        with _program_threads.concurrent_programs(seed=call, resident=resident):
            out = f(*testing.place(op, mesh, x, w))
        assert testing.relative_error(out, x64 @ w64) < 1e-5, (name, resident, call)


def test_resident_programs_in_the_environment(monkeypatch):
    monkeypatch.setenv(_program_threads.ENV, "concurrent:4:2")
    assert _program_threads.active() == _program_threads.Mode(seed=4, resident=2)
    for bad in ("concurrent:4:0", "concurrent:4:2:1", "concurrent::2"):
        monkeypatch.setenv(_program_threads.ENV, bad)
        with pytest.raises(ValueError, match="resident programs, at least 1"):
            _program_threads.active()
