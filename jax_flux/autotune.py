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
import json
import os
import statistics
import threading
import time
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from custom_calls.gemm import mma_dtype
from jax_flux._timing import sample_ms
from jax_flux.config import AllGatherMatmulConfig, MatmulReduceScatterConfig

AG, RS = "all_gather_matmul", "matmul_reduce_scatter"
CONFIG_CLASSES = {AG: AllGatherMatmulConfig, RS: MatmulReduceScatterConfig}
SHIPPED = os.path.join(os.path.dirname(__file__), "tuned_defaults.json")
# Shared memory per SM a program may use (H100/H200: 227 KiB).
DEFAULT_SMEM_BYTES = 227 * 1024

_lock = threading.Lock()
_loaded: dict[str, dict] = {}


def cache_path() -> str:
    """The user cache's file: ``$JAX_FLUX_AUTOTUNE_CACHE``, else
    ``~/.cache/jax_flux/autotune.json``."""
    return os.environ.get("JAX_FLUX_AUTOTUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jax_flux", "autotune.json")


def key(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
        out_dtype=None, w_transposed: bool = False, w_dtype=None) -> str:
    """The cache key of one problem.

    A result dtype other than ``dtype`` adds ``|out=<dtype>``, a w of another
    dtype (one of them float8) adds ``|w=<dtype>``, a transposed w adds
    ``|wT``: the plain case keeps its old key.

    Args:
      op: ``"all_gather_matmul"`` or ``"matmul_reduce_scatter"``.
      device_kind: ``jax.Device.device_kind`` of the mesh's devices.
      m_local, k, n: the per-rank problem. AG-GEMM: x [m_local, k] (this rank's
        rows), w [k, n] (this rank's columns); GEMM-RS: x [P * m_local, k], w [k, n]
        (m_local rows of the result a rank).
      dtype: x's dtype.
      world: the size of the tensor-parallel axis, P.
      out_dtype: the result dtype (the ops' ``preferred_element_type``); None: ``dtype``.
      w_transposed: w given as w^T [n, k].
      w_dtype: w's dtype; None: ``dtype``.

    Returns:
      The key, e.g. ``"NVIDIA H200|all_gather_matmul|m=1024,k=12288,n=6144|bfloat16|P=8"``.
    """
    out = jnp.dtype(out_dtype or dtype)
    entry = f"{device_kind}|{op}|m={m_local},k={k},n={n}|{jnp.dtype(dtype).name}|P={world}"
    if out != jnp.dtype(dtype):
        entry += f"|out={out.name}"
    if w_dtype is not None and jnp.dtype(w_dtype) != jnp.dtype(dtype):
        entry += f"|w={jnp.dtype(w_dtype).name}"
    return entry + ("|wT" if w_transposed else "")


def _read(path: str) -> dict:
    with _lock:
        if path not in _loaded:
            try:
                with open(path) as f:
                    _loaded[path] = json.load(f)
            except FileNotFoundError:
                _loaded[path] = {}
        return _loaded[path]


def _entry(entry_key: str) -> tuple[str, dict] | None:
    """(the file, the entry) for ``entry_key``: the user cache's, else the shipped one."""
    for path in (cache_path(), SHIPPED):
        entry = _read(path).get(entry_key)
        if entry is not None:
            return path, entry
    return None


# An untuned problem takes the record of the nearest tuned m_local (rows a rank)
# with everything else equal, up to this ratio either way: sequence lengths
# vary from call to call (prefill), tuning sweeps take a few of them.
NEAREST_M_RATIO = 2.0


