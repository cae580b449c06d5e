"""Small shims over JAX internals that moved between jax 0.10 and 0.12, and over
jax-triton's ``triton_call``, whose keywords moved between 0.3 and 0.4."""

from __future__ import annotations

import functools
import inspect
import warnings

import jax


def varying_axes_of_aval(aval) -> frozenset:
    """Mesh axes an abstract value varies over inside ``shard_map``.

    jax 0.11 exposes ``aval.vma``; jax 0.10 keeps it in ``aval.mat.varying``.
    """
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma or ())


def varying_axes(x) -> frozenset:
    """Mesh axes the value ``x`` varies over inside ``shard_map``."""
    return varying_axes_of_aval(jax.typeof(x))


def lowering_for_export(ctx) -> bool:
    """Whether the program a lowering rule's ``ctx`` belongs to is lowered for
    ``jax.export`` (serialized, to run in another process), in jax 0.10 to 0.12."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


def silence_zeroed_outputs_deprecation() -> None:
    """Silences jax-triton 0.4's deprecation of ``zeroed_outputs`` for the calls
    made from this package alone (the warning names its caller's module).

    0.4 would have zero-filled ``jax.Ref`` operands instead, which jax 0.10 and
    jax-triton 0.3.1 (the one for Triton 3.6) lack; zeroed_outputs is what both
    releases take, and a fused kernel's status output must start zeroed."""
    warnings.filterwarnings("ignore", message="zeroed_outputs is deprecated",
                            category=DeprecationWarning, module=r"custom_calls\.")


silence_zeroed_outputs_deprecation()


@functools.cache
def _takes_out_type(triton_call) -> bool:
    return "out_type" in inspect.signature(triton_call).parameters


def jax_triton_outputs(jax_triton, out_shapes) -> dict:
    """The keyword giving ``jax_triton.triton_call`` its outputs: ``out_type`` from
    jax-triton 0.4 (where ``out_shape`` is deprecated), ``out_shape`` in 0.3."""
    name = "out_type" if _takes_out_type(jax_triton.triton_call) else "out_shape"
    return {name: list(out_shapes)}
