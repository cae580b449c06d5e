"""What the per-call peer-timeout check costs: the fused ops' status check, alone.

    python -m benchmarks.status_check --out benchmarks/results/gpu     # on a GPU
    python -m benchmarks.status_check --quick                          # CPU smoke run

With ``JAX_FLUX_STATUS_CHECK=sync`` every fused call on CUDA is followed by
``custom_calls.binding.check_status``: a ``lax.cond`` on the status word whose
true branch raises through a host callback. XLA's GPU conditional copies its
predicate to the host and blocks until the device gets there
(``ConditionalThunk::ExecuteOnStream``), so each call adds a device-to-host
read and a host synchronisation, and the host can no longer run ahead of the
GPU. That is why the default on GPUs is ``async`` (``jax_flux.errors``: no
per-call check, a watchdog thread reads the error records). This times a chain
of ``n`` small matmuls (a stand-in for a layer's fused calls) with and
without a check after each, in one process: ``per_check_us`` is what the sync
mode costs per fused call. A second table times the same chain made of real
fused calls (``all_gather_matmul``, world size 1) traced in each mode:
``status_check_fused``, ``per_call_us`` = (sync - async) / calls.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jax_flux
from benchmarks import harness
from custom_calls import signals
from custom_calls.binding import check_status

COLUMNS = ["calls", "size", "plain_ms", "checked_ms", "per_check_us"]
FUSED_COLUMNS = ["calls", "size", "sync_ms", "async_ms", "per_call_us"]


def chain(n: int, checked: bool):
    def f(x, w):
        for _ in range(n):
            x = jnp.tanh(x @ w)
            if checked:
                status = (jnp.zeros((signals.STATUS_WORDS,), jnp.int32) +
                          (x[0, 0] > 1e30).astype(jnp.int32))
                check_status(status, lambda s: "unreachable")
        return x
    return jax.jit(f)


def fused_chain(n: int, mesh, mode: str, x, w):
    """A jitted chain of ``n`` fused AG-GEMMs (world size 1), traced (and warmed
    up) with ``JAX_FLUX_STATUS_CHECK=mode``."""
    def body(x, w):
        for _ in range(n):
            x = jax_flux.all_gather_matmul(x, w, "tp", impl="fused")
        return x

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P()), out_specs=P("tp")))
    before = os.environ.get("JAX_FLUX_STATUS_CHECK")
    os.environ["JAX_FLUX_STATUS_CHECK"] = mode
    try:
        jax.block_until_ready(f(x, w))  # traced now, in this mode
    finally:
        if before is None:
            os.environ.pop("JAX_FLUX_STATUS_CHECK")
        else:
            os.environ["JAX_FLUX_STATUS_CHECK"] = before
    return f


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
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("tp",))
    fused_rows = []
    for size in ([32] if a.quick else [1024, 4096]):
        x = jax.device_put(jnp.ones((size, size), jnp.bfloat16) / size, device)
        w = jax.device_put(jnp.eye(size, dtype=jnp.bfloat16), device)
        for n in ([2] if a.quick else counts):
            sync = harness.time_fn(fused_chain(n, mesh, "sync", x, w), (x, w), reps=reps)
            asyn = harness.time_fn(fused_chain(n, mesh, "async", x, w), (x, w), reps=reps)
            row = {"calls": n, "size": size, "sync_ms": round(sync.median_ms, 4),
                   "async_ms": round(asyn.median_ms, 4),
                   "per_call_us": round((sync.median_ms - asyn.median_ms) / n * 1e3, 2)}
            fused_rows.append(row)
            print(harness.format_row(row, FUSED_COLUMNS), flush=True)
    harness.write_report(
        os.path.join(a.out, "status_check_fused"),
        "Fused calls with the sync status check against the async one (world size 1)",
        harness.environment([device]), fused_rows, FUSED_COLUMNS,
        ["A chain of `calls` all_gather_matmul(impl='fused') of `size`^2 bf16 on one device, "
         "traced with JAX_FLUX_STATUS_CHECK=sync (a lax.cond on each call's status) and =async "
         "(none; jax_flux.errors' watchdog reads the error records); median of "
         "device-synchronised runs."],
        on_gpu=on_gpu)
    harness.write_report(
        os.path.join(a.out, "status_check"), "Cost of the per-call peer-timeout check",
        harness.environment([device]), rows, COLUMNS,
        ["A chain of `calls` bf16 matmuls of `size`^2, with and without "
         "custom_calls.binding.check_status after each; median of device-synchronised runs."],
        on_gpu=on_gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