def _problem_entry(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int,
                   **kw) -> tuple[str, str, dict] | None:
    """(key, file, entry) of one problem (``key``'s arguments): its own, else that
    of the nearest tuned m_local within ``NEAREST_M_RATIO`` (log scale; the user
    cache's before the shipped one at equal distance, then the larger m)."""
    own = key(op, device_kind, m_local, k, n, dtype, world, **kw)
    exact = _entry(own)
    if exact is not None:
        return (own, *exact)
    if m_local < 1:
        return None
    # The key with m_local cut out: an entry matches when only its m differs.
    head, tail = key(op, device_kind, 0, k, n, dtype, world, **kw).split("|m=0,", 1)
    head += "|m="
    best = None  # ((distance, source, -m), (key, file, entry))
    for source, path in enumerate((cache_path(), SHIPPED)):
        for entry_key, entry in _read(path).items():
            m_text, _, rest = entry_key[len(head):].partition(",")
            if not entry_key.startswith(head) or rest != tail or not m_text.isdigit():
                continue
            m = int(m_text)
            distance = abs(np.log2(m / m_local)) if m else np.inf
            if distance <= np.log2(NEAREST_M_RATIO) + 1e-9:
                rank = (distance, source, -m)
                if best is None or rank < best[0]:
                    best = (rank, (entry_key, path, entry))
    return best[1] if best else None


def lookup(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
           out_dtype=None, w_transposed: bool = False, w_dtype=None):
    """The tuned config of one problem: what ``impl="fused"`` with ``config=None`` runs.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype:
        the problem, as ``key`` takes it.

    Returns:
      The config class's instance from the user cache, else from the shipped
      defaults, of this problem or else of the nearest tuned m_local (within
      ``NEAREST_M_RATIO``, all else equal); None where there is no such
      entry, or no fused config passed when it was tuned (the config
      heuristic applies then).
    """
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, out_dtype=out_dtype,
                           w_transposed=w_transposed, w_dtype=w_dtype)
    if found is None or not found[2].get("config"):
        return None
    return CONFIG_CLASSES[op](**found[2]["config"])


def measured_ms(entry: dict) -> dict[str, float]:
    """{impl: median ms} of what an entry measured: the fused config's (if one
    passed), xla's and ring's (entries tuned before these were recorded: the
    fused one alone)."""
    times = {"fused": entry.get("median_ms") if entry.get("config") else None,
             "xla": entry.get("xla_ms"), "ring": entry.get("ring_ms")}
    return {impl: float(t) for impl, t in times.items() if t is not None}


def best_impl(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
              out_dtype=None, w_transposed: bool = False, w_dtype=None) -> str | None:
    """The impl measured fastest for one problem on one device kind: what ``impl="auto"`` runs.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype:
        the problem, as ``key`` takes it.

    Returns:
      ``"fused"``, ``"xla"`` or ``"ring"``, by the medians of the entry
      ``lookup`` reads (the user cache's, else the shipped one; the nearest
      tuned m_local's where this one was not tuned; a tie stays on xla);
      None where the problem was not timed against xla (no entry, or one
      tuned before xla's time was recorded): ``auto`` runs xla then.
    """
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, out_dtype=out_dtype,
                           w_transposed=w_transposed, w_dtype=w_dtype)
    times = measured_ms(found[2]) if found is not None else {}
    if "xla" not in times:
        return None
    return min(times, key=lambda impl: (times[impl], impl != "xla"))  # a tie stays on xla


def explain(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
            out_dtype=None, w_transposed: bool = False, w_dtype=None) -> dict:
    """What the ops run for one problem, and from which record: why ``auto``
    picks what it picks.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype:
        the problem, as ``key`` takes it.

    Returns:
      ``{"key": the problem's key, "record": the key of the record used (the
      problem's own, or the nearest tuned m_local's) or None, "file": the
      cache file it is in, "config": the fused config ``impl="fused"`` runs
      (None: the shape heuristic), "measured_ms": {impl: ms} of the record,
      "auto": the impl ``impl="auto"`` runs}``.
    """
    kw = dict(out_dtype=out_dtype, w_transposed=w_transposed, w_dtype=w_dtype)
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, **kw)
    record_key, path, entry = found or (None, None, {})
    return {"key": key(op, device_kind, m_local, k, n, dtype, world, **kw),
            "record": record_key, "file": path,
            "config": lookup(op, device_kind, m_local, k, n, dtype, world, **kw),
            "measured_ms": measured_ms(entry),
            "auto": best_impl(op, device_kind, m_local, k, n, dtype, world, **kw) or "xla"}


