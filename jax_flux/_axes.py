"""Mesh axes as the ops take them: one name, or a tuple of names that act as
one axis of their sizes' product (the first major), as ``lax`` collectives do."""

from __future__ import annotations

from typing import Hashable, Sequence

import jax
import numpy as np
from jax import lax


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
