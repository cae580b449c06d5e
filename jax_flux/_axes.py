"""Mesh axes as the ops take them: one name, or a tuple of names that act as
one axis of their sizes' product (the first major), as ``lax`` collectives do;
and operands marked as varying over them (shard_map's varying-axes types)."""

from __future__ import annotations

from typing import Hashable, Sequence

import jax
import numpy as np
from jax import lax

from custom_calls._jax_compat import varying_axes


def axis_names(axis_name: Hashable) -> tuple:
    """The mesh axes of ``axis_name``, in its order."""
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def ppermute(x, axis_name: Hashable, perm: Sequence[tuple[int, int]]):
    """``lax.ppermute`` with ``perm`` in ``lax.axis_index(axis_name)`` numbering.

    For a tuple of axes ``lax.axis_index`` (and all_gather, psum_scatter)
    number ranks in the tuple's order, but ``lax.ppermute`` in the mesh's
    axis order (jax 0.11 refuses another order). Pairs are renumbered here so
    that a tuple in any order means what the other collectives mean by it.
    """
    names = axis_names(axis_name)
    mesh_order = list(jax.sharding.get_abstract_mesh().axis_names)
    ordered = tuple(sorted(names, key=mesh_order.index))
    if ordered == names:
        return lax.ppermute(x, axis_name, perm)
    sizes = [int(lax.axis_size(n)) for n in names]
    order = [names.index(n) for n in ordered]

    def renumber(rank: int) -> int:
        coords = np.unravel_index(rank, sizes)
        return int(np.ravel_multi_index([coords[i] for i in order], [sizes[i] for i in order]))

    return lax.ppermute(x, ordered, [(renumber(s), renumber(d)) for s, d in perm])


def vary_over_axes(x, w, axis_name: Hashable):
    """``x`` and ``w`` marked as varying over the same mesh axes: ``axis_name`` and
    every axis either one varies over.

    The custom_vjp's gradients are per rank and vary over all of those axes
    (with x split over a data-parallel axis, so does dW). Casting an operand
    that is replicated along an axis (a weight along "tp", or along "dp") to
    varying first lets JAX's own transpose of that cast sum its gradient over
    that axis, as autodiff of the lax collective does.
    """
    axes = varying_axes(x) | varying_axes(w) | set(axis_names(axis_name))
    return varying(x, axes), varying(w, axes)


def varying(a, axes):
    """``a`` marked as varying over ``axes`` (those it does not vary over yet)."""
    missing = tuple(sorted(set(axes) - varying_axes(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a
