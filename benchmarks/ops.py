"""Op sweeps: all_gather_matmul and matmul_reduce_scatter, every impl, Flux's shapes.

    python -m benchmarks.ops --sweep gpt3-175b --dtype bfloat16      # on GPUs
    python -m benchmarks.ops --dtype float8_e4m3fn --w-transposed     # FP8, bf16 results
    python -m benchmarks.ops --w-dtype float8_e4m3fn --sweep llama2-70b   # float8 weights
    python -m benchmarks.ops --quick                                  # CPU smoke run

Shapes are the per-rank GEMMs of tensor parallelism over 8 ranks (the Flux
paper's setting), run over however many devices there are: with P devices,
AG-GEMM is X[M, K] @ W[K, n*P] (n = N/8 columns per rank) and GEMM-RS is
X[M, k*P] @ W[k*P, N] (k = K/8). On one GPU that is exactly one rank's GEMM.

Each point is checked against the lax collective run in the same shard_map
(and a float64 host product when small) before it is timed; warm-up is
excluded; times are medians of device-synchronised runs. Columns:
per-device TFLOP/s, percent of the dense-GEMM peak measured here, speedup
over xla, and with P > 1 Flux's overlap efficiency: ECT = op time - best
non-split GEMM time, E = 1 - ECT_impl / ECT_xla.

Float8 operands give bfloat16 results (preferred_element_type); with
``--w-transposed`` every impl gets W as W^T [N, K] (K contiguous: what
Hopper's FP8 MMAs read without a transpose). ``--w-dtype`` gives W another
dtype than X's (one of them float8): ``--w-dtype float8_e4m3fn`` with bfloat16
X is weight-only float8, whose decode points read half the weight bytes; the
fused kernels widen W's tiles in registers (xla and ring: XLA's mixed dot).

On CPU devices the numbers only show the harness works: 8 emulated devices
share the host's cores and fused kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from custom_calls.gemm import mma_dtype  # noqa: E402
from jax_flux import testing  # noqa: E402

AG, RS = "all_gather_matmul", "matmul_reduce_scatter"
DECODE_M = (64, 512)
PREFILL_M = (1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One GEMM of TP=8: AG: [M, K] @ [K, N/8]; RS: [M, K/8] @ [K/8, N]."""

    op: str
    name: str
    m: int
    k: int
    n: int

    def global_operands(self, p: int) -> tuple[int, int, int]:
        """(M, K, N) of the global view over p devices."""
        if self.op == AG:
            return self.m, self.k, self.n // 8 * p
        return self.m, self.k // 8 * p, self.n

    def local_gemm(self) -> tuple[int, int, int]:
        """The best non-split GEMM of one rank: (M, K, N)."""
        return (self.m, self.k, self.n // 8) if self.op == AG else (self.m, self.k // 8, self.n)


def sweep_shapes(sweep: str) -> list[Shape]:
    ms = DECODE_M + PREFILL_M
    if sweep == "gpt3-175b":  # Flux: AG n=49152 k=12288; RS n=12288 k=49152
        return ([Shape(AG, "mlp_up", m, 12288, 49152) for m in ms] +
                [Shape(RS, "mlp_down", m, 49152, 12288) for m in ms])
    if sweep == "llama2-70b":
        return ([Shape(AG, "qkv", m, 8192, 10240) for m in ms] +
                [Shape(AG, "gate_up", m, 8192, 57344) for m in ms] +
                [Shape(RS, "attn_out", m, 8192, 8192) for m in ms] +
                [Shape(RS, "down", m, 28672, 8192) for m in ms])
    if sweep == "quick":
        return [Shape(op, "tiny", m, 128, 256) for op in (AG, RS) for m in (64, 256)]
    raise ValueError(f"unknown sweep {sweep!r}")


def parse_ms(text: str | None) -> tuple[int, ...] | None:
    """``--ms 64,1024``: the total token counts M to keep (None: every one)."""
    if not text:
        return None
    ms = tuple(int(v) for v in text.split(",") if v)
    if not ms or any(v <= 0 for v in ms):
        raise ValueError(f"--ms takes positive integers separated by commas, got {text!r}")
    return ms


def select(shapes: list[Shape], ms: tuple[int, ...] | None) -> list[Shape]:
    """The shapes whose M is in ``ms`` (all for None); an empty selection is an error."""
    if ms is None:
        return shapes
    kept = [s for s in shapes if s.m in ms]
    if not kept:
        raise ValueError(f"no shape of the sweep has M in {ms}: "
                         f"it has {sorted({s.m for s in shapes})}")
    return kept


def result_dtype(dtype, w_dtype=None):
    """What the ops return for x of ``dtype`` and w of ``w_dtype`` (default the
    same): their MMAs' dtype, bfloat16 for two float8 operands."""
    mma = mma_dtype(dtype, w_dtype)
    return jnp.dtype(jnp.bfloat16) if mma.itemsize == 1 else mma


def _dot(a, b, precision=None):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=result_dtype(a.dtype, b.dtype))


