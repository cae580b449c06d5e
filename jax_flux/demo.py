"""Quickstart demo: both ops, every available impl, checked against the reference.

    python -m jax_flux.demo [--m 512 --k 256 --n 384 --dtype bfloat16]

Runs on the local GPUs when JAX has them, otherwise on 8 emulated CPU devices
(Triton kernels then run through Triton's interpreter). Each row: the op in
its global view X[M, K] @ W[K, N] (see jax_flux.testing), its relative error
against a float64 host reference and against the lax collective (impl xla)
run in the same shard_map, and the median time of a few calls. CPU times say
nothing about GPU speed.
"""

from __future__ import annotations

import os

# Must precede the first import of jax; it only adds CPU devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_flux import testing  # noqa: E402


def _median_ms(fn, args, reps: int) -> float:
    fn(*args).block_until_ready()  # warm-up: compile and first launch
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, default=256, help="global rows M (divisible by #devices)")
    p.add_argument("--k", type=int, default=128, help="contraction K (divisible by #devices)")
    p.add_argument("--n", type=int, default=192, help="global columns N (divisible by #devices)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--precision", default=None, choices=["default", "high", "highest"],
                   help="the ops' precision (float32 on GPUs: tensorfloat32 unless highest)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    devices = gpus or jax.devices("cpu")[:8]
    where = f"{len(devices)} x {devices[0].device_kind}" + ("" if gpus else " (emulated CPU devices)")
    mesh = testing.mesh(devices)
    dtype = jnp.dtype(args.dtype)
    # float32 on GPUs runs tensorfloat32 (XLA's dot and the fused kernels alike)
    # unless --precision highest.
    tol = testing.tolerance(dtype, precision=args.precision, platform=devices[0].platform)
    x, w, x64, w64 = testing.random_operands(args.m, args.k, args.n, dtype)
    ref = x64 @ w64
    print(f"jax_flux demo on {where}; X[{args.m}, {args.k}] @ W[{args.k}, {args.n}] {dtype.name}")
    header = f"{'op':<22} {'impl':<6} {'err vs f64':>11} {'err vs xla':>11} {'ms':>9}  status"
    print(header)
    print("-" * len(header))
    failed = 0
    for op in testing.OPS:
        xs, ws = testing.place(op, mesh, x, w)
        xla_out = np.asarray(testing.sharded(op, mesh, "xla", precision=args.precision)(xs, ws),
                             np.float64)
        for impl in ("xla", "ring", "fused", "auto"):
            fn = testing.sharded(op, mesh, impl, precision=args.precision)
            out = fn(xs, ws)
            err = testing.relative_error(out, ref)
            err_xla = testing.relative_error(out, xla_out)
            ok = err < tol and err_xla < tol
            failed += not ok
            ms = _median_ms(fn, (xs, ws), args.reps)
            print(f"{op:<22} {impl:<6} {err:>11.2e} {err_xla:>11.2e} {ms:>9.2f}  "
                  f"{'ok' if ok else f'FAIL (tolerance {tol:g})'}")
    print("all results within tolerance" if not failed else f"{failed} result(s) out of tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
