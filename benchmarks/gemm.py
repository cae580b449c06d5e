"""The fused kernels' GEMM tile loop against XLA's dot, one device, the sweeps' per-rank shapes.

    python -m benchmarks.gemm --sweep gpt3-175b --dtype bfloat16     # on a GPU
    python -m benchmarks.gemm --sweep gpt3-175b --b-transposed       # the backward's layout
    python -m benchmarks.gemm --b-dtype float8_e4m3fn                # a float8 weight
    python -m benchmarks.gemm --quick                                # CPU smoke run

``custom_calls.gemm.matmul`` runs the same ``gemm_tile`` loop the fused
kernels extend, without communication; the ratio to XLA's dot (cuBLAS on a
GPU) in the same process bounds what the fused kernels can reach. A few tile
configs are tried per shape (each checked against a float64 reference on
small shapes, against XLA's result otherwise) and the best is reported.
``--b-transposed`` gives b as b^T [N, K], read in place by both (XLA's dot of
``a @ bt.T``, the Triton GEMM's transposed-operand path): the layout the fused
kernels read w in during the backward pass (and float8 weights should be
given in: Hopper's FP8 MMAs read b K-major). Float8 operands give bfloat16
results on both sides. ``--b-dtype`` gives b another dtype than a's (one of
them float8): bfloat16 a against a float8 b is weight-only float8 and the
float8 backward's dx, where the Triton GEMM widens b's tiles in registers.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.ops import AG, parse_ms, result_dtype, select, sweep_shapes
from custom_calls.gemm import matmul, mma_dtype
from jax_flux._precision import kernel_input_precision
from jax_flux import testing

# (float8 operands take block_k=128 in place of 64: the same bytes a row.)
GPU_CONFIGS = [dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
               dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
               dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
               dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)]
CPU_CONFIGS = [dict(block_m=32, block_n=32, block_k=32)]
COLUMNS = ["shape", "M", "K", "N", "dtype", "b_dtype", "xla_ms", "triton_ms", "ratio_vs_xla",
           "triton_tflops", "xla_tflops", "best_config", "rel_err"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default="gpt3-175b", choices=["gpt3-175b", "llama2-70b"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="bfloat16",
                   choices=["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"])
    p.add_argument("--b-dtype", default=None,
                   choices=["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"],
                   help="b's dtype (default: a's; they differ only where one is float8)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--ms", default=None, help="only the sweep's points with these M")
    p.add_argument("--configs", type=int, default=None,
                   help="try only the first N tile configs (on a GPU: of %d)" % len(GPU_CONFIGS))
    p.add_argument("--b-transposed", action="store_true", help="b given as b^T [N, K]")
    p.add_argument("--precision", default=None, choices=["default", "high", "highest"],
                   help="of both GEMMs (float32: tf32 on GPUs unless highest); default: "
                        "jax_default_matmul_precision")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    device = ([d for d in jax.devices() if d.platform == "gpu"] or jax.devices("cpu"))[0]
    on_gpu = device.platform == "gpu"
    sweep = "quick" if a.quick else a.sweep
    reps = 2 if a.quick else a.reps
    try:
        shapes = select(sweep_shapes(sweep), parse_ms(a.ms))
    except ValueError as e:
        p.error(str(e))
    if a.configs is not None and a.configs < 1:
        p.error(f"--configs must be at least 1, got {a.configs}")
    dtype, b_dtype = jnp.dtype(a.dtype), jnp.dtype(a.b_dtype or a.dtype)
    try:
        mma = mma_dtype(dtype, b_dtype)
    except ValueError as e:
        p.error(str(e))
    out_dtype = result_dtype(dtype, b_dtype)
    # What XLA's dot runs for the precision, the Triton GEMM runs too (float32:
    # tensorfloat32 unless highest).
    input_precision = kernel_input_precision("benchmarks.gemm", a.precision, mma)
    tol = testing.tolerance(out_dtype, mma, precision=a.precision, platform=device.platform)
    configs = (GPU_CONFIGS if on_gpu else CPU_CONFIGS)[:a.configs]
    if on_gpu and mma.itemsize == 1:
        configs = [dict(c, block_k=2 * c["block_k"]) for c in configs]
    env = harness.environment([device])
    rows, seen = [], set()
    for shape in shapes:
        m, k, n = shape.local_gemm()
        if (m, k, n) in seen:
            continue
        seen.add((m, k, n))
        x, w, x64, w64 = testing.random_operands(m, k, n, dtype, seed=m, w_dtype=b_dtype)
        bt = a.b_transposed
        x, w = jax.device_put(x, device), jax.device_put(w.T if bt else w, device)
        xla = jax.jit(lambda x, w: jax.lax.dot_general(
            x, w, (((1,), (1 if bt else 0,)), ((), ())), precision=a.precision,
            preferred_element_type=jnp.float32).astype(out_dtype))
        ref = np.asarray(xla(x, w), np.float64) if m * k * n > 2**31 else x64 @ w64
        t_xla = harness.time_fn(xla, (x, w), reps=reps)
        best = None
        for cfg in configs:
            fn = jax.jit(lambda x, w, cfg=cfg: matmul(x, w, b_transposed=bt, out_dtype=out_dtype,
                                                      input_precision=input_precision, **cfg))
            err = testing.relative_error(fn(x, w), ref)
            if not err < tol:
                print(f"{shape.name} {cfg}: WRONG (rel err {err:.2e}), not timed")
                continue
            t = harness.time_fn(fn, (x, w), reps=reps)
            if best is None or t.median_ms < best[1].median_ms:
                best = (cfg, t, err)
        flops = 2 * m * k * n
        row = dict(shape=f"{'ag' if shape.op == AG else 'rs'}:{shape.name}", M=m, K=k, N=n,
                   dtype=dtype.name, b_dtype=b_dtype.name, xla_ms=t_xla.median_ms,
                   xla_tflops=flops / t_xla.median_ms / 1e9)
        if best is not None:
            cfg, t, err = best
            row.update(triton_ms=t.median_ms, ratio_vs_xla=t_xla.median_ms / t.median_ms,
                       triton_tflops=flops / t.median_ms / 1e9,
                       best_config=" ".join(f"{k}={v}" for k, v in cfg.items()), rel_err=err)
        rows.append(row)
        print(harness.format_row(row, COLUMNS))
    layout = ("_bT" if a.b_transposed else "") + (f"_{a.precision}" if a.precision else "")
    bname = "" if b_dtype == dtype else f"_b_{b_dtype.name}"
    base = os.path.join(a.out, f"gemm_{sweep}{layout}_{dtype.name}{bname}_{device.platform}")
    notes = ["ratio_vs_xla > 1: the Triton GEMM is faster than XLA's dot."]
    if mma == jnp.float32:
        notes.append(f"float32 operands: both GEMMs at precision={a.precision!r} (the Triton "
                     f"GEMM's tl.dot input precision {input_precision!r}).")
    if a.b_transposed:
        notes.append("b given as b^T [N, K] (K contiguous) to both, as the backward pass reads w.")
    if not on_gpu:
        notes.append("CPU: Triton's interpreter against XLA's CPU dot.")
    if b_dtype != dtype:
        notes.append(f"a {dtype.name}, b {b_dtype.name}: the Triton GEMM widens the float8 "
                     f"tiles in registers; XLA's dot gets the mixed operands as they are.")
    harness.write_report(base, f"Triton GEMM vs XLA dot: {sweep}{layout}, {dtype.name}{bname}",
                         env, rows, COLUMNS, notes, on_gpu)
    print(f"wrote {base}.csv/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
