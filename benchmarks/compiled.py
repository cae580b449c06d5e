"""Static report of the fused kernels as compiled for Hopper, for the sweeps' shapes. No GPU.

    python -m benchmarks.compiled --sweep gpt3-175b --dtype bfloat16
    python -m benchmarks.compiled --sweep llama2-70b --w-dtype float8_e4m3fn   # float8 weights

For each op and shape of a sweep (TP=8, the per-rank problem), takes the
config ``impl="fused"`` would use (the shape heuristic; ``--tuned`` adds the
shipped and user autotune caches for ``--device-kind``), compiles the kernel
for sm_90a exactly as jax-triton would (constexpr shapes, 16-byte aligned
pointers) and reports what the compiled code shows, next to Triton's plain
GEMM (``custom_calls.gemm.matmul_kernel``) with the same tile:

* registers and stack bytes per thread, shared memory per program, and how
  many programs fit an SM (and what binds first);
* the K loop in SASS: instructions, tensor-core MMAs and cp.async copies per
  iteration, spills inside it; narrow (< 16 byte) cp.async copies in the PTX;
* the persistent grid as the wrapper sizes it (``--sms``): GEMM programs,
  output tiles, waves, and the last wave's fill (tiles / (waves x programs));
* an estimate (a model, not a measurement) of how many times the tile order
  makes the GEMM read w and x from HBM: each wave of programs running at once
  reads the column tiles of w and row tiles of x it touches once (L2 shares
  them within a wave), and nothing survives in L2 from one wave to the next
  (w of these shapes is larger than L2). For the config's ``group_m`` and for
  row-major order (``group_m=1``).

Nothing here is timed: it says why a measured ratio to XLA's dot is what it
is, and what to tune first. Output: CSV and markdown under ``--out``.
"""

from __future__ import annotations

import os
import sys

# Compiled mode: importing custom_calls on a CPU-only host would otherwise
# switch Triton to its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0")

import argparse  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import triton  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.ops import AG, sweep_shapes  # noqa: E402
from custom_calls import ag_gemm, gemm, gemm_rs  # noqa: E402
from custom_calls.assembly import (cuda_tool, programs_per_sm, ptx_features,  # noqa: E402
                                   sass_features)
from custom_calls.compiler import (FLOAT8_TYPE, TRITON_TYPE, compile_kernel,  # noqa: E402
                                   pointer_type)
from jax_flux import autotune  # noqa: E402
from jax_flux._fused import persistent_grid  # noqa: E402
from jax_flux._precision import kernel_input_precision  # noqa: E402
from jax_flux.config import AllGatherMatmulConfig, MatmulReduceScatterConfig  # noqa: E402

COLUMNS = ["op", "shape", "M", "K", "N", "tile", "group_m", "warps", "stages", "helpers",
           "regs", "stack", "smem_kib", "fit_per_sm", "bound_by", "programs_per_sm",
           "gemm_programs", "tiles", "waves", "last_wave_fill", "w_reads_est", "x_reads_est",
           "w_reads_est_rowmajor", "comm_kib_in_flight", "loop", "loop_plain_gemm",
           "loop_mma", "loop_ffma", "loop_ldgsts", "loop_spills", "loop_kind", "narrow_copies",
           "regs_plain_gemm"]


