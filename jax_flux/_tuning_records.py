"""The autotuning records: cache keys, the user cache and the shipped defaults,
and what the ops read from them (``jax_flux.autotune`` re-exports all of it).

``lookup`` gives ``impl="fused"`` its config and ``best_impl`` gives
``impl="auto"`` its impl: the problem's own entry (the user cache's, else the
shipped one), else that of the nearest tuned m_local within
``NEAREST_M_RATIO``, everything else in the key equal. ``record`` writes the
user cache; ``explain`` says which entry applies and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import jax.numpy as jnp
import numpy as np

from custom_calls.gemm import mma_dtype
from jax_flux import _precision
from jax_flux.config import AllGatherMatmulConfig, MatmulReduceScatterConfig

AG, RS = "all_gather_matmul", "matmul_reduce_scatter"
CONFIG_CLASSES = {AG: AllGatherMatmulConfig, RS: MatmulReduceScatterConfig}
SHIPPED = os.path.join(os.path.dirname(__file__), "tuned_defaults.json")
_lock = threading.Lock()
_loaded: dict[str, dict] = {}


def cache_path() -> str:
    """The user cache's file: ``$JAX_FLUX_AUTOTUNE_CACHE``, else
    ``~/.cache/jax_flux/autotune.json``."""
    return os.environ.get("JAX_FLUX_AUTOTUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "jax_flux", "autotune.json")


def key(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
        out_dtype=None, w_transposed: bool = False, w_dtype=None, precision=None) -> str:
    """The cache key of one problem.

    A result dtype other than ``dtype`` adds ``|out=<dtype>``, a w of another
    dtype (one of them float8) adds ``|w=<dtype>``, a transposed w adds
    ``|wT``, float32 MMAs at a precision other than tensorfloat32 add
    ``|f32=ieee`` (or ``tf32x3``): the plain case keeps its old key.

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
      precision: the ops' ``precision`` (None: ``jax_default_matmul_precision``).

    Returns:
      The key, e.g. ``"NVIDIA H200|all_gather_matmul|m=1024,k=12288,n=6144|bfloat16|P=8"``.
    """
    out = jnp.dtype(out_dtype or dtype)
    entry = f"{device_kind}|{op}|m={m_local},k={k},n={n}|{jnp.dtype(dtype).name}|P={world}"
    if out != jnp.dtype(dtype):
        entry += f"|out={out.name}"
    if w_dtype is not None and jnp.dtype(w_dtype) != jnp.dtype(dtype):
        entry += f"|w={jnp.dtype(w_dtype).name}"
    entry += "|wT" if w_transposed else ""
    return entry + _precision.key_suffix(precision, mma_dtype(dtype, w_dtype))


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
           out_dtype=None, w_transposed: bool = False, w_dtype=None, precision=None):
    """The tuned config of one problem: what ``impl="fused"`` with ``config=None`` runs.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype,
        precision: the problem, as ``key`` takes it.

    Returns:
      The config class's instance from the user cache, else from the shipped
      defaults, of this problem or else of the nearest tuned m_local (within
      ``NEAREST_M_RATIO``, all else equal); None where there is no such
      entry, or no fused config passed when it was tuned (the config
      heuristic applies then).
    """
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, out_dtype=out_dtype,
                           w_transposed=w_transposed, w_dtype=w_dtype, precision=precision)
    if found is None or not found[2].get("config"):
        return None
    # Configs recorded before precision became the ops' argument held it as a
    # field (float32 MMAs' input precision, which the key did not carry).
    fields = {f: v for f, v in found[2]["config"].items() if f != "f32_precision"}
    return CONFIG_CLASSES[op](**fields)


def measured_ms(entry: dict) -> dict[str, float]:
    """{impl: median ms} of what an entry measured: the fused config's (if one
    passed), xla's and ring's (entries tuned before these were recorded: the
    fused one alone)."""
    times = {"fused": entry.get("median_ms") if entry.get("config") else None,
             "xla": entry.get("xla_ms"), "ring": entry.get("ring_ms")}
    return {impl: float(t) for impl, t in times.items() if t is not None}


def best_impl(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
              out_dtype=None, w_transposed: bool = False, w_dtype=None, precision=None,
              exclude: tuple[str, ...] = ()) -> str | None:
    """The impl measured fastest for one problem on one device kind: what ``impl="auto"`` runs.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype,
        precision: the problem, as ``key`` takes it.
      exclude: impls not to consider (``("fused",)``: what ``auto`` runs
        where the fused kernels cannot run on the mesh).

    Returns:
      ``"fused"``, ``"xla"`` or ``"ring"``, by the medians of the entry
      ``lookup`` reads (the user cache's, else the shipped one; the nearest
      tuned m_local's where this one was not tuned; a tie stays on xla);
      None where the problem was not timed against xla (no entry, or one
      tuned before xla's time was recorded): ``auto`` runs xla then.
    """
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, out_dtype=out_dtype,
                           w_transposed=w_transposed, w_dtype=w_dtype, precision=precision)
    times = measured_ms(found[2]) if found is not None else {}
    if "xla" not in times:
        return None
    times = {impl: t for impl, t in times.items() if impl not in exclude}
    if not times:
        return None
    return min(times, key=lambda impl: (times[impl], impl != "xla"))  # a tie stays on xla


def explain(op: str, device_kind: str, m_local: int, k: int, n: int, dtype, world: int, *,
            out_dtype=None, w_transposed: bool = False, w_dtype=None, precision=None) -> dict:
    """What the ops run for one problem, and from which record: why ``auto``
    picks what it picks.

    Args:
      op, device_kind, m_local, k, n, dtype, world, out_dtype, w_transposed, w_dtype,
        precision: the problem, as ``key`` takes it.

    Returns:
      ``{"key": the problem's key, "record": the key of the record used (the
      problem's own, or the nearest tuned m_local's) or None, "file": the
      cache file it is in, "config": the fused config ``impl="fused"`` runs
      (None: the shape heuristic), "measured_ms": {impl: ms} of the record,
      "auto": the impl ``impl="auto"`` runs, "fallback": what it runs instead
      where that is "fused" and the mesh cannot run the fused kernels (the
      faster of xla and ring; None where auto is not "fused")}``.
    """
    kw = dict(out_dtype=out_dtype, w_transposed=w_transposed, w_dtype=w_dtype,
              precision=precision)
    found = _problem_entry(op, device_kind, m_local, k, n, dtype, world, **kw)
    record_key, path, entry = found or (None, None, {})
    auto = best_impl(op, device_kind, m_local, k, n, dtype, world, **kw) or "xla"
    return {"key": key(op, device_kind, m_local, k, n, dtype, world, **kw),
            "record": record_key, "file": path,
            "config": lookup(op, device_kind, m_local, k, n, dtype, world, **kw),
            "measured_ms": measured_ms(entry), "auto": auto,
            "fallback": (best_impl(op, device_kind, m_local, k, n, dtype, world, **kw,
                                   exclude=("fused",)) or "xla") if auto == "fused" else None}


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
