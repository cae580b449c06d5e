"""A projection (not a measurement) of 8-GPU op times from one GPU's GEMM times.

    python -m benchmarks.projection benchmarks/results/gpu/gemm_gpt3-175b_bfloat16_gpu.csv

Input: a ``benchmarks.gemm`` CSV measured on one device (the per-rank GEMM
of TP=8, XLA's dot and the Triton GEMM). Output: predicted time and overlap
efficiency of each impl on P GPUs connected all-to-all (NVLink: about
450 GB/s per direction per H100), from this model:

* communication per rank: AG-GEMM receives (P-1)/P * M * K * x's bytes (the
  other ranks' rows), GEMM-RS sends (P-1)/P * M * N * the result's bytes
  (partials of the other ranks' rows: bfloat16 for float8 operands);
  ``comm = volume / link_bw``.
* xla: collective, then GEMM: ``comm + gemm``.
* ring: the first chunk GEMM (gemm / P) is exposed, then P // 2
  bidirectional steps, each ``max(two chunk GEMMs, one shard transfer)``
  plus a per-step overhead ``step_us``.
* fused: one kernel; the communication programs take ``comm_sms`` SMs from
  the GEMM while the copy runs concurrently:
  ``max(gemm_triton * sms / (sms - comm_sms), comm)`` plus the first chunk's
  latency; GEMM-RS adds the reduction tail (reading P partials of the last
  1/P of this rank's rows at ``hbm_bw``).

Overlap efficiency (Flux): E = 1 - (T_impl - gemm) / (T_xla - gemm). Every
number printed is labelled a projection; the model ignores NVLink protocol
efficiency, contention, and L2 effects.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from benchmarks import harness

COLUMNS = ["shape", "M", "K", "N", "P", "gemm_ms", "comm_ms", "xla_ms", "ring_ms", "fused_ms",
           "E_ring", "E_fused"]


def wire_itemsize(row: dict) -> int:
    """Bytes an element of what travels: x's rows (AG-GEMM) or the partial
    sums, in the result's dtype (GEMM-RS)."""
    import jax.numpy as jnp

    from benchmarks.ops import result_dtype

    x = jnp.dtype(row["dtype"])
    if row["shape"].startswith("ag"):
        return x.itemsize
    return jnp.dtype(result_dtype(x, jnp.dtype(row.get("b_dtype") or x))).itemsize


def project(row: dict, p: int, link_gbps: float, hbm_gbps: float, sms: int, comm_sms: int,
            step_us: float) -> dict:
    m, k, n = int(row["M"]), int(row["K"]), int(row["N"])
    gemm = float(row["xla_ms"])
    triton = float(row["triton_ms"]) if row.get("triton_ms") else gemm
    ag = row["shape"].startswith("ag")
    itemsize = wire_itemsize(row)
    volume = (p - 1) / p * m * (k if ag else n) * itemsize  # bytes per rank
    comm = volume / (link_gbps * 1e9) * 1e3
    xla = comm + gemm
    chunk_gemm, chunk_comm = gemm / p, comm / (p - 1)
    ring = chunk_gemm + (p // 2) * (max(2 * chunk_gemm, chunk_comm) + step_us * 1e-3)
    fused = max(triton * sms / (sms - comm_sms), comm) + chunk_comm / 8
    if not ag:  # reduction tail: P partials of the last 1/P of this rank's rows
        fused += p * (m / p / p) * n * itemsize / (hbm_gbps * 1e9) * 1e3

    def eff(t):
        return 1 - (t - gemm) / (xla - gemm) if xla > gemm else None

    return dict(shape=row["shape"], M=m, K=k, N=n, P=p, gemm_ms=gemm, comm_ms=comm, xla_ms=xla,
                ring_ms=ring, fused_ms=fused, E_ring=eff(ring), E_fused=eff(fused))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("gemm_csv", help="a benchmarks.gemm CSV measured on one device")
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--link-gbps", type=float, default=450.0, help="per direction per GPU")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--comm-sms", type=int, default=4, help="SMs the fused AG copy uses")
    ap.add_argument("--step-us", type=float, default=10.0, help="per ring step overhead")
    ap.add_argument("--out", default=None, help="markdown path (default: next to the CSV)")
    a = ap.parse_args(argv)
    with open(a.gemm_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("xla_ms")]
    out = [project(r, a.p, a.link_gbps, a.hbm_gbps, a.sms, a.comm_sms, a.step_us) for r in rows]
    path = a.out or os.path.splitext(a.gemm_csv)[0] + f"_projection_P{a.p}.md"
    params = (f"P={a.p}, link {a.link_gbps} GB/s per direction, HBM {a.hbm_gbps} GB/s, "
              f"{a.sms} SMs ({a.comm_sms} for communication), ring step overhead {a.step_us} us")
    with open(path, "w") as f:
        f.write(f"# PROJECTION (not a measurement): {a.p} GPUs from {os.path.basename(a.gemm_csv)}"
                f"\n\nModel and assumptions: see benchmarks/projection.py. Parameters: {params}.\n\n"
                + harness.markdown_table(out, COLUMNS) + "\n")
    print(harness.markdown_table(out, COLUMNS))
    print(f"PROJECTION written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
