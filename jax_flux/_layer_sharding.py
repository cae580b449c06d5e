"""How the tensor-parallel layers (``jax_flux.nn``) lie on the mesh: axis sizes,
the manual-context test, placing a global array, the specs of token dims."""

from __future__ import annotations

import math
from typing import Hashable

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_flux._axes import axis_names


def axis_size(mesh: Mesh, axis_name: Hashable) -> int:
    """Devices along the tensor-parallel axis (or tuple of axes) of ``mesh``."""
    names = axis_names(axis_name)
    if not set(names) <= set(mesh.axis_names):
        raise ValueError(f"mesh has axes {mesh.axis_names}, not the tensor-parallel axis "
                         f"{axis_name!r}")
    return math.prod(int(mesh.shape[a]) for a in names)


def in_manual_context(axis_name: Hashable) -> bool:
    """True inside a shard_map that is manual over ``axis_name`` (local shards)."""
    mesh = jax.sharding.get_abstract_mesh()
    return set(axis_names(axis_name)) <= set(getattr(mesh, "manual_axes", ()))


def place(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """``x`` laid out as ``spec`` on ``mesh``, in global view under jit.

    On a mesh with ``Explicit`` axes (``jax.make_mesh``'s default) a layout
    is part of the type: ``jax.sharding.reshard`` moves the data, and
    ``shard_map`` requires its inputs to match ``in_specs`` already. On
    ``Auto`` axes it is a ``with_sharding_constraint``.
    """
    sharding = NamedSharding(mesh, spec)
    if getattr(mesh, "explicit_axes", ()):  # JAX refuses meshes mixing the two kinds
        return jax.sharding.reshard(x, sharding)
    return lax.with_sharding_constraint(x, sharding)


def token_spec(layer, dims: int, split: bool) -> list:
    """Specs of x's ``dims`` leading (token) dims: the sequence dim over the
    axis where ``split``, the batch dim (the other of the first two) over
    ``batch_axis``."""
    spec = [None] * dims
    if dims > 1:
        spec[1 - layer.sequence_dim] = layer.batch_axis or None
    if split:
        spec[layer.sequence_dim] = layer.axis_name
    return spec
