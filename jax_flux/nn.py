"""Flax NNX tensor-parallel linear layers built on the jax_flux ops.

Megatron-style tensor parallelism over one mesh axis (``axis_name``, size P),
with sequence parallelism: between blocks, activations are laid out
``[S, B, ...]`` (sequence first; ``sequence_dim=1``: ``[B, S, ...]``) and
sharded along S, so a gathered activation's rows are the true sequence order
and no token is ever permuted.

* ``ColumnParallelLinear``: the kernel is sharded along its first output dim.
  Sequence-parallel input (sharded along S) goes through ``all_gather_matmul``;
  an input already replicated (decode) is multiplied locally, no communication.
  Output: every position, this rank's slice of the output features.
* ``RowParallelLinear``: the kernel is sharded along its first input dim (the
  column layer's sharded output). Sequence-parallel output goes through
  ``matmul_reduce_scatter`` (back to S-sharded); otherwise local matmul + psum
  (an all-reduce, for replicated decode activations).

Both work two ways, chosen per call from the trace context:

* global view, under ``jax.jit`` with a mesh: the layer wraps its op in
  ``jax.shard_map`` over ``mesh`` itself (the way MaxText/Flax models are
  written);
* inside the user's own ``jax.shard_map`` that is manual over ``axis_name``:
  the layer works on local shards directly.

Parameters carry their sharding as NNX metadata (``out_sharding``), so
``nnx.get_partition_spec`` / ``nnx.get_named_sharding`` place them. With
``fsdp_axis`` (FSDP / ZeRO-3, as MaxText's "fsdp" axis) a kernel is also
stored split over that axis along its other dim (a column layer's input
features, a row layer's output features): a rank holds 1 / (P x F) of it,
and each call gathers it over that axis just in time (XLA's all-gather in
global view, ``lax.all_gather`` inside a shard_map), so its gradient comes
back reduce-scattered, stored like the kernel.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_flux import _precision
from jax_flux._axes import axis_names
# The layers' mesh helpers are this module's API too (models use them).
from jax_flux._layer_sharding import axis_size, in_manual_context, place, token_spec
from jax_flux._local_matmul import column_parallel, row_parallel
from jax_flux._validate import is_float8

Shape = int | Sequence[int]

default_kernel_init = nnx.initializers.lecun_normal()


def _as_shape(features: Shape) -> tuple[int, ...]:
    return (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)


def relayout(kernel, layer, transposed: bool):
    """``kernel``, laid out as ``layer``'s would be with ``kernel_transposed=
    transposed`` (and any leading stack dims), in ``layer``'s own layout."""
    src, dst = layer._order(transposed), layer._order()
    lead = kernel.ndim - len(src)
    inverse = [src.index(d) for d in range(len(src))]  # stored dim of each [*in, *out] dim
    perm = tuple(range(lead)) + tuple(lead + inverse[d] for d in dst)
    return jnp.transpose(kernel, perm)


