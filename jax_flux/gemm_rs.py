"""GEMM-ReduceScatter: ``psum_scatter(x @ w, dim 0, tiled)`` inside ``shard_map``, by impl.

Every function here runs inside ``shard_map`` on one rank's operands:
x [M, k], w [k, N]; rank r receives rows [r * M/P, (r + 1) * M/P) of the sum
over ranks of ``x @ w``, shape [M / P, N].

* ``reference``: matmul then ``lax.psum_scatter`` (what users write today);
  also the ``"xla"`` impl. Partials travel in the result dtype (x's, or the
  op's ``preferred_element_type``).
* ``ring``: medium-grained decomposition. Partial sums for each destination
  block travel a bidirectional ``ppermute`` ring (P // 2 hops forward,
  (P - 1) // 2 backward, ending together at the owner); at each step a rank
  adds its own chunk matmul (float32) to what it received and sends it on,
  so the next chunk's matmul overlaps the permute. Partials travel in the
  result dtype, like the reference's reduce-scatter.
* ``fused``: the Flux kernel (``custom_calls``), one Triton launch per call.
"""

from __future__ import annotations

import functools
from typing import Hashable

import jax.numpy as jnp
from jax import lax

from custom_calls import gemm_rs as kernel
from custom_calls.gemm import mma_dtype
from jax_flux import _fused
from jax_flux._axes import ppermute
from jax_flux._matmul import dot, dot_f32
from jax_flux._precision import kernel_input_precision
from jax_flux.config import MatmulReduceScatterConfig


def reference(x, w, axis_name: Hashable, *, out_dtype=None, precision=None):
    """Matmul (result in ``out_dtype``, default x's) then ``lax.psum_scatter``."""
    return lax.psum_scatter(dot(x, w, out_dtype, precision), axis_name, scatter_dimension=0, tiled=True)


def ring(x, w, axis_name: Hashable, size: int, *, out_dtype=None, precision=None):
    """Bidirectional collective-permute ring; lowers to collective_permute only.
    Partials travel in ``out_dtype`` (default x's)."""
    out_dtype = out_dtype or x.dtype
    if size == 1:
        return dot(x, w, out_dtype, precision)
    rows = x.shape[0] // size
    idx = lax.axis_index(axis_name)
    fwd_perm = [(i, (i + 1) % size) for i in range(size)]
    bwd_perm = [(i, (i - 1) % size) for i in range(size)]
    n_fwd, n_bwd = size // 2, (size - 1) // 2

    def partial(block):
        return dot_f32(lax.dynamic_slice_in_dim(x, block * rows, rows, axis=0), w,
                       precision=precision)

    def hop(acc, block):
        # Add this rank's partial for `block` to what arrived, in float32.
        part = partial(block)
        return part if acc is None else acc.astype(part.dtype) + part

    fwd = bwd = None
    for step in range(n_fwd):
        # The forward chain for block b is at rank b - n_fwd + step, the backward
        # chain at rank b + n_fwd - step; both reach b after step n_fwd - 1.
        fwd = hop(fwd, (idx + n_fwd - step) % size).astype(out_dtype)
        fwd = ppermute(fwd, axis_name, fwd_perm)
        if step >= n_fwd - n_bwd:
            bwd = hop(bwd, (idx - n_fwd + step) % size).astype(out_dtype)
            bwd = ppermute(bwd, axis_name, bwd_perm)
    total = partial(idx) + fwd.astype("float32")
    if bwd is not None:
        total = total + bwd.astype("float32")
    return total.astype(out_dtype)


def fused(x, w, axis_name: Hashable, size: int,
          config: MatmulReduceScatterConfig | None = None, *, out_dtype=None,
          w_transposed: bool = False, precision=None):
    """The Flux kernel: one Triton launch whose GEMM epilogue stores each tile into
    its owner's reduce buffer; the owner sums the P partials in rank order (in
    reduction programs, or with ``reduce_programs=0`` in the epilogue of its own
    tiles).

    With ``w_transposed``, ``w`` is given as w^T [N, k] and the kernel reads it
    in place: the backward pass's ``dy @ w^T`` makes no transposed copy of w.
    ``precision`` (``_precision.canonical``'s) sets the MMAs' input precision.
    Under ``jax.vmap`` with a shared w, the batch is one launch
    (``_fused.vmap_folding``).
    """
    launch = functools.partial(_launch, axis_name=axis_name, size=size, config=config,
                               out_dtype=out_dtype, w_transposed=w_transposed,
                               precision=precision)
    return _fused.vmap_folding(launch, x.shape[0] // size)(x, w)


def _launch(x, w, rows: int, *, axis_name, size, config, out_dtype, w_transposed, precision):
    """One launch on x holding a batch of problems of P * ``rows`` rows each (x
    [batch * P * rows, k]): z [batch * rows, N], element-major."""
    m_total, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    m_own = m_total // size
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    mma = mma_dtype(x.dtype, w.dtype)  # the MMAs' dtype (a float8 tile widened to it)
    input_precision = kernel_input_precision("matmul_reduce_scatter", precision, mma)
    cfg = config or _fused.tuned_or_default(MatmulReduceScatterConfig, "matmul_reduce_scatter",
                                            m_own, k, n, size, x.dtype, out_dtype, w_transposed,
                                            w.dtype, precision, input_precision)
    if not isinstance(cfg, MatmulReduceScatterConfig):
        raise ValueError(f"matmul_reduce_scatter(impl='fused') takes a "
                         f"MatmulReduceScatterConfig, got {type(cfg).__name__}")
    sig_off, data_off, nbytes = kernel.workspace_bytes(size, m_own, n, out_dtype.itemsize,
                                                       cfg.block_m, cfg.block_n)
    launch = _fused.prepare("matmul_reduce_scatter", axis_name, size, nbytes, cfg, mma)
    tiles = size * _fused.cdiv(m_own, cfg.block_m) * _fused.cdiv(n, cfg.block_n)
    grid = _fused.persistent_grid(cfg.num_programs, tiles, cfg.reduce_programs,
                                  launch.max_programs)
    z, _ = kernel.gemm_rs(
        x, w, launch.ctx, launch.table, world=size, sig_off=sig_off, data_off=data_off,
        gemm_programs=grid - cfg.reduce_programs, reduce_programs=cfg.reduce_programs,
        block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k, group_m=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, upcast=launch.upcast,
        input_precision=input_precision, remote_cache=launch.remote_cache,
        rotate=cfg.rotate, on_timeout=launch.on_timeout,
        status_check=launch.status_check, out_dtype=out_dtype,
        w_transposed=w_transposed, rows=rows)
    return z
