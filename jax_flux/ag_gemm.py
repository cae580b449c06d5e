"""AllGather-GEMM: ``all_gather(x, tiled) @ w`` inside ``shard_map``, by impl.

Every function here runs inside ``shard_map`` on one rank's operands:
x [m, K] (this rank's rows), w [K, n]. The result [m * P, n] holds rank r's
rows at [r * m, (r + 1) * m), the row order of ``lax.all_gather(tiled=True)``.

* ``reference``: the lax collective, then the matmul (what users write today);
  also the ``"xla"`` impl.
* ``ring``: medium-grained decomposition. Shards travel a bidirectional
  ``ppermute`` ring (forward carries sources idx-1, idx-2, ...; backward
  idx+1, idx+2, ...), and each step's two chunk matmuls are independent of
  the next step's permutes, so XLA overlaps them. P // 2 steps in total.
* ``fused``: the Flux kernel (``custom_calls``), one Triton launch per call.
"""

from __future__ import annotations

import functools
from typing import Hashable

import jax.numpy as jnp
from jax import lax

from custom_calls import ag_gemm as kernel
from custom_calls.gemm import mma_dtype
from jax_flux import _fused
from jax_flux._axes import ppermute
from jax_flux._matmul import dot
from jax_flux._precision import kernel_input_precision
from jax_flux.config import AllGatherMatmulConfig


def reference(x, w, axis_name: Hashable, *, return_gathered: bool = False, out_dtype=None,
              precision=None):
    """``lax.all_gather`` then matmul (result in ``out_dtype``, default x's); also
    returns the gathered x if asked."""
    xg = lax.all_gather(x, axis_name, axis=0, tiled=True)
    y = dot(xg, w, out_dtype, precision)
    return (y, xg) if return_gathered else y


def ring(x, w, axis_name: Hashable, size: int, *, return_gathered: bool = False,
         out_dtype=None, precision=None):
    """Bidirectional collective-permute ring; lowers to collective_permute only."""
    out_dtype = out_dtype or x.dtype
    if size == 1:
        y = dot(x, w, out_dtype, precision)
        return (y, x) if return_gathered else y
    m = x.shape[0]
    idx = lax.axis_index(axis_name)
    fwd_perm = [(i, (i + 1) % size) for i in range(size)]
    bwd_perm = [(i, (i - 1) % size) for i in range(size)]
    # P - 1 remote shards: P // 2 arrive going forward, (P - 1) // 2 backward.
    n_fwd, n_bwd = size // 2, (size - 1) // 2

    y = jnp.zeros((size * m, w.shape[1]), out_dtype)
    xg = jnp.zeros((size * m, x.shape[1]), x.dtype) if return_gathered else None

    def place(y, xg, chunk, src):
        row = src * m
        y = lax.dynamic_update_slice_in_dim(y, dot(chunk, w, out_dtype, precision), row, axis=0)
        if xg is not None:
            xg = lax.dynamic_update_slice_in_dim(xg, chunk, row, axis=0)
        return y, xg

    fwd = ppermute(x, axis_name, fwd_perm)
    bwd = ppermute(x, axis_name, bwd_perm) if n_bwd else None
    y, xg = place(y, xg, x, idx)  # own rows first, while the first permutes fly
    for step in range(1, n_fwd + 1):
        # Invariant: fwd holds the shard of rank idx - step, bwd that of idx + step.
        nxt_fwd = ppermute(fwd, axis_name, fwd_perm) if step < n_fwd else None
        nxt_bwd = ppermute(bwd, axis_name, bwd_perm) if step < n_bwd else None
        y, xg = place(y, xg, fwd, (idx - step) % size)
        if step <= n_bwd:
            y, xg = place(y, xg, bwd, (idx + step) % size)
        fwd, bwd = nxt_fwd, nxt_bwd
    return (y, xg) if return_gathered else y


def fused(x, w, axis_name: Hashable, size: int, config: AllGatherMatmulConfig | None = None, *,
          return_gathered: bool = False, out_dtype=None, w_transposed: bool = False,
          precision=None):
    """The Flux kernel: one Triton launch that gathers x through the workspace and
    multiplies tile by tile as rows arrive.

    With ``w_transposed``, ``w`` is given as w^T [n, K] and the kernel reads it
    in place: the backward pass's ``dz @ w^T`` makes no transposed copy of w.
    ``precision`` (``_precision.canonical``'s) sets the MMAs' input precision.
    Under ``jax.vmap`` with a shared w, the batch is one launch
    (``_fused.vmap_folding``).
    """
    launch = functools.partial(_launch, axis_name=axis_name, size=size, config=config,
                               return_gathered=return_gathered, out_dtype=out_dtype,
                               w_transposed=w_transposed, precision=precision)
    return _fused.vmap_folding(launch, x.shape[0])(x, w)


def _launch(x, w, rows: int, *, axis_name, size, config, return_gathered, out_dtype,
            w_transposed, precision):
    """One launch on x holding a batch of problems of ``rows`` rows each (x
    [batch * rows, K]): y [batch * P * rows, n], element-major."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    mma = mma_dtype(x.dtype, w.dtype)  # the MMAs' dtype (a float8 tile widened to it)
    input_precision = kernel_input_precision("all_gather_matmul", precision, mma)
    cfg = config or _fused.tuned_or_default(AllGatherMatmulConfig, "all_gather_matmul", m, k, n,
                                            size, x.dtype, out_dtype, w_transposed,
                                            w.dtype, precision, input_precision)
    if not isinstance(cfg, AllGatherMatmulConfig):
        raise ValueError(f"all_gather_matmul(impl='fused') takes an AllGatherMatmulConfig, "
                         f"got {type(cfg).__name__}")
    sig_off, data_off, nbytes = kernel.workspace_bytes(size, m, k, x.dtype.itemsize,
                                                       cfg.chunk_rows)
    launch = _fused.prepare("all_gather_matmul", axis_name, size, nbytes, cfg, mma)
    tiles = size * _fused.cdiv(m, cfg.block_m) * _fused.cdiv(n, cfg.block_n)
    grid = _fused.persistent_grid(cfg.num_programs, tiles, cfg.comm_programs, launch.max_programs)
    y, _, xg = kernel.ag_gemm(
        x, w, launch.ctx, launch.table, world=size, sig_off=sig_off, data_off=data_off,
        chunk_rows=cfg.chunk_rows, comm_programs=cfg.comm_programs,
        gemm_programs=grid - cfg.comm_programs, block_m=cfg.block_m, block_n=cfg.block_n,
        block_k=cfg.block_k, group_m=cfg.group_m, copy_rows=cfg.copy_rows,
        copy_cols=cfg.copy_cols,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, return_gathered=return_gathered,
        upcast=launch.upcast, input_precision=input_precision,
        remote_cache=launch.remote_cache, rotate=cfg.rotate, pull=cfg.pull,
        on_timeout=launch.on_timeout,
        status_check=launch.status_check, out_dtype=out_dtype,
        w_transposed=w_transposed, rows=rows)
    if not return_gathered:
        return y
    if rows < m:
        # A folded batch's gathered x comes in the gather's order, [P, batch,
        # rows, K]: element-major is a copy.
        xg = xg.reshape(size, m // rows, rows, k).swapaxes(0, 1).reshape(size * m, k)
    return y, xg