class _ParallelLinear(nnx.Module):
    """Shared construction and dispatch of the two layers."""

    def __init__(self, in_features: Shape, out_features: Shape, *, mesh: Mesh,
                 axis_name: Hashable = "tp", use_bias: bool = False, impl: str = "auto",
                 config=None, sequence_parallel: bool = True, sequence_dim: int = 0,
                 batch_axis=None, dtype=None,
                 param_dtype=jnp.float32, preferred_element_type=None, fsdp_axis=None,
                 kernel_transposed: bool = False, precision=None, kernel_init=default_kernel_init,
                 bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
        self.in_shape = _as_shape(in_features)
        self.out_shape = _as_shape(out_features)
        if kernel_transposed not in (True, False):
            raise ValueError(f"{type(self).__name__}: kernel_transposed must be a bool, got "
                             f"{kernel_transposed!r}")
        self.kernel_transposed = bool(kernel_transposed)
        self.mesh = mesh
        self.axis_name = axis_name
        self.tp = axis_size(mesh, axis_name)
        kind, split = self._split_features()
        if split[0] % self.tp:
            raise ValueError(f"{type(self).__name__}: {kind} features {split} are split along "
                             f"{split[0]}, not divisible by the size {self.tp} of axis "
                             f"{axis_name!r}")
        self.impl = impl
        self.config = config
        self.sequence_parallel = sequence_parallel
        if isinstance(sequence_dim, bool) or sequence_dim not in (0, 1):
            raise ValueError(f"{type(self).__name__}: sequence_dim must be 0 ([S, B, ...]) or 1 "
                             f"([B, S, ...]), got {sequence_dim!r}")
        self.sequence_dim = sequence_dim
        self.batch_axis = batch_axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.preferred_element_type = preferred_element_type
        self.precision = _precision.canonical(type(self).__name__, precision)
        self.fsdp_axis = fsdp_axis or None
        kernel_shape = self._stored(self.in_shape + self.out_shape)
        if self.fsdp_axis is not None:
            fsdp = axis_names(self.fsdp_axis)
            if not set(fsdp) <= set(mesh.axis_names):
                raise ValueError(f"{type(self).__name__}: fsdp_axis {fsdp_axis!r} is not an axis "
                                 f"of the mesh (axes {mesh.axis_names})")
            if set(fsdp) & set(axis_names(axis_name)):
                raise ValueError(f"{type(self).__name__}: fsdp_axis {fsdp_axis!r} overlaps the "
                                 f"tensor-parallel axis {axis_name!r}")
            size = axis_size(mesh, self.fsdp_axis)
            dim = kernel_shape[self._fsdp_dim()]
            if dim % size:
                raise ValueError(f"{type(self).__name__}: kernel {kernel_shape} dim "
                                 f"{self._fsdp_dim()} ({dim}) is split over fsdp_axis "
                                 f"{fsdp_axis!r}, not divisible by its size {size}")
        if is_float8(param_dtype) and dtype is None:
            raise ValueError(f"{type(self).__name__}: param_dtype {jnp.dtype(param_dtype).name} "
                             f"needs dtype, the compute dtype (bfloat16, say): float8 has no "
                             f"implicit promotion")
        self.use_bias = use_bias
        fan_shape = (math.prod(self.in_shape), math.prod(self.out_shape))
        # jax.random's samplers give NaN in float8: draw in float32, then round.
        draw = jnp.float32 if is_float8(param_dtype) else param_dtype
        value = kernel_init(rngs.params(), fan_shape, draw).astype(param_dtype).reshape(
            self.in_shape + self.out_shape).transpose(self._order())
        self.kernel = nnx.Param(value, out_sharding=self.param_sharding(), mesh=mesh)
        self.bias = nnx.Param(bias_init(rngs.params(), self.bias_shape(), draw),
                              out_sharding=self.bias_sharding(), mesh=mesh) if use_bias else None
        # A float32 scale per output feature once quantize_float8 made the kernel
        # float8 (a data attribute, so that it may become a Param then).
        self.kernel_scale = nnx.data(None)

    def _tokens(self) -> str:
        return "B, S, ..." if self.sequence_dim else "S, ..."

    def _compute_dtype(self, x):
        return self.dtype or jnp.result_type(x.dtype, self.param_dtype)

    def _order(self, transposed: bool | None = None) -> tuple[int, ...]:
        """The kernel's dims as stored, as positions in ``[*in, *out]``: that order,
        or with ``kernel_transposed`` ``[*out, *in]`` (PyTorch's and Megatron's
        Linear layout, Flux's transpose_weight: the contraction dim last).
        ``transposed`` asks for that layout instead of the layer's."""
        n_in, n = len(self.in_shape), len(self.in_shape) + len(self.out_shape)
        if self.kernel_transposed if transposed is None else transposed:
            return tuple(range(n_in, n)) + tuple(range(n_in))
        return tuple(range(n))

    def _stored(self, dims: tuple) -> tuple:
        """Per-dim entries of ``[*in, *out]`` (a shape, a spec) in stored order."""
        return tuple(dims[i] for i in self._order())

    def stored_dim(self, dim: int) -> int:
        """Where dim ``dim`` of ``[*in, *out]`` lies in the stored kernel."""
        return self._order().index(dim)

    def kernel_sharding(self):
        """The kernel's spec (as stored) for a call: split over the tensor-parallel axis."""
        return self._stored(self._kernel_spec())

    def _fsdp_dim(self) -> int:
        """The stored kernel's dim split over ``fsdp_axis``."""
        return self.stored_dim(self._fsdp_feature_dim())

    def param_sharding(self):
        """The kernel as stored: ``kernel_sharding()`` (how a call uses it), and
        with ``fsdp_axis`` also split over that axis along ``_fsdp_dim()``."""
        spec = list(self.kernel_sharding())
        if self.fsdp_axis is not None:
            spec[self._fsdp_dim()] = self.fsdp_axis
        return tuple(spec)

    def __call__(self, x: jax.Array, *, sequence_parallel: bool | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[S, ..., in]`` activations, sequence first: global shapes under
            jit, local shards inside a shard_map manual over ``axis_name``.
          sequence_parallel: overrides the layer's default for this call (e.g.
            False for replicated decode activations).
        """
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        self._check_input(x)
        dtype = self._compute_dtype(x)
        x = x.astype(dtype)
        kernel = self.kernel[...]
        if not is_float8(kernel.dtype) or is_float8(dtype):
            kernel = kernel.astype(dtype)
        # else a float8 kernel meets wider activations as it is (weight-only
        # float8): the ops widen its tiles in registers, and FSDP gathers it
        # at one byte an element.
        bias = None if self.bias is None else self.bias[...]
        scale = None if self.kernel_scale is None else self.kernel_scale[...]
        fn = self._local_fn(sp)
        if in_manual_context(self.axis_name):
            if self.fsdp_axis is not None and in_manual_context(self.fsdp_axis):
                # This rank's 1/F of the kernel's shard: gather it (the
                # gradient's transpose reduce-scatters it back).
                kernel = lax.all_gather(kernel, self.fsdp_axis, axis=self._fsdp_dim(),
                                        tiled=True)
            return fn(x, kernel, bias, scale)
        if self.fsdp_axis is not None:
            # Pinned as stored first: the transpose of the gather below then
            # reduce-scatters the kernel's gradient back to this layout
            # (unpinned, XLA all-reduces it and keeps it whole along the axis).
            kernel = place(kernel, self.mesh, P(*self.param_sharding()))
        x_spec, out_spec = self._activation_specs(x.ndim, sp)
        # The scale lies as the bias does: the output features, split like y's.
        specs = (x_spec, P(*self.kernel_sharding()),
                 None if bias is None else P(*self.bias_sharding()),
                 None if scale is None else P(*self.bias_sharding()))
        args = [a if a is None else place(a, self.mesh, s) for a, s in zip((x, kernel, bias, scale),
                                                                          specs)]
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=out_spec)(*args)


class ColumnParallelLinear(_ParallelLinear):
    """``y = x @ kernel (+ bias)``, kernel ``[in, *out]`` sharded along ``out[0]``
    (``[*out, in]`` with ``kernel_transposed``).

    Args:
      in_features: input features (the last dim of x).
      out_features: int or tuple; the kernel is ``[in, *out_features]`` and
        its first output dim is split over the axis (so a fused projection
        such as ``(kv_groups, heads_per_group + 2, head_dim)`` keeps whole
        groups on each rank and means the same on any number of ranks).
      mesh: the device mesh; ``axis_name`` is its tensor-parallel axis.
      use_bias: add a bias (sharded like the output).
      impl, config: passed to ``all_gather_matmul``.
      sequence_parallel: default for calls; True: x is sharded along its
        sequence dim and gathered; False: x is replicated.
      sequence_dim: where x's sequence dim is: 0 (``[S, B, ...]``,
        Megatron's) or 1 (``[B, S, ...]``, MaxText's; the ops gather and
        scatter along it in place, no transpose).
      batch_axis: mesh axis (or axes) of x's batch dim (the other of its
        first two) in the global view (data parallelism), or None.
      dtype: compute dtype (default: promote x and params); param_dtype: of
        the parameters; preferred_element_type: the result's dtype (default:
        the compute dtype), as in ``nnx.Linear``: float32 logits from
        bfloat16 operands, say. A float8 param_dtype stores the kernel in
        float8 (the bias in float32) and needs dtype; against a wider dtype
        the kernel stays float8 (weight-only float8: the ops widen its tiles
        in registers); ``quantize_float8`` makes a trained kernel float8 with
        a scale per output feature.
      fsdp_axis: mesh axis (or axes) to store the kernel split over along
        its input features as well (FSDP; typically the batch axis), or None.
      kernel_transposed: store the kernel as ``[*out, in]`` (PyTorch's and
        Megatron's layout; Flux's transpose_weight), the contraction dim
        contiguous: the ops read it in place (``w_transposed``). Hopper's
        float8 MMAs want it so (README, "float8"). Drawn as the plain
        layout's kernel, transposed.
      precision: of the matmul, as in ``nnx.Linear`` and ``lax.dot_general``
        (None: ``jax_default_matmul_precision``); the ops' ``precision``.
      kernel_init, bias_init: initialisers; rngs: ``nnx.Rngs``.

    Raises:
      ValueError: at construction, when ``out_features[0]`` is not divisible
        by the axis size, or ``in_features`` by the fsdp axis size.
    """

    def _split_features(self):
        return "output", self.out_shape

    def _input_dims(self):
        return (0,)

    def _fsdp_feature_dim(self):
        return 0  # the input features

    def _kernel_spec(self):
        return (None, self.axis_name) + (None,) * (len(self.out_shape) - 1)

    def bias_shape(self):
        return self.out_shape

    def bias_sharding(self):
        return (self.axis_name,) + (None,) * (len(self.out_shape) - 1)

    def _check_input(self, x):
        if x.ndim < 2 + self.sequence_dim or x.shape[-1] != self.in_shape[0]:
            raise ValueError(f"ColumnParallelLinear: expected x [{self._tokens()}, "
                             f"{self.in_shape[0]}], got {x.shape}")

    def _local_fn(self, sp):
        def fn(x, kernel, bias, scale):
            return column_parallel(x, kernel, bias, axis_name=self.axis_name,
                                   sequence_parallel=sp, impl=self.impl, config=self.config,
                                   preferred_element_type=self.preferred_element_type,
                                   scale=scale, kernel_transposed=self.kernel_transposed,
                                   sequence_dim=self.sequence_dim, precision=self.precision)
        return fn

    def _activation_specs(self, ndim, sp):
        x_spec = P(*token_spec(self, ndim - 1, sp), None)
        out_spec = P(*token_spec(self, ndim - 1, False), self.axis_name,
                     *(None,) * (len(self.out_shape) - 1))
        return x_spec, out_spec


class RowParallelLinear(_ParallelLinear):
    """``z = x @ kernel (+ bias)``, kernel ``[*in, out]`` sharded along ``in[0]``
    (``[out, *in]`` with ``kernel_transposed``).

    Args:
      in_features: int or tuple, the trailing dims of x; the first is split
        over the axis (the sharded output of a ColumnParallelLinear).
      out_features: output features.
      mesh, axis_name, impl, config, sequence_dim, batch_axis, dtype, param_dtype,
        preferred_element_type, precision, kernel_init, bias_init, rngs: as
        ColumnParallelLinear (impl/config go to ``matmul_reduce_scatter``).
      kernel_transposed: store the kernel as ``[out, *in]``, as
        ColumnParallelLinear.
      fsdp_axis: as ColumnParallelLinear, splitting the kernel along its
        output features.
      use_bias: add a (replicated) bias after the reduction.
      sequence_parallel: default for calls; True: reduce-scatter along the
        sequence dim (``sequence_dim``); False: all-reduce (replicated result).

    Raises:
      ValueError: at construction, when ``in_features[0]`` is not divisible
        by the axis size, or ``out_features`` by the fsdp axis size.
    """

    def _split_features(self):
        return "input", self.in_shape

    def _input_dims(self):
        return tuple(range(len(self.in_shape)))

    def _fsdp_feature_dim(self):
        return len(self.in_shape)  # the output features

    def _kernel_spec(self):
        return (self.axis_name,) + (None,) * len(self.in_shape)

    def bias_shape(self):
        return self.out_shape

    def bias_sharding(self):
        return (None,)

    def _check_input(self, x):
        n = len(self.in_shape)
        if x.ndim < n + 1 + self.sequence_dim or (
                n > 1 and tuple(x.shape[-(n - 1):]) != self.in_shape[1:]):
            raise ValueError(f"RowParallelLinear: expected x [{self._tokens()}, "
                             f"*{self.in_shape}] (first feature dim sharded), got {x.shape}")

    def _local_fn(self, sp):
        def fn(x, kernel, bias, scale):
            return row_parallel(x, kernel, bias, axis_name=self.axis_name,
                                sequence_parallel=sp, impl=self.impl, config=self.config,
                                preferred_element_type=self.preferred_element_type,
                                scale=scale, kernel_transposed=self.kernel_transposed,
                                sequence_dim=self.sequence_dim, precision=self.precision)
        return fn

    def _activation_specs(self, ndim, sp):
        n = len(self.in_shape)
        x_spec = P(*token_spec(self, ndim - n, False), self.axis_name, *(None,) * (n - 1))
        out_spec = P(*token_spec(self, ndim - n, sp), None)
        return x_spec, out_spec
