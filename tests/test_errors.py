"""How a fused call that gives up on a peer is reported (jax_flux.errors).

CPU, 8 emulated devices, the real kernels through the interpreter. A rank
that skips a call (a ``lax.cond`` around the op) makes every other rank time
out; checked: the synchronous check raises, the error records stay set and
later calls fail fast until ``workspace.reset()``, ranks found out of step
fail at once, the asynchronous mode reports through the records and the
watchdog (log, or exit the process), and data that never arrived is NaN.
"""

import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_flux
from custom_calls import signals
from jax_flux import errors, testing, workspace
from jax_flux.config import AllGatherMatmulConfig, MatmulReduceScatterConfig
from tests.helpers import fused_fn, mesh_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = 3
M, K, N = 64, 16, 32  # global; 8 rows per rank


# Short, but not so short that a peer merely late to its launch (a GIL or GC
# pause of the emulated ranks' threads) times out first: with 0.25 s of the
# host's clock, 3 runs of this file's error tests in 4 once saw that (a later
# check, the file alone, passed 6 of 6: load-dependent, the cause not found).
TIMEOUT_S = 2.0


def _config(op: str, timeout_s: float = TIMEOUT_S):
    if op == "all_gather_matmul":
        return AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=8,
                                     timeout_s=timeout_s)
    return MatmulReduceScatterConfig(block_m=8, block_n=16, block_k=16, timeout_s=timeout_s)


def _skipping(op: str, mesh, skip_rank: int = SKIPPED, extra_rank: int | None = None):
    """The global-view op where ``skip_rank`` skips its call (returns zeros) and
    ``extra_rank`` makes a second call the others do not make."""
    in_specs, out_spec = testing._SPECS[op]
    cfg = _config(op)

    def body(x, w):
        rank = lax.axis_index("tp")
        rows = 8 * x.shape[0] if op == "all_gather_matmul" else x.shape[0] // 8
        zeros = lax.pcast(jnp.zeros((rows, w.shape[1]), x.dtype), "tp", to="varying")
        call = lambda: testing.OPS[op](x, w, "tp", impl="fused", config=cfg)  # noqa: E731
        y = lax.cond(rank == skip_rank, lambda: zeros, call)
        if extra_rank is not None:
            y = y + lax.cond(rank == extra_rank, call, lambda: zeros)
        return y

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec))


def _operands(op: str, mesh):
    x, w, _, _ = testing.random_operands(M, K, N, jnp.float32)
    return x, w, testing.place(op, mesh, x, w)


def _normal(op: str, mesh):
    return fused_fn(op, mesh, _config(op))


def _assert_exact(op, mesh, x, w, xs, ws):
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert testing.relative_error(_normal(op, mesh)(xs, ws), ref) < 1e-5


@pytest.fixture
def clean():
    workspace.reset()
    yield
    errors.watchdog.stop()
    workspace.reset()


def test_describe_names_every_failure():
    d = dict(axis_name="tp", timeout_s=2.0)
    assert "gave up after about 2 s waiting for row chunk 1 of rank 3 (epoch 7)" in \
        errors.describe([2, 0, 3, 1, 7, 6], op="all_gather_matmul", **d)
    assert "partial tile 4 from rank 5" in errors.describe([3, 1, 5, 4, 2, 0], **d)
    assert errors.describe([4, 1, 5, 0, 2, 1], axis_name="tp").startswith(
        "matmul_reduce_scatter(impl='fused'): rank 1 of axis 'tp' gave up waiting for rank 5 "
        "to finish its previous fused call")
    ahead = errors.describe([1, 2, 6, 0, 4, 5], axis_name="tp")
    assert "rank 2 of axis 'tp' is at call 5 but found rank 6 finished call 5" in ahead
    assert "out of step" in ahead
    assert "found epoch 9 from rank 1" in errors.describe([2, 0, 1, 0, 8, 9], axis_name="tp")
    earlier = errors.describe([5, 2, 3, 2, 9, 0], op="matmul_reduce_scatter", axis_name="tp")
    assert "did not run: an earlier all_gather_matmul on this rank failed waiting for rank 3" \
        in earlier
    for words in ([1, 0, 1, 0, 1, 0], [5, 0, 1, 3, 1, 0]):
        assert "jax_flux.workspace.reset()" in errors.describe(words, axis_name="tp")


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_sync_check_raises_then_later_calls_fail_fast_until_reset(op, clean):
    mesh = mesh_of(8)
    x, w, (xs, ws) = _operands(op, mesh)
    # Raised in a host callback, it reaches the caller as XLA's runtime error
    # carrying the PeerTimeoutError and its message.
    f = _skipping(op, mesh)
    f.lower(xs, ws).compile()
    start = time.perf_counter()
    with pytest.raises(Exception, match=r"PeerTimeoutError: .* gave up after about 2 s"):
        jax.block_until_ready(f(xs, ws))
    # The waits are timed by a clock (the host's, standing in for the GPU's
    # timer), so the message's 2 s is what they waited: at least that, and
    # not a multiple of it (bounded generously: the launch runs interpreted).
    assert TIMEOUT_S <= time.perf_counter() - start < 30
    # Every rank but the skipped one recorded its failure; the skipped one did not run.
    failed = errors.failures()
    assert len(failed) == 7 and all(f"rank {SKIPPED}" in m for m in failed), failed
    assert not any(f"rank {SKIPPED} of axis" in m for m in failed), failed
    with pytest.raises(jax_flux.PeerTimeoutError):
        errors.check()
    # Without a reset the next call does not wait out its timeout again: the
    # ranks with a record fail fast, the skipped rank finds its peers ahead.
    with pytest.raises(Exception, match=r"did not run: an earlier|out of step"):
        jax.block_until_ready(_normal(op, mesh)(xs, ws))
    workspace.reset()
    assert errors.failures() == []
    errors.check()
    _assert_exact(op, mesh, x, w, xs, ws)


