"""The public ops: ``all_gather_matmul`` and ``matmul_reduce_scatter``.

Both run inside ``jax.shard_map`` like ``lax`` collectives, validate their
input up front, dispatch on ``impl`` and are differentiable through a
``jax.custom_vjp`` whose input gradient is the other op:

* y = AG(x) @ w      ->  dx = RS(dy @ w^T),   dw = AG(x)^T @ dy
* z = RS(x @ w)      ->  dx = AG(dz) @ w^T,   dw = x^T @ AG(dz)

(AG-GEMM with ``return_gathered`` has its own, which adds the gathered x's
cotangent, reduce-scattered, to dx.) An x of more than two dims has its
middle dims flattened into rows (no copy) and unflattened in the result.

The fused kernels read w^T in place (a weight-sized transposed copy a step
saved per op).

The forward of AG-GEMM keeps the gathered x it already has, so the weight
gradient needs no second all-gather; the backward of GEMM-RS gets AG(dz) from
the same AG-GEMM that computes dx. The differentiated forwards tag their
results (and the gathered x) for ``jax.checkpoint`` policies: ``jax_flux.remat``.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from custom_calls._jax_compat import varying_axes
from jax_flux import _auto, _precision, _validate, ag_gemm, gemm_rs, remat
from jax_flux._axes import varying, vary_over_axes
from jax_flux._matmul import dot_tn

_AG = "all_gather_matmul"
_RS = "matmul_reduce_scatter"


def _resolve(op: str, impl: str, config: Any) -> str:
    """``impl`` checked; ``"auto"`` stays, to be resolved per launch (``jax_flux._auto``)."""
    _validate.check_impl(op, impl)
    if impl in ("xla", "ring") and config is not None:
        raise ValueError(f"{op}: config applies to impl='fused' only, got impl={impl!r} with "
                         f"config={config!r}")
    return impl


# With w_transposed, w is given as w^T (the backward passes' ``d @ w^T``): the
# fused kernels read it in place; XLA folds the transpose into its dots.


def _scope(op: str, impl: str):
    """The name a launch of ``op`` by ``impl`` carries in the program (HLO's
    ``op_name`` metadata, hence profiles): ``jax_flux.all_gather_matmul[fused]``."""
    return jax.named_scope(f"jax_flux.{op}[{impl}]")


def _backward_scope(op: str):
    """The name around ``op``'s backward pass: its launch keeps its own ``_scope``
    inside (``jax_flux.all_gather_matmul.backward/jax_flux.matmul_reduce_scatter[fused]``)."""
    return jax.named_scope(f"jax_flux.{op}.backward")


def _ag_forward(x, w, axis_name, impl, size, config=None, return_gathered=False,
                out_dtype=None, w_transposed=False, precision=None):
    def run(impl, x, w):
        kw = dict(return_gathered=return_gathered, out_dtype=out_dtype, precision=precision)
        with _scope(_AG, impl):
            if impl == "fused":
                return ag_gemm.fused(x, w, axis_name, size, config, w_transposed=w_transposed,
                                     **kw)
            w = w.T if w_transposed else w
            if impl == "ring":
                return ag_gemm.ring(x, w, axis_name, size, **kw)
            return ag_gemm.reference(x, w, axis_name, **kw)

    if impl == "auto":
        return _auto.launch(_AG, run, x, w, axis_name, size, out_dtype, w_transposed, precision)
    return run(impl, x, w)


def _rs_forward(x, w, axis_name, impl, size, config=None, out_dtype=None, w_transposed=False,
                precision=None):
    def run(impl, x, w):
        kw = dict(out_dtype=out_dtype, precision=precision)
        with _scope(_RS, impl):
            if impl == "fused":
                return gemm_rs.fused(x, w, axis_name, size, config, w_transposed=w_transposed,
                                     **kw)
            w = w.T if w_transposed else w
            if impl == "ring":
                return gemm_rs.ring(x, w, axis_name, size, **kw)
            return gemm_rs.reference(x, w, axis_name, **kw)

    if impl == "auto":
        return _auto.launch(_RS, run, x, w, axis_name, size, out_dtype, w_transposed, precision)
    return run(impl, x, w)


# ------------------------------------------------------------ AG-GEMM vjp
# The config tunes the op it was given to; the other op in the backward pass
# uses its own default. The backward pass runs in the dtype the forward's MMAs
# ran in (``_validate.mma_dtype``: the cotangent is cast to it where the result
# was given another dtype), except after float8 MMAs: then it runs in the
# cotangent's dtype (the result's): ``_validate.backward_dtype``. Operands are never converted: a float8 w
# meets the wider cotangent in the kernel, widened tile by tile in registers
# (and in XLA's dot for impl xla/ring). Gradients are rounded to the operands'
# dtypes, as JAX's autodiff of lax.dot_general(preferred_element_type=...) does.


# w_transposed: w is given as w^T; its gradient then is (dW)^T, and dx's
# kernel reads it the other way round (dx = d @ W^T = d @ w with w as given).
# precision: the forward's, for every matmul of the backward pass too (as
# JAX's transpose of lax.dot_general keeps it).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _ag(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    return _ag_forward(x, w, axis_name, impl, size, config, out_dtype=out_dtype,
                       w_transposed=w_transposed, precision=precision)


def _ag_fwd(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    y, xg = _ag_forward(x, w, axis_name, impl, size, config, return_gathered=True,
                        out_dtype=out_dtype, w_transposed=w_transposed, precision=precision)
    # Tagged for jax.checkpoint policies (jax_flux.remat): recomputing either
    # one would run the collective again.
    xg = checkpoint_name(xg, remat.AG_GATHERED)
    return checkpoint_name(y, remat.AG_OUTPUT), (xg, w)


def _ag_bwd(axis_name, impl, size, config, out_dtype, w_transposed, precision, res, dy):
    xg, w = res
    dtype = _validate.backward_dtype(xg.dtype, w.dtype, dy.dtype)
    dy = dy.astype(dtype)
    with _backward_scope(_AG):
        dx = _rs_forward(dy, w, axis_name, impl, size, out_dtype=dtype,
                         w_transposed=not w_transposed, precision=precision)
        dw = (dot_tn(dy, xg, w.dtype, precision) if w_transposed else
              dot_tn(xg, dy, w.dtype, precision))
    return dx.astype(xg.dtype), dw


_ag.defvjp(_ag_fwd, _ag_bwd)


# return_gathered=True: (y, the gathered x) out of the one launch, as Flux's
# AGKernel gives it, for a second matmul on the same rows (separate weights
# of one input) without a second all-gather. The gathered x's cotangent
# (another matmul's dx, say) is reduce-scattered back onto dx; symbolic zeros
# (an output the loss does not use) cost nothing.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _ag_gathered(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    return _ag_forward(x, w, axis_name, impl, size, config, return_gathered=True,
                       out_dtype=out_dtype, w_transposed=w_transposed, precision=precision)


def _ag_gathered_fwd(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    # symbolic_zeros: the differentiable primals come wrapped (CustomVJPPrimal).
    y, (xg, w) = _ag_fwd(x.value, w.value, axis_name, impl, size, config, out_dtype,
                         w_transposed, precision)
    return (y, xg), (xg, w)


def _ag_gathered_bwd(axis_name, impl, size, config, out_dtype, w_transposed, precision, res,
                     cts):
    xg, w = res
    dy, dxg = cts
    if isinstance(dy, SymbolicZero):
        # Zeros varying as the primals do: vary_over_axes gave x and w one set of axes.
        dx = varying(jnp.zeros((xg.shape[0] // size, xg.shape[1]), xg.dtype), varying_axes(w))
        dw = varying(jnp.zeros(w.shape, w.dtype), varying_axes(w))
    else:
        dx, dw = _ag_bwd(axis_name, impl, size, config, out_dtype, w_transposed, precision, res,
                         dy)
    if not isinstance(dxg, SymbolicZero):
        # The transpose of the all-gather; summed with the kernel's dx in float32.
        with _backward_scope(_AG):
            dxg = dxg.astype(jnp.float32) if _validate.is_float8(dxg.dtype) else dxg
            rs = lax.psum_scatter(dxg, axis_name, scatter_dimension=0, tiled=True)
        dx = (dx.astype(jnp.float32) + rs.astype(jnp.float32)).astype(xg.dtype)
    return dx, dw


_ag_gathered.defvjp(_ag_gathered_fwd, _ag_gathered_bwd, symbolic_zeros=True)


# ------------------------------------------------------------ GEMM-RS vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _rs(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    return _rs_forward(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision)


def _rs_fwd(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision):
    z = _rs_forward(x, w, axis_name, impl, size, config, out_dtype, w_transposed, precision)
    return checkpoint_name(z, remat.RS_OUTPUT), (x, w)


def _rs_bwd(axis_name, impl, size, config, out_dtype, w_transposed, precision, res, dz):
    x, w = res
    dtype = _validate.backward_dtype(x.dtype, w.dtype, dz.dtype)
    dz = dz.astype(dtype)
    with _backward_scope(_RS):
        dx, dzg = _ag_forward(dz, w, axis_name, impl, size, return_gathered=True,
                              out_dtype=dtype, w_transposed=not w_transposed,
                              precision=precision)
        dw = (dot_tn(dzg, x, w.dtype, precision) if w_transposed else
              dot_tn(x, dzg, w.dtype, precision))
    return dx.astype(x.dtype), dw


_rs.defvjp(_rs_fwd, _rs_bwd)


def _batched(op, dims: int):
    """``op`` of x's dims from ``dims`` on, mapped over the ``dims`` before: a
    batch of problems sharing w, each gathered or scattered along its dim 0.
    (The fused impl folds such a batch into its one launch: ``jax.vmap``
    against a shared weight, ``_fused.vmap_folding``.)"""
    for _ in range(dims):
        op = jax.vmap(op)
    return op


def _rows(x):
    """x [rows, ..., K] as the 2-D [rows * ..., K] the impls take (no copy: row-major)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def all_gather_matmul(x: jax.Array, w: jax.Array, axis_name: Hashable, *, axis: int = 0,
                      impl: str = "auto", config: Any = None,
                      preferred_element_type: Any = None, w_transposed: bool = False,
                      return_gathered: bool = False, precision: Any = None):
    """All-gathers ``x`` over ``axis_name`` (tiled, along rows) and multiplies by ``w``.

    Call it inside ``jax.shard_map``, like a ``lax`` collective. Equivalent to
    ``lax.all_gather(x, axis_name, axis=axis, tiled=True) @ w`` accumulated
    in float32, without materialising the gather before the matmul starts
    (impl ``"ring"`` and ``"fused"``).

    Args:
      x: this rank's rows, [m, K], or [m, ..., K] (Megatron's [s, b, h]:
        gathered along dim 0, the middle dims go along, as with
        ``lax.all_gather`` then ``@``); bfloat16, float16, float32, or
        float8 (float8_e4m3fn, float8_e5m2: Hopper's FP8 MMAs, half the
        bytes gathered; needs ``preferred_element_type``).
      w: [K, n], same dtype as x (typically this rank's column shard).
      axis_name: the mesh axis to gather over (size P), or a tuple of axes
        (one axis of their sizes' product, the first major, as in ``lax``).
      axis: the dim of x gathered along, any but the last (negative: from
        the end), as in ``lax.all_gather``: 1 for MaxText's [b, s, h] with
        the sequence sharded. The dims before it are a batch of problems
        sharing w (``jax.vmap``: the fused impl folds them into its one
        launch).
      impl: ``"xla"`` (all-gather then matmul), ``"ring"`` (bidirectional
        collective-permute ring overlapping chunk matmuls), ``"fused"`` (the
        Flux Triton kernel) or ``"auto"``: the one measured fastest for this
        per-rank problem on this device kind (``jax_flux.autotune``, filled
        by ``benchmarks.tune`` or shipped), else xla.
      config: ``AllGatherMatmulConfig`` for impl ``"fused"`` (and ``"auto"``
        where it picks fused); None picks the tuned config, else a default
        by shape.
      preferred_element_type: the result's dtype (bfloat16, float16 or
        float32), as in ``lax.dot_general``; None: x's (float8 operands must
        give it). The product is accumulated in float32 either way.
      w_transposed: ``w`` is given as w^T, [n, K] (Flux's transpose_weight):
        the result is ``all_gather(x) @ w.T``, the kernel reading w in
        place. Hopper's float8 MMAs take the weight K-major: a float8 w
        stored this way keeps the fused kernel's K loop fully pipelined
        (README, "float8"). Gradients come back in the layout given.
      return_gathered: also return the gathered x, which the fused kernel
        writes as it goes (Flux's gathered input): a second matmul on the
        same rows (a separate weight of the same input) then needs no second
        all-gather. Differentiable: its cotangent is reduce-scattered onto
        dx.
      precision: as in ``lax.dot_general``: None (``jax_default_matmul_precision``,
        as lax reads it), a ``lax.Precision`` or its name, a pair of them
        (x's, w's), a ``lax.DotAlgorithmPreset`` or a ``lax.DotAlgorithm``.
        It matters for float32 operands: on GPUs DEFAULT and HIGH run
        tensorfloat32, HIGHEST exact float32 (the fused kernels as XLA's
        dot), TF32_TF32_F32_X3 three tensorfloat32 passes. It applies to the
        backward pass's matmuls too. The fused kernels refuse presets they do
        not run (bfloat16 passes of float32 operands, 16-bit accumulation)
        and custom algorithms.

    Returns:
      [m * P, n] (or [m * P, ..., n]) in x's dtype (or
      ``preferred_element_type``); rank r's rows at [r * m, (r + 1) * m).
      With ``return_gathered``, (that, the gathered x [m * P, (...,) K] in
      x's dtype). With ``axis``, x's shape with dim ``axis`` P times longer
      and the last n.

    Raises:
      ValueError: x of fewer than 2 dims or w not 2-D, contraction sizes or
        dtypes differ, an unsupported dtype or preferred_element_type (or
        none for float8 operands), axis not a dim of x before its last, an
        unknown impl or precision, or no such bound axis.
    """
    size = _validate.axis_size(_AG, axis_name)
    _validate.check_operands(_AG, x, w, axis_name, size, w_transposed)
    axis = _validate.row_dim(_AG, x, axis, "axis")
    out_dtype = _validate.result_dtype(_AG, x, w, preferred_element_type)
    impl = _resolve(_AG, impl, config)
    precision = _precision.canonical(_AG, precision)
    if return_gathered not in (True, False):
        raise ValueError(f"{_AG}: return_gathered must be a bool, got {return_gathered!r}")
    if axis:
        return _batched(functools.partial(
            all_gather_matmul, w=w, axis_name=axis_name, impl=impl, config=config,
            preferred_element_type=preferred_element_type, w_transposed=w_transposed,
            return_gathered=return_gathered, precision=precision), axis)(x)
    args = (*vary_over_axes(_rows(x), w, axis_name), axis_name, impl, size, config, out_dtype,
            bool(w_transposed), precision)
    outs = _ag_gathered(*args) if return_gathered else (_ag(*args),)
    # Rank r's rows of x, its middle dims flattened in, stay one contiguous block
    # of the gathered rows: the product unflattens to [m * P, ..., n] in place.
    outs = tuple(a if x.ndim == 2 else a.reshape(size * x.shape[0], *x.shape[1:-1], a.shape[-1])
                 for a in outs)
    return outs if return_gathered else outs[0]


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, axis_name: Hashable, *,
                          scatter_dimension: int = 0, impl: str = "auto", config: Any = None,
                          preferred_element_type: Any = None,
                          w_transposed: bool = False, precision: Any = None) -> jax.Array:
    """Multiplies ``x @ w`` and reduce-scatters the sum over ``axis_name`` along rows.

    Call it inside ``jax.shard_map``, like a ``lax`` collective. Equivalent to
    ``lax.psum_scatter(x @ w, axis_name, scatter_dimension=scatter_dimension,
    tiled=True)`` with the matmul accumulated in float32.

    Args:
      x: [M, k], or [M, ..., k] (scattered along dim 0, the middle dims
        going along), M divisible by the axis size P; bfloat16, float16,
        float32 or float8 (as in ``all_gather_matmul``; needs
        ``preferred_element_type``).
      w: [k, N], same dtype as x (typically this rank's row shard).
      axis_name: the mesh axis (or tuple of axes) to reduce and scatter over
        (size P).
      scatter_dimension: the dim of x scattered along, any but the last
        (negative: from the end), as in ``lax.psum_scatter``; its size
        divisible by P. The dims before it are a batch of problems sharing
        w, as with ``all_gather_matmul``'s ``axis``.
      impl: ``"xla"``, ``"ring"``, ``"fused"`` or ``"auto"``, as in
        ``all_gather_matmul``.
      config: ``MatmulReduceScatterConfig`` for impl ``"fused"``; None picks
        a default by shape.
      preferred_element_type: the result's dtype, as in
        ``all_gather_matmul``; the partial sums travel in it too (float32
        partials: twice the bytes of bfloat16 ones, no rounding before the
        sum).
      w_transposed: ``w`` is given as w^T, [N, k], as in
        ``all_gather_matmul``.
      precision: as in ``all_gather_matmul`` (``lax.dot_general``'s).

    Returns:
      [M / P, N] (or [M / P, ..., N]) in x's dtype (or
      ``preferred_element_type``): rank r gets rows [r * M/P, (r + 1) * M/P)
      of the sum over ranks.

    Raises:
      ValueError: as ``all_gather_matmul``, and when M (dim
        ``scatter_dimension``) is not divisible by P.
    """
    size = _validate.axis_size(_RS, axis_name)
    _validate.check_operands(_RS, x, w, axis_name, size, w_transposed)
    dim = _validate.row_dim(_RS, x, scatter_dimension, "scatter_dimension")
    _validate.check_scatter_rows(_RS, x, axis_name, size, dim)
    out_dtype = _validate.result_dtype(_RS, x, w, preferred_element_type)
    impl = _resolve(_RS, impl, config)
    precision = _precision.canonical(_RS, precision)
    if dim:
        return _batched(functools.partial(
            matmul_reduce_scatter, w=w, axis_name=axis_name, impl=impl, config=config,
            preferred_element_type=preferred_element_type, w_transposed=w_transposed,
            precision=precision), dim)(x)
    z = _rs(*vary_over_axes(_rows(x), w, axis_name), axis_name, impl, size, config, out_dtype,
            bool(w_transposed), precision)
    # Rank r's share of the flattened rows is rows [r * M/P, (r + 1) * M/P) of x's dim 0.
    return z if x.ndim == 2 else z.reshape(x.shape[0] // size, *x.shape[1:-1], z.shape[-1])
