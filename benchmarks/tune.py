"""Autotunes the fused kernels on a sweep's shapes; optionally ships the winners.

    python -m benchmarks.tune --sweep gpt3-175b --dtype bfloat16          # on the GPUs here
    python -m benchmarks.tune --sweep gpt3-175b --ship                    # ... and ship them
    python -m benchmarks.tune --sweep gpt3-175b --backward                # the backward's kernels
    python -m benchmarks.tune --quick                                     # CPU smoke run

For every shape of the sweep (the same ones ``benchmarks.ops`` times), over
all devices of the default backend as one "tp" axis, ``jax_flux.autotune.tune``
verifies and times the pruned config space and records the fastest in the
user cache (``$JAX_FLUX_AUTOTUNE_CACHE`` or ~/.cache/jax_flux/autotune.json).
It also times impls xla and ring on each problem and records them beside the
fused config: ``impl="auto"`` then runs the fastest of the three there.
``--ship`` also merges those entries into ``jax_flux/tuned_defaults.json``,
the defaults every install uses for this device kind, shapes and axis size.
A CSV/markdown report lists the winner and how many candidates failed.

``--backward`` tunes the kernels a training step's backward pass launches for
each shape instead: dx of AG-GEMM is a GEMM-RS of dy with w^T, dx of GEMM-RS an
AG-GEMM of dz with w^T (k and n swapped, w read transposed in place).
``--out-dtype`` tunes for a result dtype other than the operands' (the ops'
preferred_element_type; float8 operands need it), ``--w-dtype`` for a w of
another dtype than x's (one of them float8: a float8 weight against bfloat16
activations). With ``--backward`` and float8 operands, x is the cotangent
(the result's dtype) and w the float8 weight, as the ops' backward pass
launches them. All are part of the cache key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.ops import AG, RS, sweep_shapes
from custom_calls.gemm import mma_dtype
from jax_flux import autotune, testing
from jax_flux._validate import backward_dtype, is_float8

DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"]
COLUMNS = ["op", "name", "M", "K", "N", "P", "dtype", "w_dtype", "out", "w", "best_ms",
           "xla_ms", "ring_ms", "auto", "candidates", "failed", "config", "first_failure"]


def per_rank(shape, world: int) -> tuple[int, int, int]:
    """(m_local, k, n) as ``autotune.tune`` takes them, for ``world`` ranks."""
    m, k, n = shape.global_operands(world)
    if shape.op == AG:
        return m // world, k, n // world
    return m // world, k // world, n


def backward_problem(op: str, m_local: int, k: int, n: int) -> tuple[str, int, int, int]:
    """(op, m_local, k, n) of the fused launch that computes dx in the backward
    pass of ``op`` on that per-rank problem; its w is read transposed."""
    return (RS if op == AG else AG), m_local, n, k


def ship(entries: dict, path: str = autotune.SHIPPED) -> None:
    """Merges cache entries into the shipped defaults (sorted, stable diffs)."""
    try:
        with open(path) as f:
            shipped = json.load(f)
    except FileNotFoundError:
        shipped = {}
    shipped.update(entries)
    with open(path, "w") as f:
        json.dump(shipped, f, indent=1, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default="gpt3-175b", choices=["gpt3-175b", "llama2-70b", "quick"])
    p.add_argument("--quick", action="store_true",
                   help="one tiny shape per op, one config (CPU smoke run)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="x's dtype")
    p.add_argument("--w-dtype", default=None, choices=DTYPES,
                   help="w's dtype (default: x's; they differ only where one is float8)")
    p.add_argument("--out-dtype", default=None, choices=DTYPES[:3],
                   help="result dtype (preferred_element_type); default: the operands'")
    p.add_argument("--precision", default=None, choices=["default", "high", "highest"],
                   help="the ops' precision (float32 problems are keyed by it)")
    p.add_argument("--backward", action="store_true",
                   help="tune the backward pass's launches (other op, w transposed)")
    p.add_argument("--max-configs", type=int, default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ship", action="store_true", help="merge the winners into tuned_defaults.json")
    p.add_argument("--shipped-path", default=autotune.SHIPPED, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    sweep = "quick" if a.quick else a.sweep
    max_configs = 1 if a.quick else a.max_configs
    reps = 1 if a.quick else a.reps
    devices = jax.devices()
    world = len(devices)
    mesh = testing.mesh(devices)
    dtype, w_dtype = jnp.dtype(a.dtype), jnp.dtype(a.w_dtype or a.dtype)
    mma = mma_dtype(dtype, w_dtype)
    if is_float8(mma) and not a.out_dtype:
        p.error(f"float8 operands ({dtype.name}, {w_dtype.name}) need --out-dtype")
    out_dtype = jnp.dtype(a.out_dtype or mma)
    if a.backward:
        # dx's launch: the cotangent (in the backward pass's dtype) against w.
        dtype = out_dtype = backward_dtype(dtype, w_dtype, out_dtype)
    device_kind = devices[0].device_kind
    rows, winners = [], {}
    shapes = sweep_shapes(sweep)
    if a.quick:
        shapes = [next(s for s in shapes if s.op == op) for op in dict.fromkeys(s.op for s in shapes)]
    for shape in shapes:
        op, (m_local, k, n) = shape.op, per_rank(shape, world)
        if a.backward:
            op, m_local, k, n = backward_problem(op, m_local, k, n)
        if m_local < 1:
            continue
        variant = dict(out_dtype=out_dtype, w_transposed=a.backward, w_dtype=w_dtype,
                       precision=a.precision)
        best, results = autotune.tune(op, mesh, m_local, k, n, dtype, max_configs=max_configs,
                                      reps=reps, log=lambda s: None, **variant)
        ok = [r for r in results if r["status"] == "ok"]
        entry_key = autotune.key(op, device_kind, m_local, k, n, dtype, world, **variant)
        entry = autotune.cached_entry(entry_key)
        times = autotune.measured_ms(entry) if entry else {}
        M, K, N = shape.global_operands(world)
        if a.backward:
            K, N = N, K
        row = {"op": op, "name": shape.name, "M": M, "K": K, "N": N, "P": world,
               "dtype": dtype.name, "w_dtype": w_dtype.name, "out": out_dtype.name, "w": "w^T" if a.backward else "w",
               "candidates": len(results),
               "failed": sum(r["status"].startswith(("failed", "wrong")) for r in results),
               "best_ms": round(min(r["median_ms"] for r in ok), 4) if ok else None,
               "xla_ms": round(times["xla"], 4) if "xla" in times else None,
               "ring_ms": round(times["ring"], 4) if "ring" in times else None,
               "auto": autotune.best_impl(op, device_kind, m_local, k, n, dtype, world,
                                          **variant) or "xla",
               "config": repr(best) if best else "none passed",
               "first_failure": next((r["status"] for r in results if r["status"] != "ok"), "")}
        rows.append(row)
        print(harness.format_row(row, COLUMNS), flush=True)
        if entry is not None:  # the fused winner and the baselines' times (auto's choice)
            winners[entry_key] = entry
    if a.ship and winners:
        ship(winners, a.shipped_path)
        print(f"shipped {len(winners)} entries to {a.shipped_path}")
    on_gpu = devices[0].platform == "gpu"
    harness.write_report(
        os.path.join(a.out, f"tune_{sweep}{'_backward' if a.backward else ''}_{dtype.name}"
                            f"{'' if w_dtype == dtype else '_w_' + w_dtype.name}"
                            f"{'' if out_dtype == dtype else '_' + out_dtype.name}"
                            f"_{devices[0].platform}{world}"),
        f"Autotuned fused kernels ({sweep})", harness.environment(devices), rows, COLUMNS,
        [f"jax_flux.autotune.tune per shape over {world} device(s), median of {reps} timed "
         f"runs per verified candidate; xla_ms and ring_ms: those impls on the same problem; "
         f"auto: what impl='auto' now runs there (the fastest of the three)."], on_gpu=on_gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