def test_ranks_out_of_step_fail_at_once(clean):
    op = "all_gather_matmul"
    mesh = mesh_of(8)
    x, w, (xs, ws) = _operands(op, mesh)
    # Rank 5 makes one call more than the others: it times out waiting for them.
    with pytest.raises(Exception, match=r"rank 5 of axis 'tp' gave up"):
        jax.block_until_ready(_skipping(op, mesh, skip_rank=-1, extra_rank=5)(xs, ws))
    # In the next call the others are at call 2 and find rank 5 has finished
    # call 2 already: an error at once, not after a timeout.
    with pytest.raises(Exception, match="PeerTimeoutError"):
        jax.block_until_ready(_normal(op, mesh)(xs, ws))
    # (Rank 5 itself failed fast: its record holds its timeout. It may even have
    # finished its call 3 before a slower rank looked.) A rank that found rank 5
    # ahead ends its call 2 at once, so a slower rank may find that one first:
    # the first to fail names rank 5, later ones any rank that has failed.
    ahead = [re.search(r"rank ([0-7]) of axis 'tp' is at call 2 but found rank ([0-7]) finished "
                       r"call ([23]): the ranks' fused calls are out of step", m)
             for m in errors.failures()]
    ahead = [m.groups() for m in ahead if m]
    assert sorted(int(me) for me, _, _ in ahead) == [0, 1, 2, 3, 4, 6, 7], errors.failures()
    failed = {me for me, _, _ in ahead}  # a rank named ahead at call 2 is one that failed it
    assert all(me != peer and (peer == "5" or (call == "2" and peer in failed))
               for me, peer, call in ahead), ahead
    assert any(peer == "5" for _, peer, _ in ahead), ahead
    workspace.reset()
    _assert_exact(op, mesh, x, w, xs, ws)


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_async_mode_reports_through_the_watchdog(op, clean, monkeypatch, caplog):
    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    monkeypatch.setenv("JAX_FLUX_ON_PEER_TIMEOUT", "log")
    monkeypatch.setenv("JAX_FLUX_WATCHDOG_INTERVAL_S", "0.05")
    mesh = mesh_of(8)
    x, w, (xs, ws) = _operands(op, mesh)
    reports_before = len(errors.watchdog.reports)
    with caplog.at_level("ERROR", logger="jax_flux"):
        out = np.asarray(_skipping(op, mesh)(xs, ws))  # no exception from the program
        assert errors.watchdog.running
        deadline = time.monotonic() + 30

        def logged():
            return sum("jax_flux" == r.name and "gave up" in r.getMessage()
                       for r in caplog.records)

        # The watchdog records a failure, then logs it: wait for both.
        while ((len(errors.watchdog.reports) < reports_before + 7 or logged() < 7) and
               time.monotonic() < deadline):
            time.sleep(0.05)
    new = errors.watchdog.reports[reports_before:]
    assert len(new) == 7 and all("waiting for " in m and f"rank {SKIPPED}" in m for m in new)
    assert logged() == 7
    with pytest.raises(jax_flux.PeerTimeoutError, match=r"\(6 more ranks failed too\)"):
        errors.check()
    # What never arrived is NaN, not a plausible product of stale data.
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if op == "all_gather_matmul":
        cols = N // 8
        for r in range(8):
            block, want = out[:, r * cols:(r + 1) * cols], ref[:, r * cols:(r + 1) * cols]
            if r == SKIPPED:
                assert not block.any()
                continue
            rows = slice(SKIPPED * 8, SKIPPED * 8 + 8)
            assert np.isnan(block[rows]).all()
            rest = np.delete(np.arange(M), np.arange(M)[rows])
            np.testing.assert_allclose(block[rest], want[rest], rtol=1e-5, atol=1e-5)
    else:
        for r in range(8):
            block = out[r * 8:(r + 1) * 8]
            assert (not block.any()) if r == SKIPPED else np.isnan(block).all()
    workspace.reset()
    errors.check()
    _assert_exact(op, mesh, x, w, xs, ws)
    assert len(errors.watchdog.reports) == reports_before + 7  # nothing new after the reset


