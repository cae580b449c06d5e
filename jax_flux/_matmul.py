"""The local matmul every impl uses: float32 accumulation, result in the operand dtype
(or the op's ``preferred_element_type``). Operands of two dtypes (one float8) go to
``lax.dot_general`` as they are, and so does the op's ``precision`` (``_precision``)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def dot_f32(a, b, b_transposed: bool = False, precision=None):
    """``a @ b`` accumulated in float32 (float32 result); with ``b_transposed``, b
    is given as b^T (``a @ b.T``, contracting b's last dim where it lies)."""
    return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1 if b_transposed else 0,)),
                                  ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def dot(a, b, out_dtype=None, precision=None):
    """``a @ b`` accumulated in float32, returned in ``out_dtype`` (default ``a``'s)."""
    return dot_f32(a, b, precision=precision).astype(out_dtype or a.dtype)


def dot_tn(a, b, out_dtype=None, precision=None):
    """``a.T @ b`` (the weight gradient), float32 accumulation, in ``out_dtype``
    (default ``a``'s). The operands may differ where one is float8."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)
