"""How a fused call that gave up waiting for a peer reaches the user.

Every wait in a fused kernel is bounded (``config.timeout_s``). A wait that
runs out writes what it waited for into the call's status output and, the
first time on its rank, into the rank's error record (host memory the device
writes: ``jax_flux.workspace``). A set record stays set until
``jax_flux.workspace.reset()``: later calls on that rank fail fast instead of
waiting out their timeouts again, and the outputs that depended on data that
never arrived are NaN, never plausible stale values.

How the failure is reported (``JAX_FLUX_STATUS_CHECK``, read when a fused
call is traced):

* ``"sync"`` (default on the CPU, where it costs nothing): each fused call
  checks its status and raises ``PeerTimeoutError`` from the running program.
  On a GPU this is a ``lax.cond`` on the status word, and XLA's GPU
  conditional copies its predicate to the host and blocks the host until the
  device gets there (``ConditionalThunk::ExecuteOnStream``): one host-device
  synchronisation per fused call, and the host can no longer queue work ahead.
  Use it on GPUs to debug.
* ``"async"`` (default on GPUs): no per-call check. A watchdog thread polls
  the error records of this process's ranks every
  ``JAX_FLUX_WATCHDOG_INTERVAL_S`` (1 s) with plain host reads, no CUDA call,
  and on a failure logs the message (logger ``jax_flux``), then acts on
  ``JAX_FLUX_ON_PEER_TIMEOUT``: ``"abort"`` (default; exit the process with
  code ``EXIT_CODE`` after printing the message, as NCCL's watchdog does: a
  peer that never arrived means the job is lost) or ``"log"`` (keep running;
  ``check()`` raises the recorded failures, e.g. after each step).

The protocol state after a timeout is out of step on every rank of the axis;
``jax_flux.workspace.reset()`` (in every process, with no kernel running)
clears it and the records.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Hashable

import numpy as np

from custom_calls import signals
from custom_calls.binding import PeerTimeoutError

EXIT_CODE = 70  # EX_SOFTWARE: what an aborting watchdog exits with
_MODES = ("sync", "async")
_ACTIONS = ("abort", "log")
_OPS = {
    signals.AG_PEER_IDLE.value: "all_gather_matmul",
    signals.WAIT_ROWS.value: "all_gather_matmul",
    signals.WAIT_PARTIAL.value: "matmul_reduce_scatter",
    signals.RS_PEER_IDLE.value: "matmul_reduce_scatter",
}

log = logging.getLogger("jax_flux")


def status_check(interpreting: bool) -> str:
    """The status check mode for calls traced now: ``$JAX_FLUX_STATUS_CHECK`` or the
    default ("sync" for interpreted kernels, "async" for compiled ones)."""
    mode = os.environ.get("JAX_FLUX_STATUS_CHECK", "").strip().lower()
    if not mode:
        return "sync" if interpreting else "async"
    if mode not in _MODES:
        raise ValueError(f"JAX_FLUX_STATUS_CHECK must be one of {_MODES}, got {mode!r}")
    return mode


def _action() -> str:
    action = os.environ.get("JAX_FLUX_ON_PEER_TIMEOUT", "abort").strip().lower()
    if action not in _ACTIONS:
        raise ValueError(f"JAX_FLUX_ON_PEER_TIMEOUT must be one of {_ACTIONS}, got {action!r}")
    return action


def _interval_s() -> float:
    value = os.environ.get("JAX_FLUX_WATCHDOG_INTERVAL_S", "1")
    try:
        interval = float(value)
    except ValueError:
        interval = -1.0
    if not 0 < interval <= 3600:
        raise ValueError(f"JAX_FLUX_WATCHDOG_INTERVAL_S must be in (0, 3600] seconds, "
                         f"got {value!r}")
    return interval


def describe(words, *, axis_name: Hashable, op: str | None = None,
             timeout_s: float | None = None) -> str:
    """The message for a nonzero status or error record
    ``[code, rank, peer, index, epoch, seen]`` (``custom_calls.signals``)."""
    code, rank, peer, index, epoch, seen = (int(v) for v in words[: signals.STATUS_WORDS])
    reset = ("call jax_flux.workspace.reset() in every process before the next fused call")
    if code == signals.EARLIER_FAILURE.value:
        earlier = _OPS.get(index, "fused call")
        return (f"{op or 'a fused call'}(impl='fused'): rank {rank} of axis {axis_name!r} did "
                f"not run: an earlier {earlier} on this rank failed waiting for rank {peer} "
                f"and left the workspace out of step; {reset}.")
    idle = code in (signals.AG_PEER_IDLE.value, signals.RS_PEER_IDLE.value)
    what = {
        signals.WAIT_ROWS.value: f"row chunk {index} of rank {peer}",
        signals.WAIT_PARTIAL.value: f"partial tile {index} from rank {peer}",
    }.get(code, f"rank {peer} to finish its previous fused call" if idle
          else f"signal {index} of rank {peer} (code {code})")
    name = op or _OPS.get(code, "a fused call")
    if seen > epoch:
        found = f"rank {peer} finished call {seen}" if idle else f"epoch {seen} from rank {peer}"
        expected = epoch + 1 if idle else epoch
        return (f"{name}(impl='fused'): rank {rank} of axis {axis_name!r} is at call "
                f"{expected} but found {found}: the ranks' fused calls are out of step (a rank "
                f"skipped or repeated a call, or an earlier failure was not reset); {reset}.")
    after = f"after about {timeout_s:g} s " if timeout_s is not None else ""
    return (f"{name}(impl='fused'): rank {rank} of axis {axis_name!r} gave up {after}waiting "
            f"for {what} (epoch {epoch}). Every rank of the axis must make the same fused calls "
            f"in the same order (a peer that is only slow needs a larger timeout_s in the op's "
            f"config). The workspace is now out of step: {reset}.")


def _failed_records() -> list[tuple[int, str]]:
    """(record address, message) of every set error record of this process."""
    from jax_flux import workspace

    found = []
    for ws, record in workspace.records():
        words = _snapshot(record)
        if words[0] != 0:
            found.append((record.host_ptr, describe(words, axis_name=ws.key[1])))
    return found


def _snapshot(record) -> np.ndarray:
    """The record's words, read until two reads agree once its code is set (the
    device writes the fields, a system-scope fence, then the code, with plain
    stores: signals.wait_epoch)."""
    words = np.array(record.words())
    for _ in range(100):
        if words[0] == 0:
            break
        time.sleep(1e-3)
        again = np.array(record.words())
        if np.array_equal(again, words):
            break
        words = again
    return words


def failures() -> list[str]:
    """The recorded failure of every rank of this process whose fused calls failed
    since the last ``jax_flux.workspace.reset()`` (host reads; no device sync)."""
    return [message for _, message in _failed_records()]


def check() -> None:
    """Raises ``PeerTimeoutError`` if a fused call of this process has failed.

    Reads the error records now (host memory; no device synchronisation). A
    call still running has not reported yet: call it after the step's outputs
    are ready (``jax.block_until_ready``) to cover them.
    """
    messages = sorted(set(failures()))
    if messages:
        more = f" ({len(messages) - 1} more ranks failed too)" if len(messages) > 1 else ""
        raise PeerTimeoutError(messages[0] + more)


class _Watchdog:
    """A daemon thread that polls the error records, reports each failed rank
    once (log + ``reports``), then acts (``abort`` or ``log``).

    Its interval and action are read from the environment when it starts.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reported: set[int] = set()
        self._generation = 0  # bumped by every reset
        self.reports: list[str] = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the thread unless it runs; a bad setting raises ValueError here."""
        with self._lock:
            if self.running:
                return
            interval, action = _interval_s(), _action()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(interval, action, self._stop),
                                            name="jax_flux-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the thread (a later async-mode trace starts it again)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join()

    def forget(self) -> None:
        """Called on workspace reset: records are zero again."""
        with self._lock:
            self._reported.clear()
            self._generation += 1

    def poll(self) -> list[str]:
        """New failures since the last poll (each rank's record reported once)."""
        new = []
        with self._lock:
            generation = self._generation
        # Not under self._lock: reset() holds the workspace's lock, then takes this one.
        failed = _failed_records()
        with self._lock:
            if generation != self._generation:  # a reset came in between: read again later
                return []
            for address, message in failed:
                if address not in self._reported:
                    self._reported.add(address)
                    self.reports.append(message)
                    new.append(message)
        return new

    def _run(self, interval: float, action: str, stop: threading.Event) -> None:
        while not stop.wait(interval):
            new = self.poll()
            for message in new:
                log.error("%s", message)
            if new and action == "abort":
                sys.stderr.write(f"jax_flux watchdog: {new[0]}\njax_flux watchdog: aborting the "
                                 f"process (exit code {EXIT_CODE}; JAX_FLUX_ON_PEER_TIMEOUT=log "
                                 f"keeps it running)\n")
                sys.stderr.flush()
                os._exit(EXIT_CODE)


watchdog = _Watchdog()

__all__ = ["EXIT_CODE", "PeerTimeoutError", "check", "describe", "failures", "status_check",
           "watchdog"]
