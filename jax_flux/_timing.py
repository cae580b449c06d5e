"""Per-call wall time of a JAX function, shared by the autotuner and the benchmarks."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence


def sample_ms(fn: Callable, args: Sequence, *, warmup: int = 2, reps: int = 10,
              min_sample_ms: float = 5.0) -> tuple[list[float], int]:
    """(``reps`` per-call times in ms, calls per sample) of ``fn(*args)``.

    A sample is a batch of back-to-back calls, synchronised once on the last
    one's outputs (a device runs them in order, so it has run them all), and
    counts as the batch's time over its size. The batch is as many calls as
    take ``min_sample_ms`` by the last warm-up call's time, so a short kernel's
    time is not the host's dispatch and synchronisation latency (tens of
    microseconds a call, as long as a decode GEMM runs) while a long one is
    still timed call by call. At least one warm-up call (compilation, first
    launch, lazy loading) is excluded.
    """
    import jax

    one_ms = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        one_ms = (time.perf_counter() - t0) * 1e3
    batch = max(1, min(1000, math.ceil(min_sample_ms / max(one_ms, 1e-3))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batch - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - t0) * 1e3 / batch)
    return samples, batch
