"""The programs of an interpreted launch run at once, each on its own thread, as on a GPU.

Triton's interpreter runs a launch's programs one after another in program-id
order. A fused kernel must be right both that way and as a GPU runs it, the
programs of its grid at once (all, or as many as have SMs), started in no particular order
(``custom_calls/ag_gemm.py`` states the invariant). Sequential runs alone
cannot show the second: a program that reads what another program of its
launch writes, without waiting for it, passes in the interpreter whenever the
writer has the lower id, and reads stale data on a GPU.

In this mode a launch starts one thread per program, in a shuffled order, each
after a random delay (both drawn from a seeded generator, per launch), and
returns when all have finished, so the programs of a rank interleave with each
other and with the other ranks' at the GIL's switches (the shim shortens the
switch interval). The interpreter's memory is the host's, so this shows
ordering (who waits for whom), not the GPU's memory model (fences, scopes).

With ``resident=R``, at most R programs of a launch run at a time (each
holds its slot until it ends), as on a GPU where another stream's kernel
holds SMs when ours starts: which programs run first is the start order's
draw, and the rest start as those end.

Use ``concurrent_programs()`` around the calls, or set
``JAX_FLUX_INTERPRETER_PROGRAMS=concurrent`` (``concurrent:<seed>``,
``concurrent:<seed>:<resident>``) for a whole process, e.g. a test file. The
mode is read when a launch starts; the kernels' grids do not depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import os
import random
import threading
import time

from custom_calls import _interpreter_shim

ENV = "JAX_FLUX_INTERPRETER_PROGRAMS"
# A program's start is delayed by up to this (uniformly drawn): long enough for
# a later-started program, a higher id included, to run first.
MAX_DELAY_S = 2e-3


@dataclasses.dataclass(frozen=True)
class Mode:
    """How interpreted launches run their programs: each launch draws its start
    order and delays from ``seed`` and the process's launch count (which launch
    of the concurrently launching ranks gets which count follows their threads'
    timing: a seed picks a family of schedules, not one schedule)."""

    seed: int = 0
    max_delay_s: float = MAX_DELAY_S
    resident: int | None = None  # programs of a launch running at once (None: all)

    def __post_init__(self):
        if self.resident is not None and self.resident < 1:
            raise ValueError(f"resident must be at least 1 program, got {self.resident}")


_lock = threading.Lock()
_mode: Mode | None = None
_launches = itertools.count()
_installed = False


def _from_env() -> Mode | None:
    value = os.environ.get(ENV, "").strip()
    if value in ("", "sequential"):
        return None
    name, *numbers = value.split(":")
    if name != "concurrent" or len(numbers) > 2 or not all(n.isdigit() for n in numbers) or (
            len(numbers) == 2 and int(numbers[1]) < 1):
        raise ValueError(f"{ENV} must be 'sequential', 'concurrent', 'concurrent:<seed>' or "
                         f"'concurrent:<seed>:<resident programs, at least 1>', got {value!r}")
    seed = int(numbers[0]) if numbers else 0
    return Mode(seed=seed, resident=int(numbers[1]) if len(numbers) == 2 else None)


def active() -> Mode | None:
    """The mode new launches use (None: sequential, the interpreter's own loop)."""
    with _lock:
        return _mode if _mode is not None else _from_env()


@contextlib.contextmanager
def concurrent_programs(seed: int = 0, max_delay_s: float = MAX_DELAY_S,
                        resident: int | None = None):
    """Within the block, interpreted launches run their programs concurrently
    (at most ``resident`` of a launch at a time, if given)."""
    global _mode
    install()
    with _lock:
        previous, _mode = _mode, Mode(seed=seed, max_delay_s=max_delay_s, resident=resident)
    try:
        yield
    finally:
        with _lock:
            _mode = previous


class _Programs:
    """Stands in for the kernel in the interpreter's grid loop: each call
    records a program; the last runs them all on threads and re-raises the
    first program's error (by id) once every thread has ended."""

    def __init__(self, fn, builder, mode: Mode):
        self._fn, self._builder = fn, builder
        # What the loop binds the arguments by (inspect.getcallargs).
        self.__signature__, self.__name__ = inspect.signature(fn), fn.__name__
        self._rng = random.Random(mode.seed * 1_000_003 + next(_launches))
        self._max_delay_s = mode.max_delay_s
        self._resident = mode.resident
        self._programs: list[tuple] = []

    def __call__(self, **args):
        idx, dim = tuple(self._builder.grid_idx), tuple(self._builder.grid_dim)
        self._programs.append((idx, args))
        if idx == tuple(d - 1 for d in dim):
            self._run_all(dim)

    def _run_all(self, dim: tuple) -> None:
        errors: dict[int, BaseException] = {}
        # A slot of the "GPU": held from a program's start to its end.
        slots = threading.Semaphore(self._resident or len(self._programs))

        def program(i: int, idx: tuple, args: dict, delay_s: float) -> None:
            time.sleep(delay_s)
            with slots:
                self._builder.set_grid_dim(*dim)  # thread-local fields (the shim's)
                self._builder.set_grid_idx(*idx)
                try:
                    self._fn(**args)
                except BaseException as e:  # noqa: BLE001 - re-raised on the launching thread
                    errors[i] = e

        order = list(range(len(self._programs)))
        self._rng.shuffle(order)
        threads = [threading.Thread(target=program, name=f"triton-program-{i}",
                                    args=(i, *self._programs[i],
                                          self._rng.uniform(0, self._max_delay_s)))
                   for i in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._programs.clear()
        if errors:
            raise errors[min(errors)]


def install() -> None:
    """Route the interpreter's launches through ``active()`` (idempotent)."""
    global _installed
    _interpreter_shim.install()
    with _lock:
        if _installed:
            return
        from triton.runtime import interpreter as interp

        original_call = interp.GridExecutor.__call__

        def call(self, *args, **kwargs):
            mode = active()
            if mode is None:
                return original_call(self, *args, **kwargs)
            launch = object.__new__(type(self))
            launch.__dict__.update(self.__dict__, fn=_Programs(self.fn, interp.interpreter_builder,
                                                               mode))
            return original_call(launch, *args, **kwargs)

        interp.GridExecutor.__call__ = call
        _installed = True
