"""What the fused kernels' signalling costs: 8 ranks emulated on one GPU, fused vs plain GEMM.

    python -m benchmarks.emulated --out benchmarks/results/gpu      # needs one CUDA GPU

Each of 8 ranks runs on its own stream with its share of the GPU
(``custom_calls.rank_emulation``). For every per-rank problem of the Flux
GPT-3 sweep (scaled to 8 ranks), three numbers, each the median of repeated
runs timed with CUDA events from one start event to the slowest rank's end:

* ``fused_ms``: the fused kernel (AG-GEMM or GEMM-RS), all 8 ranks at once;
* ``gemm_ms``: the same GEMM per rank without communication (``matmul_kernel``
  on the already-gathered rows, or on the rows to reduce), all 8 at once;
* ``overhead``: fused / gemm - 1: what the signals, waits, copies into peers'
  buffers (here HBM to HBM, not NVLink) and the reduction cost on top.

Not a multi-GPU number: the 8 ranks share one GPU's SMs and memory
bandwidth. ``benchmarks.projection`` turns GEMM times into 8-GPU estimates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import ml_dtypes
import numpy as np

from benchmarks import harness
from jax_flux import testing

WORLD = 8
COLUMNS = ["op", "variant", "M", "K", "N", "dtype", "fused_ms", "gemm_ms", "overhead",
           "fused_tflops", "max_rel_err"]
# Per-rank problems: Flux's GPT-3 175B layer split over 8 ranks (AG: n = 49152 / 8;
# RS: k = 49152 / 8), total M from decode (64) to a long prefill (8192).
SHAPES = {"all_gather_matmul": [(m, 12288, 49152 // WORLD) for m in (64, 512, 1024, 4096, 8192)],
          "matmul_reduce_scatter": [(m, 49152 // WORLD, 12288) for m in (64, 512, 1024, 4096,
                                                                          8192)]}
# Config variants timed at every shape. AG: communication programs and copy tile
# (bytes each program has in flight: 8 KiB against 16 KiB). RS: reduction
# programs against the own tiles' epilogue summing the partials (reduce_programs=0).
VARIANTS = {
    "all_gather_matmul": {"comm 2 x 32x128": dict(comm_programs=2, copy_rows=32, copy_cols=128),
                          "comm 4 x 32x256": dict(comm_programs=4, copy_rows=32, copy_cols=256),
                          "pull 4 x 32x256": dict(comm_programs=4, copy_rows=32, copy_cols=256,
                                                  pull=True)},
    "matmul_reduce_scatter": {"reduce_programs=4": dict(reduce_programs=4),
                              "epilogue": dict(reduce_programs=0)},
}
_TIMEOUT_MS = 20_000


def run(op: str, m_total: int, k: int, n: int, reps: int, world_,
        variant: str | None = None, dtype: str = "bfloat16") -> dict:
    """One point: ``variant`` names an entry of VARIANTS[op] (None: the first).
    ``dtype`` "float8_e4m3fn": float8 operands with w given as w^T (the layout
    FP8 MMAs read), bfloat16 results, K tiles of 128; the baseline GEMM alike."""
    variant = variant or next(iter(VARIANTS[op]))
    rng = np.random.default_rng(m_total)
    bf16 = ml_dtypes.bfloat16
    fp8 = dtype != "bfloat16"
    operand = ml_dtypes.float8_e4m3fn if fp8 else bf16
    layout = dict(out_dtype=bf16, w_transposed=fp8)
    block_k = 128 if fp8 else 64

    def weights():  # w [k, n], or w^T [n, k] for float8
        w = rng.standard_normal((n, k) if fp8 else (k, n)) / np.sqrt(k)
        return [w.astype(operand) for _ in range(WORLD)]

    def dense(w):
        w = w.astype(np.float32)
        return w.T if fp8 else w

    if op == "all_gather_matmul":
        m = m_total // WORLD
        xs = [rng.standard_normal((m, k)).astype(operand) for _ in range(WORLD)]
        ws = weights()
        cfg = dict(block_m=64 if m < 128 else 128, block_n=128, block_k=block_k,
                   chunk_rows=min(256, max(64, m)), num_warps=4, num_stages=3,
                   **VARIANTS[op][variant])
        xg = np.concatenate(xs)

        def fused():
            return world_.ag_gemm(xs, ws, cfg=cfg, grid=world_.programs_per_rank,
                                  timeout_ms=_TIMEOUT_MS, precision="ieee", **layout)

        def plain():
            return world_.matmul([xg] * WORLD, ws, block_m=cfg["block_m"], block_n=128,
                                 block_k=block_k, num_warps=4, num_stages=3, precision="ieee",
                                 out_dtype=bf16, b_transposed=fp8)

        ys, _, _ = fused()
        # Rank 0's output on a sample of rows from every source (a full host
        # reference at M = 8192 would take minutes).
        sample = np.concatenate([np.arange(r * m, r * m + min(m, 32)) for r in range(WORLD)])
        ref = xg[sample].astype(np.float32) @ dense(ws[0])
        err = testing.relative_error(ys[0][sample], ref.astype(np.float64))
    else:
        xs = [rng.standard_normal((m_total, k)).astype(operand) for _ in range(WORLD)]
        ws = weights()
        cfg = dict(block_m=64 if m_total // WORLD < 128 else 128, block_n=128, block_k=block_k,
                   num_warps=4, num_stages=3, **VARIANTS[op][variant])

        def fused():
            return world_.gemm_rs(xs, ws, cfg=cfg, grid=world_.programs_per_rank,
                                  timeout_ms=_TIMEOUT_MS, precision="ieee", **layout)

        def plain():
            return world_.matmul(xs, ws, block_m=cfg["block_m"], block_n=128, block_k=block_k,
                                 num_warps=4, num_stages=3, precision="ieee", out_dtype=bf16,
                                 b_transposed=fp8)

        zs, _ = fused()
        rows = min(m_total // WORLD, 32)  # rank 0's first rows, summed over every source
        ref = sum(x[:rows].astype(np.float32) @ dense(w) for x, w in zip(xs, ws))
        err = testing.relative_error(zs[0][:rows], ref.astype(np.float64))
    fused_ms = statistics.median(fused()[-1] for _ in range(reps))
    gemm_ms = statistics.median(plain()[-1] for _ in range(reps))
    flops = 2 * m_total * k * n * WORLD  # every rank's GEMM
    return {"op": op, "variant": variant, "M": m_total, "K": k, "N": n, "dtype": dtype,
            "fused_ms": round(fused_ms, 4), "gemm_ms": round(gemm_ms, 4),
            "overhead": round(fused_ms / gemm_ms - 1, 4),
            "fused_tflops": round(flops / fused_ms / 1e9, 1), "max_rel_err": f"{err:.2e}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-m", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float8_e4m3fn"],
                   help="float8: operands in float8_e4m3fn, w given as w^T, bf16 results")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    import jax

    from custom_calls.rank_emulation import OneGpuWorld

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        print("benchmarks.emulated needs a CUDA GPU", file=sys.stderr)
        return 2
    world_ = OneGpuWorld(WORLD, ordinal=0)
    rows = []
    for op, shapes in SHAPES.items():
        for m_total, k, n in shapes:
            if m_total > a.max_m:
                continue
            for variant in VARIANTS[op]:
                row = run(op, m_total, k, n, a.reps, world_, variant, a.dtype)
                rows.append(row)
                print(harness.format_row(row, COLUMNS), flush=True)
    env = harness.environment(gpus[:1])
    harness.write_report(
        os.path.join(a.out, "emulated_8_ranks" + ("" if a.dtype == "bfloat16" else f"_{a.dtype}")),
        f"Fused kernels, 8 ranks emulated on one GPU ({a.dtype})",
        env, rows, COLUMNS,
        [f"{world_.programs_per_rank} programs per rank ({WORLD} ranks share the GPU's SMs); "
         f"times: CUDA events, median of {a.reps}.",
         "gemm_ms: matmul_kernel on the same per-rank problem without communication; "
         "overhead = fused_ms / gemm_ms - 1. Copies go HBM to HBM here, not over NVLink."],
        on_gpu=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
