"""What the per-call peer-timeout check costs: the fused ops' status check, alone.

    python -m benchmarks.status_check --out benchmarks/results/gpu     # on a GPU
    python -m benchmarks.status_check --quick                          # CPU smoke run

On CUDA every fused call is followed by ``custom_calls.binding.check_status``:
a ``lax.cond`` on the status word whose true branch raises through a host
callback. XLA's GPU conditional reads its predicate on the host, so each
call adds a device-to-host read and a stream synchronisation, and the host
can no longer run ahead of the GPU. This times a chain of ``n`` small
matmuls (a stand-in for a layer's fused calls) with and without a check after
each, in one process: ``per_check_us`` is the difference per call. If it is
large next to the fused calls' time, the check should become asynchronous.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from custom_calls.binding import check_status

COLUMNS = ["calls", "size", "plain_ms", "checked_ms", "per_check_us"]


def chain(n: int, checked: bool):
    def f(x, w):
        for _ in range(n):
            x = jnp.tanh(x @ w)
            if checked:
                status = jnp.zeros((5,), jnp.int32) + (x[0, 0] > 1e30).astype(jnp.int32)
                check_status(status, lambda s: "unreachable")
        return x
    return jax.jit(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    sizes, counts = ([256], [4]) if a.quick else ([1024, 4096], [16, 64])
    reps = 2 if a.quick else a.reps
    rows = []
    for size in sizes:
        x = jax.device_put(jnp.ones((size, size), jnp.bfloat16) / size, device)
        w = jax.device_put(jnp.eye(size, dtype=jnp.bfloat16), device)
        for n in counts:
            plain = harness.time_fn(chain(n, False), (x, w), reps=reps).median_ms
            checked = harness.time_fn(chain(n, True), (x, w), reps=reps).median_ms
            row = {"calls": n, "size": size, "plain_ms": round(plain, 4),
                   "checked_ms": round(checked, 4),
                   "per_check_us": round((checked - plain) / n * 1e3, 2)}
            rows.append(row)
            print(harness.format_row(row, COLUMNS), flush=True)
    harness.write_report(
        os.path.join(a.out, "status_check"), "Cost of the per-call peer-timeout check",
        harness.environment([device]), rows, COLUMNS,
        ["A chain of `calls` bf16 matmuls of `size`^2, with and without "
         "custom_calls.binding.check_status after each; median of device-synchronised runs."],
        on_gpu=on_gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
