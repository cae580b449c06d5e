"""Weight-only float8 for the tensor-parallel layers: ``quantize_float8``.

Decode is bound by reading the weights. A kernel stored in float8 is read at
one byte an element: the ops take it as it is against the layer's 16/32-bit
activations (the fused kernels widen its tiles in registers), and the layer
multiplies the result by a float32 scale per output feature before the bias.

The scale of output feature j is max |W[:, j]| / max(float8): the largest
magnitude along the contraction lands on float8's largest finite value, so
no element overflows and each column keeps float8's relative precision
(about 2^-4 for e4m3) however small its weights are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_flux._validate import is_float8
from jax_flux.nn import _ParallelLinear


def float8_scale(kernel: jax.Array, input_dims: tuple[int, ...], dtype) -> jax.Array:
    """Per-output-feature float32 scale of ``kernel`` (max |kernel| over
    ``input_dims`` / float8's largest finite value; 1 for an all-zero feature)."""
    amax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=input_dims)
    return jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0).astype(jnp.float32)


def quantize_float8(module: nnx.Module, dtype=jnp.float8_e4m3fn) -> int:
    """Stores the kernels of ``module``'s tensor-parallel layers in float8, each
    with a float32 scale per output feature. Returns how many layers.

    ``module`` is a ``ColumnParallelLinear`` or ``RowParallelLinear``, or any
    module holding them (a block, ``model.blocks``, a whole model: every one
    found is quantized; pass ``model.blocks`` to keep a head wide). Afterwards
    a layer computes ``(x @ kernel8) * scale (+ bias)`` in its compute dtype,
    the float8 kernel going into ``all_gather_matmul`` /
    ``matmul_reduce_scatter`` (or the local matmul) as it is. For inference:
    a kernel's gradient would be rounded to float8 too. Layers made by
    ``nnx.vmap`` (a leading stack dim, as a scanned model's blocks have) get
    scales per slice.

    Args:
      module: the layer, or a module holding such layers.
      dtype: ``float8_e4m3fn`` (default: 3 mantissa bits, max 448) or
        ``float8_e5m2``.

    Raises:
      ValueError: not a float8 dtype, no such layer in ``module``, a kernel
        already float8, or a layer whose compute dtype is float8. Checked for
        every layer before any is changed.
    """
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"quantize_float8: {dtype!r} is not a dtype") from e
    if not is_float8(dtype):
        raise ValueError(f"quantize_float8: dtype must be float8_e4m3fn or float8_e5m2, got "
                         f"{dtype.name}")
    layers = [(path, node) for path, node in nnx.iter_graph(module)
              if isinstance(node, _ParallelLinear)]
    if not layers:
        raise ValueError(f"quantize_float8: no ColumnParallelLinear or RowParallelLinear in "
                         f"{type(module).__name__}")
    for path, layer in layers:
        where = f"{type(layer).__name__} at {'/'.join(map(str, path)) or '.'}"
        if is_float8(layer.kernel[...].dtype):
            raise ValueError(f"quantize_float8: the {where}: kernel is already "
                             f"{layer.kernel[...].dtype}")
        if layer.dtype is not None and is_float8(layer.dtype):
            raise ValueError(f"quantize_float8: the {where}: weight-only float8 needs a 16/32-bit "
                             f"compute dtype, not {jnp.dtype(layer.dtype).name}")
    for _, layer in layers:
        _quantize(layer, dtype)
    return len(layers)


def _quantize(layer: _ParallelLinear, dtype) -> None:
    kernel = layer.kernel[...]
    # Leading dims beyond [*in, *out]: a stack of layers (nnx.vmap).
    lead = kernel.ndim - len(layer.in_shape) - len(layer.out_shape)
    input_dims = tuple(lead + layer.stored_dim(d) for d in layer._input_dims())
    scale = float8_scale(kernel, input_dims, dtype)
    kernel8 = (kernel.astype(jnp.float32) / jnp.expand_dims(scale, input_dims)).astype(dtype)
    layer.kernel.set_value(jax.device_put(kernel8, kernel.sharding))  # a new dtype: not [...] =
    # Placed as the bias is (the output features, split like the layer's output).
    spec = (None,) * lead + tuple(layer.bias_sharding())
    layer.kernel_scale = nnx.Param(jax.device_put(scale, NamedSharding(layer.mesh, P(*spec))),
                                   out_sharding=spec, mesh=layer.mesh)
