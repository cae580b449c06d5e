"""``impl="auto"``: per launch, the impl measured fastest, and a fallback where the
fused kernels cannot run on the mesh.

The measurements (``jax_flux.autotune``) are keyed by device kind and
problem and read at trace time; whether the fused kernels can run on the
mesh (a group's ranks on one machine, its GPUs linked with native atomics:
``workspace.TableRequest.placement``) is only known when the program is
lowered, for its concrete devices. So where the measurements say "fused",
the launch is a choice made at lowering (``_lowering_choice``) between the
fused kernels and the faster of xla and ring; the refused side leaves nothing
in the program. Either way the user is told, in a warning, why auto did not
run what was measured fastest.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Hashable

from jax_flux import _lowering_choice, workspace
from jax_flux._fused import device_kind
from jax_flux._tuning_records import AG, explain


def explained(op: str, x, w, size: int, out_dtype, w_transposed: bool, precision=None) -> dict:
    """``autotune.explain`` of this launch's per-rank problem on this device kind:
    its "auto" is the impl measured fastest (``benchmarks.tune`` records xla's
    and ring's times beside the fused config's; jax_flux ships such entries),
    else xla, and its "fallback" the faster of xla and ring. Per launch, so
    the backward pass's ops follow their own measurements (``benchmarks.tune
    --backward``)."""
    n = w.shape[0] if w_transposed else w.shape[1]
    m_local = x.shape[0] if op == AG else x.shape[0] // size
    return explain(op, device_kind(), m_local, x.shape[1], n, x.dtype, size,
                   out_dtype=out_dtype, w_transposed=w_transposed, w_dtype=w.dtype,
                   precision=precision)


def launch(op: str, run: Callable[[str, object, object], object], x, w, axis_name: Hashable,
           size: int, out_dtype, w_transposed: bool, precision=None):
    """``run(impl, x, w)`` for the impl ``auto`` takes: the measured fastest; where
    that is "fused", chosen at lowering between it and the fastest of the rest."""
    why = explained(op, x, w, size, out_dtype, w_transposed, precision)
    if why["auto"] != "fused":
        return run(why["auto"], x, w)
    fallback = why["fallback"]

    def fused(x, w):
        try:
            return run("fused", x, w)
        except ValueError as e:  # at trace time: shard_map not manual over every axis, ...
            raise _Refused(e) from e

    try:
        return _lowering_choice.choose(_FusedRunsHere(op, axis_name, size, fallback),
                                       (fused, lambda x, w: run(fallback, x, w)), x, w)
    except _Refused as refused:
        _warn(op, fallback, refused.args[0])
        return run(fallback, x, w)


class _Refused(Exception):
    """The fused launch refused the program at trace time (its ValueError inside)."""


def _warn(op: str, fallback: str, why: Exception) -> None:
    warnings.warn(f"{op}(impl='auto'): the fused kernels were measured fastest for this "
                  f"problem but cannot run here, so it runs impl={fallback!r} (the faster of "
                  f"the rest): {why}", UserWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class _FusedRunsHere:
    """The lowering choice: 0 (the fused kernels) where their calls over the axis
    can run on the mesh the program is lowered on, else 1 (``fallback``); 1 for
    ``jax.export`` too (the fused kernels' program holds this process's
    workspace addresses)."""

    op: str
    axis_name: Hashable
    world: int
    fallback: str

    def __call__(self, mesh, platform: str, exporting: bool) -> int:
        if exporting:
            _warn(self.op, self.fallback, ValueError(
                "the program is lowered for jax.export, and the fused kernels' program "
                "would hold this process's symmetric-workspace addresses"))
            return 1
        groups = 1
        if mesh is not None and not getattr(mesh, "empty", False):
            groups = mesh.devices.size // self.world
        request = workspace.TableRequest(self.op, self.axis_name, self.world, groups, 0)
        try:
            request.placement(mesh, platform)
        except ValueError as e:
            _warn(self.op, self.fallback, e)
            return 1
        return 0
