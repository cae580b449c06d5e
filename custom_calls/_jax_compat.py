"""Small shims over JAX internals that moved between jax 0.10 and 0.11."""

from __future__ import annotations

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
    ``jax.export`` (serialized, to run in another process), in jax 0.10 and 0.11."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))
