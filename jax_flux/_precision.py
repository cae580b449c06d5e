"""The ops' ``precision``, as ``lax.dot_general`` takes it, and what the fused kernels run for it.

The xla and ring impls hand ``precision`` to ``lax.dot_general`` as it is
(None: XLA applies ``jax_default_matmul_precision``). The fused kernels'
``tl.dot`` has one knob, the input precision of float32 operands, so there it
is resolved at trace time (None: that same config, then DEFAULT) the way XLA
resolves it on a GPU (JAX's ``lax.Precision`` docs): DEFAULT and HIGH run
tensorfloat32, HIGHEST exact float32. The algorithm presets name what they
run: TF32_TF32_F32_X3 is Triton's "tf32x3" (three tf32 passes, about float32's
accuracy). 16-bit and float8 operands multiply exactly into float32
accumulators whatever the precision (their products fit float32's mantissa),
so only presets that ask for something else (16-bit accumulation, float32
operands split into bfloat16 passes) are refused there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_PRESET = lax.DotAlgorithmPreset
# What the kernels run for float32 operands, by lax.Precision (XLA on a GPU:
# tensorfloat32 unless HIGHEST).
_BY_LEVEL = {lax.Precision.DEFAULT: "tf32", lax.Precision.HIGH: "tf32",
             lax.Precision.HIGHEST: "ieee"}
# ... and by algorithm preset (DEFAULT: by the precision, i.e. DEFAULT's).
_F32_PRESETS = {_PRESET.DEFAULT: "tf32", _PRESET.TF32_TF32_F32: "tf32",
                _PRESET.TF32_TF32_F32_X3: "tf32x3", _PRESET.F32_F32_F32: "ieee"}
# Presets the kernels honour for narrower MMAs: float32 accumulation of exact
# products (fast accumulation is a permission, not a requirement).
_NARROW_PRESETS = {
    "float16": (_PRESET.DEFAULT, _PRESET.F16_F16_F32, _PRESET.F32_F32_F32),
    "bfloat16": (_PRESET.DEFAULT, _PRESET.BF16_BF16_F32, _PRESET.F32_F32_F32),
    "float8": (_PRESET.DEFAULT, _PRESET.ANY_F8_ANY_F8_F32,
               _PRESET.ANY_F8_ANY_F8_F32_FAST_ACCUM),
}


def _invalid(op: str, given) -> ValueError:
    levels = ", ".join(repr(p.name.lower()) for p in lax.Precision)
    return ValueError(f"{op}: precision must be None, a lax.Precision (or its name: {levels}), "
                      f"a pair of them (x's, w's), a lax.DotAlgorithmPreset (or its name) or a "
                      f"lax.DotAlgorithm, as lax.dot_general takes it; got {given!r}")


def _one(value):
    """One precision (a lax.Precision, a name of one, or of a preset) as lax's type;
    None if it is none of those."""
    if isinstance(value, (lax.Precision, lax.DotAlgorithmPreset)):
        return value
    if isinstance(value, str):
        try:
            return lax.Precision(value)
        except (ValueError, KeyError, TypeError):
            return _PRESET.__members__.get(value)
    return None


def canonical(op: str, precision: Any):
    """``precision`` checked and made hashable: None, a ``lax.Precision``, a pair of
    them, a ``lax.DotAlgorithmPreset`` (strings turned into those) or a
    ``lax.DotAlgorithm`` (a NamedTuple)."""
    if precision is None or isinstance(precision, lax.DotAlgorithm):  # (a NamedTuple)
        return precision
    if isinstance(precision, (tuple, list)):
        pair = tuple(_one(p) for p in precision)
        if len(pair) != 2 or not all(isinstance(p, lax.Precision) for p in pair):
            raise _invalid(op, precision)
        return pair
    one = _one(precision)
    if one is None:
        raise _invalid(op, precision)
    return one


def kernel_input_precision(op: str, precision, mma_dtype) -> str:
    """The fused kernels' ``tl.dot`` input precision for ``precision`` (as the ops
    take it) with MMAs in ``mma_dtype``: "tf32", "tf32x3" or "ieee" for float32
    operands, "ieee" (exact) for narrower ones. None reads
    ``jax_default_matmul_precision``, as ``lax.dot_general`` does. Raises
    ValueError where the kernels cannot run what ``precision`` asks for."""
    precision = canonical(op, precision)
    if precision is None:
        precision = canonical(op, jax.config.jax_default_matmul_precision) or lax.Precision.DEFAULT
    mma = jnp.dtype(mma_dtype)
    if isinstance(precision, tuple) and not isinstance(precision, lax.DotAlgorithm):
        precision = max(precision, key=lambda p: p.value)  # (x's, w's): the higher, as in XLA
    if isinstance(precision, lax.Precision):
        return _BY_LEVEL[precision] if mma == jnp.float32 else "ieee"
    if isinstance(precision, lax.DotAlgorithm):
        raise ValueError(f"{op}(impl='fused'): precision {precision} is a custom algorithm; the "
                         f"fused kernels run the presets of "
                         f"{'float32' if mma == jnp.float32 else mma.name} operands "
                         f"({', '.join(p.name for p in _honoured(mma))}) only: use one of those, "
                         f"or impl='xla' or 'ring'")
    if precision in _honoured(mma):
        return _F32_PRESETS[precision] if mma == jnp.float32 else "ieee"
    names = ", ".join(p.name for p in _honoured(mma))
    raise ValueError(f"{op}(impl='fused'): precision {precision.name} is not what the fused "
                     f"kernels run: they multiply {mma.name} operands into float32 accumulators "
                     f"(presets {names}); use impl='xla' or 'ring' for it")


def _honoured(mma) -> tuple:
    """The algorithm presets the fused kernels run for MMAs in dtype ``mma``."""
    if mma == jnp.float32:
        return tuple(_F32_PRESETS)
    return _NARROW_PRESETS["float8" if mma.itemsize == 1 else mma.name]


def key_suffix(precision, mma_dtype) -> str:
    """What a tuning key adds for ``precision`` (as the ops take it): float32 MMAs
    other than tensorfloat32 (``|f32=ieee``, ``|f32=tf32x3``, or a preset the
    kernels do not run); nothing for narrower MMAs, which every honoured
    precision runs alike."""
    if jnp.dtype(mma_dtype) != jnp.float32:
        return ""
    precision = canonical("key", precision)
    try:
        run = kernel_input_precision("key", precision, mma_dtype)
    except ValueError:  # xla and ring may run it: their times are kept apart
        run = precision.name if isinstance(precision, lax.DotAlgorithmPreset) else (
            "algorithm(" + ",".join(str(getattr(v, "__name__", v)) for v in precision) + ")")
    return "" if run == "tf32" else f"|f32={run}"
