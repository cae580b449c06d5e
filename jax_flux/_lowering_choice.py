"""A choice between ways of computing one thing, made when the program is lowered.

``impl="auto"`` picks the fused kernels from measurements keyed by device
kind and problem, at trace time; whether they can run on the mesh the
program is lowered on (every rank of a group on one machine, GPUs linked
with native atomics) is only known at lowering, from the concrete devices
(trace time sees the abstract mesh), as is whether the program is lowered
for ``jax.export`` (it then must not hold this process's workspace
addresses). ``choose`` traces every branch and binds one primitive; its
lowering asks ``chooser(mesh, platform, exporting)`` which branch to lower
and lowers only that one, so a refused branch leaves nothing in the program
(no custom call, no workspace allocated).

Invariants: every branch takes the same operands, closes over no traced
value and returns the same pytree of the same avals (checked when they are
traced); the chooser is hashable and gives the same
answer in every process lowering the program (the ranks must all run the
same branch).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jax_core
from jax.interpreters import batching, mlir

from custom_calls._jax_compat import lowering_for_export

choice_p = jax_core.Primitive("jax_flux_lowering_choice")
choice_p.multiple_results = True


def choose(chooser: Callable[[Any, str, bool], int], branches: Sequence[Callable],
           *args) -> Any:
    """``branches[chooser(mesh, platform, exporting)](*args)``, chosen when the program
    is lowered.

    Args:
      chooser: hashable ``(mesh, platform, exporting) -> index``: the concrete
        ``jax.sharding.Mesh`` of the enclosing ``shard_map`` (None outside
        one), ``"cpu"``, ``"cuda"`` or ``"rocm"``, and whether the program is
        lowered for ``jax.export``.
      branches: functions of ``*args`` (arrays) returning the same pytree of
        arrays of the same shapes, dtypes and varying mesh axes.
      *args: the arrays every branch takes.

    Returns:
      The chosen branch's result. Outside ``jit`` the choice is made at once
      (the primitive compiles its one call).
    """
    traced = [jax.make_jaxpr(b, return_shape=True)(*args) for b in branches]
    trees = {jax.tree.structure(shape) for _, shape in traced}
    avals = {tuple(closed.out_avals) for closed, _ in traced}
    if len(trees) != 1 or len(avals) != 1:
        raise ValueError(f"lowering choice: branches differ in what they return: {avals}")
    outs = choice_p.bind(*args, branches=tuple(c for c, _ in traced), chooser=chooser)
    return jax.tree.unflatten(trees.pop(), outs)


@choice_p.def_effectful_abstract_eval
def _abstract_eval(*avals, branches, chooser):
    # The branches' effects (the mesh axes they use, as collectives declare
    # them) are the primitive's: either may be the one lowered.
    del avals, chooser
    return branches[0].out_avals, set().union(*(b.effects for b in branches))


@choice_p.def_impl
def _eager(*args, branches, chooser):
    return jax.jit(functools.partial(choice_p.bind, branches=branches, chooser=chooser))(*args)


def _lowering(ctx, *args, branches, chooser, platform: str):
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    branch = branches[chooser(mesh, platform, lowering_for_export(ctx))]
    return mlir.lower_fun(jax_core.jaxpr_as_fun(branch), multiple_results=True)(ctx, *args)


# One rule a platform (as the kernels' binding has): a program lowered for
# several platforms asks the chooser once for each.
for _platform in ("cpu", "cuda", "rocm"):
    mlir.register_lowering(choice_p, functools.partial(_lowering, platform=_platform),
                           platform=_platform)


def _batch(args, dims, *, branches, chooser):
    """``jax.vmap``: every branch vmapped (each by its own rules: the fused
    kernels fold a batch into one launch), the choice left to the lowering."""
    vmapped = [jax.vmap(jax_core.jaxpr_as_fun(b), in_axes=tuple(dims), out_axes=0)
               for b in branches]
    outs = choose(chooser, vmapped, *args)
    return outs, [0] * len(outs)


batching.primitive_batchers[choice_p] = _batch
