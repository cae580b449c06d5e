"""The tensor-parallel layers' matmuls on local shards: ``column_parallel``, ``row_parallel``.

Each runs inside a ``shard_map`` manual over ``axis_name`` (``jax_flux.nn``
wraps them in one in global view). Under sequence parallelism they are the
collective matmuls (``all_gather_matmul`` / ``matmul_reduce_scatter``); for
replicated activations (decode) a local matmul, plus an all-reduce after the
row-parallel one.
"""

from __future__ import annotations

import math
from typing import Hashable

import jax.numpy as jnp
from jax import lax

from jax_flux._matmul import dot_f32
from jax_flux.ops import all_gather_matmul, matmul_reduce_scatter


def column_parallel(x, kernel, bias, *, axis_name: Hashable, sequence_parallel: bool,
                    impl: str = "auto", config=None, preferred_element_type=None, scale=None,
                    kernel_transposed: bool = False, sequence_dim: int = 0, precision=None):
    """Column-parallel matmul on local shards, inside a ``shard_map`` over ``axis_name``.

    Args:
      x: ``[S_local, ..., in]`` with ``sequence_parallel`` (this rank's
        sequence shard), else ``[S, ..., in]`` (replicated).
      kernel: this rank's columns, ``[in, *out_local]`` (``[*out_local, in]``
        with ``kernel_transposed``, read in place).
      bias: ``[*out_local]`` or None.
      axis_name: the tensor-parallel mesh axis (or tuple of axes).
      sequence_parallel: gather x's sequence over the axis (AG-GEMM), or
        multiply the replicated x locally.
      impl, config: of ``jax_flux.all_gather_matmul``.
      preferred_element_type: the result dtype; None: x's.
      scale: ``[*out_local]`` float32 multiplying the product before the bias
        (``quantize_float8``), or None.
      kernel_transposed: the kernel's layout, above.
      sequence_dim: x's sequence dim (0: ``[S, B, ...]``; 1: ``[B, S, ...]``).
      precision: of the matmul, as ``lax.dot_general`` takes it.

    Returns:
      ``[S, ..., *out_local]``: the whole sequence, this rank's output features.
    """
    k_in = x.shape[-1]
    out_dims = kernel.shape[:-1] if kernel_transposed else kernel.shape[1:]
    k2 = kernel.reshape(-1, k_in) if kernel_transposed else kernel.reshape(k_in, -1)
    if sequence_parallel:
        y = all_gather_matmul(x, k2, axis_name, axis=sequence_dim, impl=impl, config=config,
                              preferred_element_type=preferred_element_type,
                              w_transposed=kernel_transposed, precision=precision)
    else:
        y = dot_f32(x.reshape(-1, k_in), k2, kernel_transposed, precision).astype(
            preferred_element_type or x.dtype).reshape(*x.shape[:-1], -1)
    y = _scaled(y.reshape(*y.shape[:-1], *out_dims), scale)
    return y if bias is None else y + bias.astype(y.dtype)


def row_parallel(x, kernel, bias, *, axis_name: Hashable, sequence_parallel: bool,
                 impl: str = "auto", config=None, preferred_element_type=None, scale=None,
                 kernel_transposed: bool = False, sequence_dim: int = 0, precision=None):
    """Row-parallel matmul on local shards, inside a ``shard_map`` over ``axis_name``.

    Args:
      x: ``[S, ..., *in_local]``, this rank's input features.
      kernel: this rank's rows, ``[*in_local, out]`` (``[out, *in_local]``
        with ``kernel_transposed``, read in place).
      bias: ``[out]`` or None, added once, after the sum.
      axis_name: the tensor-parallel mesh axis (or tuple of axes).
      sequence_parallel: scatter the sum over ranks along the leading
        (sequence) dim (GEMM-RS), or all-reduce it (a replicated result).
      impl, config: of ``jax_flux.matmul_reduce_scatter``.
      preferred_element_type: the dtype of the result and of the partial
        sums; None: x's.
      scale: ``[out]`` float32 multiplying the sum before the bias
        (``quantize_float8``), or None.
      kernel_transposed: the kernel's layout, above.
      sequence_dim: x's sequence dim, as ``column_parallel``.
      precision: of the matmul, as ``column_parallel``.

    Returns:
      ``[S / P, ..., out]`` with ``sequence_parallel`` (this rank's sequence
      shard), else ``[S, ..., out]``.
    """
    n_in = kernel.ndim - 1
    lead = x.shape[:x.ndim - n_in]
    x = x.reshape(*lead, -1)  # the input features flattened (no copy)
    n_out = kernel.shape[0] if kernel_transposed else kernel.shape[-1]
    k2 = kernel.reshape(n_out, -1) if kernel_transposed else kernel.reshape(-1, n_out)
    out_dtype = preferred_element_type or x.dtype
    if sequence_parallel:
        z = matmul_reduce_scatter(x, k2, axis_name, scatter_dimension=sequence_dim, impl=impl,
                                  config=config, preferred_element_type=preferred_element_type,
                                  w_transposed=kernel_transposed, precision=precision)
    else:
        z = lax.psum(dot_f32(x.reshape(math.prod(lead), -1), k2, kernel_transposed,
                             precision).astype(
            out_dtype), axis_name).reshape(*lead, n_out)
    z = _scaled(z, scale)
    return z if bias is None else z + bias.astype(z.dtype)


def _scaled(y, scale):
    """y times a per-output-feature scale (y's trailing dims), in float32."""
    return y if scale is None else (y.astype(jnp.float32) * scale).astype(y.dtype)