def _compile(kernel, pointers: dict, constexprs: dict, cfg, cc: int) -> dict:
    c = compile_kernel(kernel, cc, tuple(pointers.items()), tuple(sorted(constexprs.items())),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = dict(ptx_features(c.ptx), **sass_features(c.cubin))
    out["shared"] = c.shared + out.get("static_shared", 0)
    out.update(programs_per_sm(out["regs"], out["shared"], cfg.num_warps))
    return out


def grouped(tile: int, tiles_m: int, tiles_n: int, group_m: int) -> tuple[int, int]:
    """(tile_m, tile_n) of linear tile ``tile`` (``custom_calls.gemm.group_order``)."""
    per_group = group_m * tiles_n
    first_m = (tile // per_group) * group_m
    rows = min(tiles_m - first_m, group_m)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


def operand_reads(blocks: int, tiles_m: int, tiles_n: int, programs: int,
                  group_m: int) -> tuple[float, float]:
    """Estimated reads of (w, x) from HBM, in units of the whole operand, when
    ``programs`` programs take the tiles of ``blocks`` row blocks (sources or
    owners) of ``tiles_m`` row tiles each, in groups of ``group_m`` row tiles
    (the kernels' order)."""
    order = []
    for t in range(blocks * tiles_m * tiles_n):
        row_tile, n = grouped(t, blocks * tiles_m, tiles_n, group_m)
        order.append((row_tile // tiles_m, row_tile % tiles_m, n))
    w_tiles = x_tiles = 0
    for start in range(0, len(order), programs):
        wave = order[start:start + programs]
        w_tiles += len({n for _, _, n in wave})
        x_tiles += len({(b, m) for b, m, _ in wave})
    return w_tiles / tiles_n, x_tiles / (blocks * tiles_m)


def _config(op: str, m_local: int, k: int, n: int, dtype, world: int, tuned_kind: str | None,
            sms: int, w_dtype=None, precision=None):
    cls = AllGatherMatmulConfig if op == AG else MatmulReduceScatterConfig
    if tuned_kind:
        cfg = autotune.lookup(op, tuned_kind, m_local, k, n, dtype, world, w_dtype=w_dtype,
                              precision=precision)
        if cfg is not None:
            return cfg, "tuned"
    mma = gemm.mma_dtype(dtype, w_dtype)
    return cls.default(m_local, k, n, world, interpreting=False, sms=sms, itemsize=mma.itemsize,
                       input_precision=kernel_input_precision(op, precision, mma)), "heuristic"


def analyse(shape, dtype, world: int, sms: int, cc: int, tuned_kind: str | None,
            w_dtype=None, w_transposed: bool = False, precision=None) -> dict:
    """One row of the report: the fused kernel and the plain GEMM of the same tile
    (w of ``w_dtype``, default x's ``dtype``; given as w^T with ``w_transposed``;
    float32 MMAs at the ops' ``precision``)."""
    t = TRITON_TYPE[jnp.dtype(dtype).name]
    tw = pointer_type(w_dtype or dtype)[1:]
    input_precision = kernel_input_precision(shape.op, precision, gemm.mma_dtype(dtype, w_dtype))
    m_local = shape.m // world
    if shape.op == AG:
        k, n = shape.k, shape.n // world  # x [m, K] per rank, w [K, N / P]
        cfg, source = _config(AG, m_local, k, n, dtype, world, tuned_kind, sms, w_dtype,
                              precision)
        sig_off, data_off, _ = ag_gemm.workspace_bytes(world, m_local, k, jnp.dtype(dtype).itemsize,
                                                       cfg.chunk_rows)
        kernel, pointers = ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t, None, tw)
        constexprs = dict(M_LOCAL=m_local, N=n, K=k, WORLD=world, SIG_OFF=sig_off,
                          DATA_OFF=data_off, CHUNK_ROWS=cfg.chunk_rows,
                          COMM_PROGRAMS=cfg.comm_programs, COPY_ROWS=cfg.copy_rows,
                          COPY_COLS=cfg.copy_cols, RETURN_GATHERED=False, PULL=cfg.pull)
        helpers = cfg.comm_programs
        # Bytes a copy tile really moves: rows of a chunk, columns of x.
        in_flight = (cfg.comm_programs * min(cfg.copy_rows, cfg.chunk_rows, m_local) *
                     min(cfg.copy_cols, k) * jnp.dtype(dtype).itemsize)
        gemm_mkn = (world * m_local, k, n)
    else:
        k, n = shape.k // world, shape.n  # x [M, K / P] per rank, w [K / P, N]
        cfg, source = _config(shape.op, m_local, k, n, dtype, world, tuned_kind, sms, w_dtype,
                              precision)
        sig_off, data_off, _ = gemm_rs.workspace_bytes(world, m_local, n, jnp.dtype(dtype).itemsize,
                                                       cfg.block_m, cfg.block_n)
        kernel, pointers = gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t, None, tw)
        constexprs = dict(M_OWN=m_local, N=n, K=k, WORLD=world, SIG_OFF=sig_off,
                          DATA_OFF=data_off, REDUCE_PROGRAMS=cfg.reduce_programs)
        helpers = cfg.reduce_programs
        in_flight = None
        gemm_mkn = (world * m_local, k, n)
    tile = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, UPCAST=False, INPUT_PRECISION=input_precision)
    fused = _compile(kernel, pointers, dict(constexprs, **tile, REMOTE_CACHE=".cg",
                                            ROTATE=cfg.rotate, W_TRANS=w_transposed,
                                            ROWS=m_local),
                     cfg, cc)
    gm, gk, gn = gemm_mkn
    plain = _compile(gemm.matmul_kernel, gemm.pointer_types(t, tw),
                     dict(M=gm, N=gn, K=gk, **tile, B_TRANS=w_transposed), cfg, cc)
    # The persistent grid as the ops size it on a GPU.
    tiles = world * -(-m_local // cfg.block_m) * -(-n // cfg.block_n)
    gemm_programs = persistent_grid(cfg.num_programs, tiles, helpers,
                                    sms * cfg.programs_per_sm) - helpers
    waves = -(-tiles // gemm_programs)
    tiles_m, tiles_n = -(-m_local // cfg.block_m), -(-n // cfg.block_n)
    w_reads, x_reads = operand_reads(world, tiles_m, tiles_n, gemm_programs, cfg.group_m)
    w_rowmajor, _ = operand_reads(world, tiles_m, tiles_n, gemm_programs, 1)
    return {
        "op": "ag" if shape.op == AG else "rs", "shape": shape.name, "M": shape.m, "K": shape.k,
        "N": shape.n, "config": source,
        "tile": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}", "group_m": cfg.group_m,
        "warps": cfg.num_warps,
        "stages": cfg.num_stages, "helpers": helpers, "regs": fused["regs"],
        "stack": fused["stack"], "smem_kib": fused["shared"] / 1024,
        "fit_per_sm": fused["fit"], "bound_by": fused["bound_by"],
        "programs_per_sm": cfg.programs_per_sm, "gemm_programs": gemm_programs,
        "tiles": tiles, "waves": waves, "last_wave_fill": tiles / (waves * gemm_programs),
        "comm_kib_in_flight": None if in_flight is None else in_flight / 1024,
        "w_reads_est": w_reads, "x_reads_est": x_reads, "w_reads_est_rowmajor": w_rowmajor,
        "loop": fused["loop"], "loop_plain_gemm": plain["loop"], "loop_mma": fused["loop_mma"],
        "loop_ffma": fused["loop_ffma"], "loop_ldgsts": fused["loop_ldgsts"],
        "loop_spills": fused["loop_local"],
        "loop_kind": fused["loop_kind"],
        "narrow_copies": fused["narrow_copies"], "regs_plain_gemm": plain["regs"],
    }


def _ptxas_version() -> str:
    ptxas = cuda_tool("ptxas")
    if ptxas is None:
        return "?"
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", default="gpt3-175b", choices=["gpt3-175b", "llama2-70b", "quick"])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TRITON_TYPE))
    p.add_argument("--w-dtype", default=None, choices=sorted(TRITON_TYPE) + sorted(FLOAT8_TYPE),
                   help="w's dtype (default: x's; they differ only where one is float8)")
    p.add_argument("--w-transposed", action="store_true",
                   help="w given as w^T [n, K] (K contiguous), read in place")
    p.add_argument("--precision", default=None, choices=["default", "high", "highest"],
                   help="the ops' precision (float32: tf32 unless highest)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--sms", type=int, default=132, help="SMs of the target (H100 SXM: 132)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--tuned", metavar="DEVICE_KIND", default=None,
                   help="use autotuned configs of this device kind where cached")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compiled"))
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: this compiles for a GPU", file=sys.stderr)
        return 2
    if cuda_tool("nvdisasm") is None:
        print("Triton's CUDA tools (cuobjdump, nvdisasm) are missing", file=sys.stderr)
        return 2
    dtype, w_dtype = jnp.dtype(a.dtype), jnp.dtype(a.w_dtype or a.dtype)
    try:
        gemm.mma_dtype(dtype, w_dtype)
    except ValueError as e:
        p.error(str(e))
    rows = []
    for shape in sweep_shapes(a.sweep):
        if shape.m % a.world:
            continue
        row = analyse(shape, dtype, a.world, a.sms, a.arch, a.tuned, w_dtype, a.w_transposed,
                      a.precision)
        rows.append(row)
        print(harness.format_row(row, ["op", "shape", "M", "tile", "warps", "regs", "stack",
                                       "fit_per_sm", "gemm_programs", "tiles", "waves",
                                       "last_wave_fill", "w_reads_est", "w_reads_est_rowmajor",
                                       "loop", "loop_plain_gemm",
                                       "narrow_copies"]), flush=True)
    env = {
        "target": f"sm_{a.arch}a, {a.sms} SMs assumed; compiled on a CPU-only host, not run",
        "triton": triton.__version__, "ptxas": _ptxas_version(), "world": a.world,
        "command": "python -m benchmarks.compiled " + " ".join(shlex.quote(x) for x in
                                                               (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    notes = [
        "Static: what the compiled code shows, nothing timed. `loop`: SASS instructions of the "
        "K loop (per BLOCK_K step) of the fused kernel, `loop_plain_gemm`: the same for Triton's "
        "plain GEMM with the same tile; `loop_mma`/`loop_ldgsts`: tensor-core MMAs and cp.async "
        "copies per step (`loop_ffma`: float32 FMAs, exact float32's CUDA-core GEMM, whose K "
        "loop is the one around the first FFMA); `loop_spills`: local-memory accesses in the "
        "loop; `loop_kind`: `K`, "
        "or `tile` where ptxas unrolled a short K loop and the loop found is the persistent "
        "loop over output tiles (its numbers are then per tile); `narrow_copies`: "
        "cp.async copies narrower than 16 bytes in the PTX (float32 w is copied 4 bytes at a "
        "time: tf32 wgmma wants both operands K-major and w is row-major).",
        "`fit_per_sm`: programs of the fused kernel that fit one SM (registers, shared memory, "
        "warps), `bound_by`: the first limit; `programs_per_sm`: what the config's grid assumes. "
        "`gemm_programs`: the persistent grid less the helper programs (AG: communication, RS: "
        "reduction); `waves`: output tiles / GEMM programs, rounded up; `last_wave_fill`: the "
        "share of GEMM program slots that have a tile, over all waves.",
        "`w_reads_est`/`x_reads_est`: an ESTIMATE (a model, not a measurement) of how many times "
        "the tile order reads the whole of w / x from HBM, if each wave of programs reads the "
        "tiles it touches once and nothing stays in L2 between waves; `w_reads_est_rowmajor`: "
        "the same for row-major order (group_m=1), the order before group_m existed.",
        "`comm_kib_in_flight` (AG): communication programs x one copy tile: the loads the "
        "pushes have outstanding at once (a program's stores into a peer cannot pass its next "
        "loads). At ~1 us a load, KiB in flight / 1 us is an ESTIMATE of the push rate in "
        "GB/s; an AG-GEMM needs about (P-1)/(P n) bytes per GEMM flop (n: w's columns a rank).",
    ]
    os.makedirs(a.out, exist_ok=True)
    wname = ("" if w_dtype == dtype else f"_w_{w_dtype.name}") + ("_wT" if a.w_transposed else "")
    wname += f"_{a.precision}" if a.precision else ""
    base = os.path.join(a.out, f"compiled_{a.sweep}_{dtype.name}{wname}_sm{a.arch}")
    columns = COLUMNS[:5] + ["config"] + COLUMNS[5:]
    harness.write_csv(base + ".csv", [{c: r.get(c) for c in columns} for r in rows])
    harness.write_markdown(base + ".md", f"Fused kernels as compiled for sm_{a.arch}: {a.sweep}, "
                           f"{dtype.name} x {w_dtype.name}{' (w^T)' if a.w_transposed else ''}, "
                           f"P={a.world}",
                           env,
                           [("per shape", harness.markdown_table(rows, columns))], notes)
    print(f"wrote {base}.csv/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