def measure_peak(device, dtype, size: int, reps: int, precision=None) -> float:
    """Dense-GEMM TFLOP/s of one device (XLA's dot on a square problem)."""
    a = np.random.default_rng(0).standard_normal((size, size), np.float32) / np.sqrt(size)
    a = jax.device_put(jnp.asarray(a).astype(dtype), device)
    f = jax.jit(lambda a: _dot(a, a, precision))
    t = harness.time_fn(f, (a,), reps=reps)
    return 2 * size**3 / (t.median_ms * 1e-3) / 1e12


def local_gemm_ms(device, shape: Shape, dtype, reps: int, w_dtype=None, precision=None) -> float:
    m, k, n = shape.local_gemm()
    x, w, _, _ = testing.random_operands(m, k, n, dtype, seed=1, w_dtype=w_dtype)
    x, w = jax.device_put(x, device), jax.device_put(w, device)
    return harness.time_fn(jax.jit(lambda x, w: _dot(x, w, precision)), (x, w),
                           reps=reps).median_ms


def run_point(shape: Shape, mesh, impls, dtype, reps: int, peak: float, gemm_ms: float,
              w_transposed: bool = False, w_dtype=None, precision=None):
    p = mesh.devices.size
    m, k, n = shape.global_operands(p)
    w_dtype = jnp.dtype(w_dtype or dtype)
    x, w, x64, w64 = testing.random_operands(m, k, n, dtype, seed=m, w_dtype=w_dtype)
    xs, ws = testing.place(shape.op, mesh, x, w, w_transposed=w_transposed)
    out_dtype = result_dtype(dtype, w_dtype)
    variant = dict(preferred_element_type=out_dtype if out_dtype != mma_dtype(dtype, w_dtype)
                   else None, w_transposed=w_transposed, precision=precision)
    tol = testing.tolerance(out_dtype, mma_dtype(dtype, w_dtype), precision=precision,
                            platform=mesh.devices.flat[0].platform)
    xla_out = np.asarray(testing.sharded(shape.op, mesh, "xla", **variant)(xs, ws), np.float64)
    host_ref = x64 @ w64 if m * k * n <= 2**31 else None
    flops_per_device = 2 * m * k * n / p
    rows, times = [], {}
    for impl in impls:
        row = dict(op=shape.op, shape=shape.name, M=m, K=k, N=n, P=p, dtype=jnp.dtype(dtype).name,
                   w_dtype=w_dtype.name, impl=impl)
        fn = testing.sharded(shape.op, mesh, impl, **variant)
        out = fn(xs, ws)
        err = testing.relative_error(out, xla_out)
        if host_ref is not None:
            err = max(err, testing.relative_error(out, host_ref))
        if not err < tol:
            rows.append(dict(row, rel_err=err, status=f"WRONG (tolerance {tol:g}); not timed"))
            continue
        t = harness.time_fn(fn, (xs, ws), reps=reps, warmup=min(2, reps))
        times[impl] = t.median_ms
        tflops = flops_per_device / (t.median_ms * 1e-3) / 1e12
        rows.append(dict(row, rel_err=err, median_ms=t.median_ms, min_ms=t.min_ms,
                         max_ms=t.max_ms, spread_pct=t.spread_pct, tflops=tflops,
                         pct_peak=100 * tflops / peak, gemm_ms=gemm_ms, status="ok"))
    for row in rows:
        if row.get("status") == "ok" and "xla" in times:
            row["speedup_vs_xla"] = times["xla"] / row["median_ms"]
            if p > 1:
                ect, ect_xla = row["median_ms"] - gemm_ms, times["xla"] - gemm_ms
                row["ect_ms"] = ect
                row["overlap_E"] = 1 - ect / ect_xla if ect_xla > 0 else None
    return rows


