"""Input validation shared by the ops: every check runs before anything is traced into a kernel."""

from __future__ import annotations

from typing import Hashable

import jax.numpy as jnp
import numpy as np
from jax import lax

from custom_calls import gemm
from jax_flux._axes import axis_names

IMPLS = ("auto", "xla", "ring", "fused")
# Result dtypes (and operand dtypes that may be results too).
RESULT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Float8 operands (Hopper's FP8 tensor cores): with two of them the result must
# be one of RESULT_DTYPES, given as preferred_element_type. x and w may differ
# where one is float8: a float8 weight with bfloat16 activations (weight-only
# float8, as for decode), a bfloat16 cotangent against a float8 weight (the
# backward pass), e4m3 activations against e5m2 gradients.
FLOAT8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
SUPPORTED_DTYPES = RESULT_DTYPES + FLOAT8_DTYPES


def is_float8(dtype) -> bool:
    return jnp.dtype(dtype) in FLOAT8_DTYPES


def axis_size(op: str, axis_name: Hashable) -> int:
    """Size of the mesh axis (or tuple of axes) ``axis_name``; a ValueError outside
    ``shard_map``."""
    names = axis_names(axis_name)
    if isinstance(axis_name, list) or not names or len(set(names)) != len(names):
        raise ValueError(f"{op}: axis_name must be a mesh axis or a tuple of distinct ones, "
                         f"got {axis_name!r}")
    size = 1
    for name in names:
        try:
            size *= int(lax.axis_size(name))
        except NameError as e:
            raise ValueError(
                f"{op}: unbound axis name {name!r}; call it inside jax.shard_map over a mesh "
                f"with that axis") from e
    return size


def check_impl(op: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")


def check_operands(op: str, x, w, axis_name: Hashable, size: int,
                   w_transposed: bool = False) -> None:
    """x of 2 or more dims ([rows, ..., K]), w 2-D, matching contraction size
    (x's last dim against w's dim 0, or dim 1 for w given transposed), one
    supported dtype."""
    where = f"(axis {axis_name!r} of size {size})"
    if getattr(x, "ndim", 0) < 2 or getattr(w, "ndim", None) != 2:
        raise ValueError(f"{op}: x must have 2 or more dims ([rows, ..., K]) and w 2, got "
                         f"x{tuple(jnp.shape(x))} and w{tuple(jnp.shape(w))} {where}")
    if w_transposed not in (True, False):
        raise ValueError(f"{op}: w_transposed must be a bool, got {w_transposed!r}")
    if x.shape[-1] != w.shape[1 if w_transposed else 0]:
        product = f"w{tuple(w.shape)}.T (w_transposed)" if w_transposed else f"w{tuple(w.shape)}"
        raise ValueError(f"{op}: contraction sizes differ: x{tuple(x.shape)} @ {product} "
                         f"{where}")
    for name, a in (("x", x), ("w", w)):
        if jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
            names = ", ".join(d.name for d in SUPPORTED_DTYPES)
            raise ValueError(f"{op}: {name} has dtype {a.dtype}, not supported (one of {names}) "
                             f"{where}")
    if x.dtype != w.dtype and not (is_float8(x.dtype) or is_float8(w.dtype)):
        raise ValueError(f"{op}: x and w must have one dtype unless one is float8 (a float8 "
                         f"weight with 16/32-bit activations, or two float8 kinds), got x "
                         f"{x.dtype} and w {w.dtype} {where}")


def mma_dtype(x, w):
    """The dtype the product runs in: the operands' when they agree or both are
    float8, else the one that is not float8 (the float8 one is widened to it)."""
    return gemm.mma_dtype(x.dtype, w.dtype)


def backward_dtype(x_dtype, w_dtype, cotangent_dtype):
    """The dtype a backward pass runs in: the forward MMAs' (``mma_dtype``), or
    after float8 MMAs the cotangent's (the result's). The other operand meets
    it as it is (a float8 one widened in the kernel)."""
    mma = gemm.mma_dtype(x_dtype, w_dtype)
    return jnp.dtype(cotangent_dtype) if is_float8(mma) else mma


def result_dtype(op: str, x, w, preferred_element_type):
    """The op's result dtype: ``preferred_element_type`` (bfloat16, float16 or
    float32), else the operands' (``lax.dot_general``'s promotion: the
    16/32-bit one of a float8 and a wider operand); two float8 operands need
    it given."""
    names = ", ".join(d.name for d in RESULT_DTYPES)
    if preferred_element_type is None:
        dtype = mma_dtype(x, w)
        if is_float8(dtype):
            raise ValueError(
                f"{op}: float8 operands (x {x.dtype}, w {w.dtype}) need preferred_element_type, "
                f"one of {names}: a float8 result (and float8 partial sums in the "
                f"reduce-scatter) would round every sum to a few mantissa bits")
        return dtype
    try:
        dtype = jnp.dtype(preferred_element_type)
    except TypeError as e:
        raise ValueError(f"{op}: preferred_element_type {preferred_element_type!r} is not a "
                         f"dtype") from e
    if dtype not in RESULT_DTYPES:
        raise ValueError(f"{op}: preferred_element_type {dtype} is not supported (one of "
                         f"{names}); x is {x.dtype}, w {w.dtype}")
    return dtype


def row_dim(op: str, x, dim, what: str) -> int:
    """``dim`` (``what``: "axis", "scatter_dimension"), the dim of x the op
    gathers or scatters along, as a non-negative int: any dim of x but the
    last (the contraction dim), negative ones counted from the end as in
    ``lax``."""
    last = x.ndim - 2
    integer = isinstance(dim, (int, np.integer)) and not isinstance(dim, bool)
    if not integer or not 0 <= (dim + x.ndim if dim < 0 else dim) <= last:
        raise ValueError(f"{op}: {what} must be a dim of x{tuple(x.shape)} other than its last "
                         f"(the contraction dim): an int from 0 to {last} (or {-x.ndim} to -2), "
                         f"got {dim!r}")
    return int(dim) % x.ndim


def check_scatter_rows(op: str, x, axis_name: Hashable, size: int, dim: int = 0) -> None:
    if x.shape[dim] % size:
        raise ValueError(f"{op}: x{tuple(x.shape)} has {x.shape[dim]} rows in dim {dim}, not "
                         f"divisible by the size {size} of axis {axis_name!r} it is scattered "
                         f"over")