def cached_entry(entry_key: str) -> dict | None:
    """The user cache's entry for ``entry_key``, as ``record`` stored it."""
    return _read(cache_path()).get(entry_key)


def record(op: str, entry_key: str, config, median_ms: float | None, *,
           baselines_ms: dict[str, float] | None = None) -> None:
    """Stores a tuning result in the user cache (an atomic file replace).

    Args:
      op: the op's name.
      entry_key: from ``key``.
      config: the fastest fused config; None where none passed.
      median_ms: its median time; None with no config.
      baselines_ms: the other impls' median times on the same problem,
        ``{"xla": ms, "ring": ms}``, read by ``best_impl``.
    """
    path = cache_path()
    data = dict(_read(path))
    data[entry_key] = {"op": op, "config": dataclasses.asdict(config) if config else None,
                       "median_ms": median_ms, "tuned": time.strftime("%Y-%m-%d %H:%M:%S"),
                       **{f"{impl}_ms": ms for impl, ms in (baselines_ms or {}).items()}}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    with _lock:
        _loaded[path] = data


def _smem_bytes(block_m, block_n, block_k, stages, itemsize) -> int:
    return (block_m * block_k + block_k * block_n) * itemsize * stages


def candidates(op: str, m_local: int, k: int, n: int, dtype, world: int, *,
               interpreting: bool = False, smem_bytes: int = DEFAULT_SMEM_BYTES,
               sms: int = 132, out_dtype=None, w_dtype=None) -> list:
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
    both at the wider item size bounds its shared memory).
    """
    itemsize = mma_dtype(dtype, w_dtype).itemsize
    if interpreting:  # the interpreter has no shared memory or warps: few, small choices
        rows_blocks, blocks, k_blocks, warps, stages = (16, 32), (16, 32), (16, 32), (4,), (1,)
    else:  # small row tiles are for decode-sized M
        rows_blocks, blocks, k_blocks = (16, 32, 64, 128, 256), (64, 128, 256), (32, 64, 128)
        warps, stages = (4, 8), (3, 4)
    per_sm = (1,) if interpreting else (1, 2)
    rows = m_local
    default = CONFIG_CLASSES[op].default(m_local, k, n, world, interpreting, sms=sms,
                                         itemsize=itemsize,
                                         out_itemsize=jnp.dtype(out_dtype or dtype).itemsize)
    out = []
    for bm, bn, bk, nw, ns in itertools.product(rows_blocks, blocks, k_blocks, warps, stages):
        if bm > 2 * max(16, rows) or bn > 2 * max(16, n) or bk > 2 * max(16, k):
            continue
        if not interpreting and (_smem_bytes(bm, bn, bk, ns, itemsize) > smem_bytes or
                                 bm * bn > 128 * 32 * nw):
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
         w_transposed: bool = False, w_dtype=None, baselines: Iterable[str] = ("xla", "ring")):
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
        out_dtype=out_dtype, w_dtype=w_dtype)
    if max_configs is not None:
        configs = configs[:max_configs]
    x, w, _, _ = testing.random_operands(m, kk, nn, dtype, seed=11, w_dtype=w_dtype)
    variant = dict(preferred_element_type=out_dtype, w_transposed=w_transposed)
    xs, ws = testing.place(op, mesh, x, w, w_transposed=w_transposed)
    ref = np.asarray(testing.sharded(op, mesh, "xla", **variant)(xs, ws), np.float64)
    tol = max(testing.TOLERANCE[jnp.dtype(d)] for d in (dtype, w_dtype or dtype))

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
                       w_transposed=w_transposed, w_dtype=w_dtype),
               best[0] if best else None, best[1] if best else None, baselines_ms=timed)
    return (best[0] if best else None), rows


class _Wrong(Exception):
    """A result outside the tolerance: not timed."""