def test_bad_settings_are_rejected_when_traced(monkeypatch):
    mesh = mesh_of(8)
    _, _, (xs, ws) = _operands("all_gather_matmul", mesh)
    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "sometimes")
    with pytest.raises(ValueError, match="JAX_FLUX_STATUS_CHECK must be one of"):
        _normal("all_gather_matmul", mesh).lower(xs, ws)
    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    monkeypatch.setenv("JAX_FLUX_ON_PEER_TIMEOUT", "ignore")
    errors.watchdog.stop()
    with pytest.raises(ValueError, match="JAX_FLUX_ON_PEER_TIMEOUT must be one of"):
        _normal("all_gather_matmul", mesh).lower(xs, ws)
    monkeypatch.setenv("JAX_FLUX_ON_PEER_TIMEOUT", "log")
    monkeypatch.setenv("JAX_FLUX_WATCHDOG_INTERVAL_S", "0")
    with pytest.raises(ValueError, match="JAX_FLUX_WATCHDOG_INTERVAL_S"):
        _normal("all_gather_matmul", mesh).lower(xs, ws)
    assert not errors.watchdog.running


_ABORT_SCRIPT = """
import jax, numpy as np
import tests.conftest  # 8 CPU devices, the interpreter
from tests.test_errors import _skipping, _operands
from tests.helpers import fused_fn, mesh_of
mesh = mesh_of(8)
_, _, (xs, ws) = _operands("all_gather_matmul", mesh)
out = np.asarray(_skipping("all_gather_matmul", mesh)(xs, ws))
print("program returned", flush=True)
import time; time.sleep(60)
print("still alive", flush=True)
"""


def test_async_mode_aborts_the_process_by_default():
    env = dict(os.environ, JAX_FLUX_STATUS_CHECK="async", JAX_FLUX_ON_PEER_TIMEOUT="abort",
               JAX_FLUX_WATCHDOG_INTERVAL_S="0.1", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", _ABORT_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == errors.EXIT_CODE, (r.returncode, r.stdout, r.stderr[-3000:])
    # (It may end the process before the program has returned: it acts on the
    # first record it sees.)
    assert "still alive" not in r.stdout
    assert "jax_flux watchdog: all_gather_matmul(impl='fused'): rank" in r.stderr
    assert f"waiting for row chunk 0 of rank {SKIPPED}" in r.stderr
    assert "aborting the process" in r.stderr


def test_error_record_layout_matches_the_kernels():
    assert signals.RECORD_WORDS >= signals.STATUS_WORDS
    codes = [signals.AG_PEER_IDLE, signals.WAIT_ROWS, signals.WAIT_PARTIAL, signals.RS_PEER_IDLE,
             signals.EARLIER_FAILURE]
    assert len({c.value for c in codes}) == len(codes) and 0 not in {c.value for c in codes}
    mesh = mesh_of(8)
    _, _, (xs, ws) = _operands("all_gather_matmul", mesh)
    jax.block_until_ready(_normal("all_gather_matmul", mesh)(xs, ws))
    recs = [r for _, r in workspace.records()]
    assert len(recs) >= 8 and all(r.host_ptr % 32 == 0 for r in recs)
    assert not any(np.asarray(r.words()).any() for r in recs)
