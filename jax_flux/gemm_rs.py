"""GEMM-ReduceScatter: ``psum_scatter(x @ w, dim 0, tiled)`` inside ``shard_map``, by impl.

Every function here runs inside ``shard_map`` on one rank's operands:
x [M, k], w [k, N]; rank r receives rows [r * M/P, (r + 1) * M/P) of the sum
over ranks of ``x @ w``, shape [M / P, N].

* ``reference``: matmul then ``lax.psum_scatter`` (what users write today);
  also the ``"xla"`` impl. Partials travel in the operand dtype.
* ``ring``: medium-grained decomposition. Partial sums for each destination
  block travel a bidirectional ``ppermute`` ring (P // 2 hops forward,
  (P - 1) // 2 backward, ending together at the owner); at each step a rank
  adds its own chunk matmul (float32) to what it received and sends it on,
  so the next chunk's matmul overlaps the permute. Partials travel in the
  operand dtype, like the reference's reduce-scatter.
* ``fused``: the Flux kernel (``custom_calls``), one Triton launch per call.
"""

from __future__ import annotations

from typing import Hashable

from jax import lax

from jax_flux._matmul import dot, dot_f32


def reference(x, w, axis_name: Hashable):
    """Matmul then ``lax.psum_scatter``."""
    return lax.psum_scatter(dot(x, w), axis_name, scatter_dimension=0, tiled=True)


def ring(x, w, axis_name: Hashable, size: int):
    """Bidirectional collective-permute ring; lowers to collective_permute only."""
    if size == 1:
        return dot(x, w)
    rows = x.shape[0] // size
    idx = lax.axis_index(axis_name)
    fwd_perm = [(i, (i + 1) % size) for i in range(size)]
    bwd_perm = [(i, (i - 1) % size) for i in range(size)]
    n_fwd, n_bwd = size // 2, (size - 1) // 2

    def partial(block):
        return dot_f32(lax.dynamic_slice_in_dim(x, block * rows, rows, axis=0), w)

    def hop(acc, block):
        # Add this rank's partial for `block` to what arrived, in float32.
        part = partial(block)
        return part if acc is None else acc.astype(part.dtype) + part

    fwd = bwd = None
    for step in range(n_fwd):
        # The forward chain for block b is at rank b - n_fwd + step, the backward
        # chain at rank b + n_fwd - step; both reach b after step n_fwd - 1.
        fwd = hop(fwd, (idx + n_fwd - step) % size).astype(x.dtype)
        fwd = lax.ppermute(fwd, axis_name, fwd_perm)
        if step >= n_fwd - n_bwd:
            bwd = hop(bwd, (idx - n_fwd + step) % size).astype(x.dtype)
            bwd = lax.ppermute(bwd, axis_name, bwd_perm)
    total = partial(idx) + fwd.astype("float32")
    if bwd is not None:
        total = total + bwd.astype("float32")
    return total.astype(x.dtype)