COLUMNS = ["op", "shape", "M", "K", "N", "P", "dtype", "w_dtype", "impl", "median_ms", "spread_pct",
           "tflops", "pct_peak", "speedup_vs_xla", "gemm_ms", "ect_ms", "overlap_E", "rel_err",
           "status"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default="gpt3-175b", choices=["gpt3-175b", "llama2-70b", "quick"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (CPU smoke run)")
    p.add_argument("--dtype", default="bfloat16",
                   choices=["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"])
    p.add_argument("--w-dtype", default=None,
                   choices=["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"],
                   help="W's dtype (default: X's; they differ only where one is float8)")
    p.add_argument("--w-transposed", action="store_true", help="W given as W^T [N, K]")
    p.add_argument("--precision", default=None, choices=["default", "high", "highest"],
                   help="the ops' precision (float32: tf32 on GPUs unless highest); "
                        "default: jax_default_matmul_precision")
    p.add_argument("--impls", default="xla,ring,fused")
    p.add_argument("--ms", default=None, help="only these total M, e.g. 64,1024,8192")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    sweep = "quick" if a.quick else a.sweep
    try:
        shapes = select(sweep_shapes(sweep), parse_ms(a.ms))
    except ValueError as e:
        p.error(str(e))
    reps = min(3, a.reps) if a.quick else a.reps
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    devices = gpus or jax.devices("cpu")[:8]
    mesh = testing.mesh(devices)
    dtype, w_dtype = jnp.dtype(a.dtype), jnp.dtype(a.w_dtype or a.dtype)
    try:
        mma = mma_dtype(dtype, w_dtype)
    except ValueError as e:
        p.error(str(e))
    impls = [i for i in a.impls.split(",") if i]
    env = harness.environment(devices)
    # The peak of the MMAs the ops run (a float8 w against bfloat16 x: bfloat16),
    # on random data (zeros and ones run faster than real data on these chips).
    peak = measure_peak(devices[0], mma, 512 if a.quick else 8192, reps, a.precision)
    print(f"{env['device']}: dense-GEMM peak {peak:.3g} TFLOP/s ({mma.name})")
    rows = []
    for shape in shapes:
        gemm_ms = local_gemm_ms(devices[0], shape, dtype, reps, w_dtype, a.precision)
        for row in run_point(shape, mesh, impls, dtype, reps, peak, gemm_ms, a.w_transposed,
                             w_dtype, a.precision):
            rows.append(row)
            print(harness.format_row(row, COLUMNS))
    layout = ("_wT" if a.w_transposed else "") + (f"_{a.precision}" if a.precision else "")
    wname = "" if w_dtype == dtype else f"_w_{w_dtype.name}"
    base = os.path.join(a.out, f"ops_{sweep}{layout}_{dtype.name}{wname}_{env['platform']}"
                               f"{len(devices)}")
    notes = [f"Dense-GEMM peak measured here: {peak:.3g} TFLOP/s. Shapes are TP=8 per-rank "
             f"GEMMs run over P={len(devices)} devices (see benchmarks/ops.py)."]
    if w_dtype != dtype:
        notes.append(f"X {dtype.name}, W {w_dtype.name}: the fused kernels widen the float8 "
                     f"tiles in registers; xla and ring hand XLA a dot of mixed operands.")
    if result_dtype(dtype, w_dtype) != mma:
        notes.append(f"{mma.name} operands, {result_dtype(dtype, w_dtype).name} results.")
    if a.w_transposed:
        notes.append("W given as W^T [N, K] to every impl (w_transposed=True).")
    if a.precision:
        notes.append(f"precision={a.precision!r} for every impl and the peak's dot.")
    harness.write_report(base, f"jax_flux op sweep: {sweep}, {dtype.name}", env, rows, COLUMNS,
                         notes, bool(gpus))
    series = {}
    for r in rows:
        if r.get("status") == "ok":
            key = f"{'ag' if r['op'] == AG else 'rs'}:{r['shape']} {r['impl']}"
            series.setdefault(key, ([], []))
            series[key][0].append(r["M"])
            series[key][1].append(r["tflops"])
    plotted = harness.plot(base + ".png", f"{sweep} {dtype.name} on {env['device']}", series,
                           "M (tokens)", "TFLOP/s per device")
    print(f"wrote {base}.csv/.md" + ("/.png" if plotted else ""))
    bad = [r for r in rows if str(r.get("status", "")).startswith("WRONG")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
