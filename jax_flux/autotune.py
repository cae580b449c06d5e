"""Autotuning of the fused kernels: a pruned config space, verify-then-time, a persistent cache.

``tune(...)`` runs every candidate config of one op and shape on a mesh,
discards any whose result is not within tolerance of the lax collective,
times the rest (median of device-synchronised runs) and records the fastest
in the cache, with the times of impls ``"xla"`` and ``"ring"`` on the same
problem in the same process. ``impl="fused"`` with ``config=None`` consults,
in order: the user's cache, the defaults shipped with jax_flux
(``tuned_defaults.json``), then the shape heuristic of the config class.
``impl="auto"`` takes the impl measured fastest there (``best_impl``), and
xla for a problem never measured. A problem not tuned itself takes the record
of the nearest tuned m_local (within a factor ``NEAREST_M_RATIO``), all else
equal: prefill lengths vary from call to call.

Cache entries are keyed by device kind, op, per-rank shape, dtype and axis
size, and, where they are not the plain case, the result dtype
(``preferred_element_type``), w's dtype (a float8 w against wider x) and w's
layout (w^T, as the backward pass reads it). The cache is a JSON file at
``$JAX_FLUX_AUTOTUNE_CACHE`` or ``~/.cache/jax_flux/autotune.json``; nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from custom_calls.gemm import mma_dtype
from jax_flux._precision import kernel_input_precision
from jax_flux._timing import sample_ms
from jax_flux.config import WIDE_F32, AllGatherMatmulConfig, MatmulReduceScatterConfig
# The records (keys, cache files, lookups) live in their own module, the
# search in this one; both are this module's public API.
from jax_flux._tuning_records import (AG, CONFIG_CLASSES, NEAREST_M_RATIO, RS, SHIPPED,
                                      best_impl, cache_path, cached_entry, explain, key,
                                      lookup, measured_ms, record)

__all__ = ["AG", "RS", "CONFIG_CLASSES", "SHIPPED", "NEAREST_M_RATIO", "DEFAULT_SMEM_BYTES",
           "cache_path", "key", "lookup", "measured_ms", "best_impl", "explain", "cached_entry",
           "record", "candidates", "tune"]

# Shared memory per SM a program may use (H100/H200: 227 KiB).
DEFAULT_SMEM_BYTES = 227 * 1024


def _smem_bytes(block_m, block_n, block_k, stages, itemsize) -> int:
    return (block_m * block_k + block_k * block_n) * itemsize * stages


def candidates(op: str, m_local: int, k: int, n: int, dtype, world: int, *,
               interpreting: bool = False, smem_bytes: int = DEFAULT_SMEM_BYTES,
               sms: int = 132, out_dtype=None, w_dtype=None, precision=None) -> list:
    """The config space of one problem, pruned of configs that cannot fit or make no sense,
    in search order.

    Pruned: tiles more than twice the (padded) problem in any dim, operand
    staging beyond shared memory, more than 128 accumulator elements per
    thread, chunks larger than a rank's rows, more communication programs
    than chunks to push, two programs an SM where two do not fit. Tile orders: grouped
    and rank-rotated, row-major (group_m=1; GPU only), unrotated.

    Order: the shape heuristic's config (what ``impl="fused"`` uses untuned)
    first, then by how many fields differ from it: every one-field change
    before any two-field one, and so on. A search cut short (``max_configs``)
    so still varies each axis (tile, warps, stages, programs per SM, tile
    order, chunks, helper programs) around the default.

    ``dtype`` is x's; tiles are sized by the MMAs' operand dtype (a float8
    operand against a wider one is staged narrower, then widened: sizing
    both at the wider item size bounds its shared memory). Float32 MMAs at
    ``precision`` (the ops') other than one tensorfloat32 pass
    (``config.WIDE_F32``) keep to 64 accumulators a thread, and exact float32
    to K tiles of 16 or 32: more spill (``jax_flux.config``). None at a
    precision the fused kernels refuse (``tune`` then times the baselines only).
    """
    mma = mma_dtype(dtype, w_dtype)
    itemsize = mma.itemsize
    try:
        input_precision = kernel_input_precision(op, precision, mma)
    except ValueError:  # a precision the fused kernels refuse: no config runs it
        return []
    wide = itemsize == 4 and input_precision in WIDE_F32
    per_thread = 64 if wide else 128  # accumulator elements a thread, at most
    if interpreting:  # the interpreter has no shared memory or warps: few, small choices
        rows_blocks, blocks, k_blocks, warps, stages = (16, 32), (16, 32), (16, 32), (4,), (1,)
    else:  # small row tiles are for decode-sized M
        rows_blocks, blocks, k_blocks = (16, 32, 64, 128, 256), (64, 128, 256), (32, 64, 128)
        if wide and input_precision == "ieee":
            k_blocks = (16, 32)
        warps, stages = (4, 8), (3, 4)
    per_sm = (1,) if interpreting else (1, 2)
    rows = m_local
    default = CONFIG_CLASSES[op].default(m_local, k, n, world, interpreting, sms=sms,
                                         itemsize=itemsize,
                                         out_itemsize=jnp.dtype(out_dtype or dtype).itemsize,
                                         input_precision=input_precision)
    out = []
    for bm, bn, bk, nw, ns in itertools.product(rows_blocks, blocks, k_blocks, warps, stages):
        if bm > 2 * max(16, rows) or bn > 2 * max(16, n) or bk > 2 * max(16, k):
            continue
        if not interpreting and (_smem_bytes(bm, bn, bk, ns, itemsize) > smem_bytes or
                                 bm * bn > per_thread * 32 * nw):
            continue
        for pps in per_sm:
            # Two programs an SM only where two fit: shared memory and 64 warps.
            if pps > 1 and (2 * _smem_bytes(bm, bn, bk, ns, itemsize) > smem_bytes or nw > 8):
                continue
            out.extend(_op_candidates(op, rows, world, interpreting, default, dict(
                block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns,
                programs_per_sm=pps)))
    return sorted(dict.fromkeys([default] + out), key=lambda c: _distance(c, default))


def _distance(config, default) -> int:
    """How many fields of ``config`` differ from ``default``."""
    return sum(getattr(config, f.name) != getattr(default, f.name)
               for f in dataclasses.fields(config))


def _op_candidates(op: str, rows: int, world: int, interpreting: bool, default,
                   common: dict) -> list:
    """The op-specific dimensions (tile order: rotation and row groups; chunks,
    communication or reduction programs, copy tiles: the heuristic's and two more;
    AG: push or pull)."""
    out, bm = [], common["block_m"]
    # Grouped, rank-rotated order first; then row-major, then unrotated.
    orders = ((True, 8), (False, 8)) if interpreting else ((True, 8), (True, 1), (False, 8))
    for rotate, group_m in orders:
        if op == AG:
            # One tile, the heuristic's (up to 256 rows), a rank's rows.
            chunks = sorted({bm, max(bm, min(rows, 256)), max(bm, rows)})
            copies = [(default.copy_rows, default.copy_cols)]
            if not interpreting:
                copies = list(dict.fromkeys(copies + [(32, 256), (32, 128)]))
            for chunk, comm, (copy_rows, copy_cols), pull in itertools.product(
                    chunks, (8, 4, 2, 1, 16), copies, (False, True)):
                items = max(1, world - 1) * -(-max(rows, 1) // chunk)  # chunks to move
                if chunk > max(rows, 1) * 2 or comm > items:
                    continue
                out.append(AllGatherMatmulConfig(chunk_rows=chunk, comm_programs=comm,
                                                 copy_rows=copy_rows, copy_cols=copy_cols,
                                                 pull=pull, rotate=rotate, group_m=group_m,
                                                 **common))
        else:
            # 0: no reduction programs, the own tiles' epilogue reduces.
            for reduce in ((1, 2) if interpreting else (8, 0, 4, 16)):
                out.append(MatmulReduceScatterConfig(reduce_programs=reduce, rotate=rotate,
                                                     group_m=group_m, **common))
    return out


def tune(op: str, mesh, m_local: int, k: int, n: int, dtype, *, configs: Iterable | None = None,
         reps: int = 10, max_configs: int | None = None, log=print, out_dtype=None,
         w_transposed: bool = False, w_dtype=None, precision=None,
         baselines: Iterable[str] = ("xla", "ring")):
    """Verifies and times candidate configs of one problem on ``mesh``; records the best.

    Each candidate runs on random operands and is checked against the lax
    collective (xla impl) first; only a result within the dtype's tolerance
    is timed (median of ``reps`` device-synchronised samples). The
    ``baselines`` impls are verified and timed on the same problem too, and
    their times recorded beside the fastest fused config's under the
    problem's ``key``: ``impl="fused"`` then runs that config and
    ``impl="auto"`` the fastest impl (``best_impl``). A candidate that fails
    (compiler, device, a timed-out wait) is reported and the workspace reset:
    run it while no other fused call is in flight.

    Args:
      op: ``"all_gather_matmul"`` or ``"matmul_reduce_scatter"``.
      mesh: a 1-D mesh with axis ``"tp"`` (``jax_flux.testing.mesh``).
      m_local, k, n: the per-rank problem, as ``key`` takes it.
      dtype: x's dtype.
      configs: the configs to try; None: ``candidates`` of the problem.
      reps: timed samples a config.
      max_configs: try only the first this many (``candidates`` puts the
        heuristic's config first, then those nearest it).
      log: called with a line for each timed config and baseline.
      out_dtype: the result dtype (the ops' ``preferred_element_type``).
      w_transposed: w given as w^T, as the backward passes launch the kernels.
      w_dtype: w's dtype where it is not ``dtype`` (a float8 weight, or the
        backward pass's float8 weight against a wider cotangent).
      precision: the ops' ``precision`` (float32 MMAs: tensorfloat32 or not).
      baselines: the other impls to time and record.

    Returns:
      ``(best config or None, rows)``, a row ``{"config", "status", "median_ms"}``
      for each config tried (``status`` says why one was not timed).
    """
    from jax_flux import testing, workspace
    from jax_flux._fused import interpreter_ready, sm_count

    world = mesh.devices.size
    if op == AG:
        m, kk, nn = world * m_local, k, n * world
    else:
        m, kk, nn = world * m_local, k * world, n
    configs = list(configs) if configs is not None else candidates(
        op, m_local, k, n, dtype, world, interpreting=interpreter_ready(), sms=sm_count(),
        out_dtype=out_dtype, w_dtype=w_dtype, precision=precision)
    if max_configs is not None:
        configs = configs[:max_configs]
    x, w, _, _ = testing.random_operands(m, kk, nn, dtype, seed=11, w_dtype=w_dtype)
    variant = dict(preferred_element_type=out_dtype, w_transposed=w_transposed,
                   precision=precision)
    xs, ws = testing.place(op, mesh, x, w, w_transposed=w_transposed)
    ref = np.asarray(testing.sharded(op, mesh, "xla", **variant)(xs, ws), np.float64)
    mma = mma_dtype(dtype, w_dtype)
    tol = max(testing.tolerance(d, mma, precision=precision,
                                platform=mesh.devices.flat[0].platform)
              for d in (dtype, w_dtype or dtype))

    def verified_ms(fn) -> float:
        """Median ms of ``fn`` once its result is within ``tol`` of the reference."""
        err = testing.relative_error(fn(xs, ws), ref)
        if not err < tol:
            raise _Wrong(f"wrong (rel err {err:.2e})")
        return statistics.median(sample_ms(fn, (xs, ws), warmup=1, reps=reps)[0])

    rows, best = [], None
    for cfg in configs:
        try:
            ms = verified_ms(testing.sharded(op, mesh, "fused", cfg, **variant))
        except _Wrong as e:
            rows.append({"config": cfg, "status": str(e)})
            continue
        except Exception as e:  # the compiler or device rejects it, or a wait timed out
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [""]
            rows.append({"config": cfg, "status": f"failed: {type(e).__name__}: {last[0]}"[:300]})
            # A timed-out call leaves the workspace out of step (see PeerTimeoutError).
            workspace.reset()
            continue
        rows.append({"config": cfg, "status": "ok", "median_ms": ms})
        log(f"{ms:10.3f} ms  {cfg}")
        if best is None or ms < best[1]:
            best = (cfg, ms)
    timed = {}
    for impl in baselines:
        try:
            timed[impl] = verified_ms(testing.sharded(op, mesh, impl, **variant))
            log(f"{timed[impl]:10.3f} ms  impl={impl}")
        except _Wrong as e:
            log(f"impl={impl}: {e}, not recorded")
    if best is not None or timed:
        device_kind = mesh.devices.flat[0].device_kind
        record(op, key(op, device_kind, m_local, k, n, dtype, world, out_dtype=out_dtype,
                       w_transposed=w_transposed, w_dtype=w_dtype, precision=precision),
               best[0] if best else None, best[1] if best else None, baselines_ms=timed)
    return (best[0] if best else None), rows


class _Wrong(Exception):
    """A result outside the tolerance: not timed."""
