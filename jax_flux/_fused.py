"""What both fused ops need at trace time: the workspace table, this rank's context, errors."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from custom_calls import interpreter_ready
from custom_calls.binding import LoweredConstant
from custom_calls.gemm import mma_dtype, upcast_operands
from jax_flux import errors, workspace
from jax_flux._axes import axis_names

# Persistent grid cap in Triton's interpreter (programs run one after another).
_INTERPRETER_PROGRAMS = 4


@dataclasses.dataclass(frozen=True)
class Launch:
    """Per-call operands and options shared by the fused kernels."""

    ctx: jax.Array  # int32 [2]: this rank's index on the axis, patience in ms (config.patience_ms)
    table: LoweredConstant  # uint32 [2P, 2]: (lo, hi) of every rank's workspace, then error record
    interpreting: bool
    max_programs: int
    upcast: bool
    remote_cache: str
    on_timeout: functools.partial  # formats a nonzero status (jax_flux.errors.describe)
    status_check: str  # "sync" or "async" (jax_flux.errors)


def _groups(op: str, axis_name: Hashable):
    """(number of groups, this rank's group index) for the workspace."""
    mesh = jax.sharding.get_abstract_mesh()
    names, sizes = tuple(mesh.axis_names), tuple(mesh.axis_sizes)
    tp = axis_names(axis_name)
    if not set(tp) <= set(names):
        raise ValueError(f"{op}(impl='fused') must run inside jax.shard_map over a mesh with "
                         f"axis {axis_name!r}; the current mesh has axes {names}")
    manual = set(getattr(mesh, "manual_axes", names))
    group, groups = 0, 1
    for name, size in zip(names, sizes):
        if name in tp or size == 1:
            continue
        if name not in manual:
            raise ValueError(f"{op}(impl='fused') needs shard_map to be manual over every mesh "
                             f"axis of size > 1; {name!r} (size {size}) is not")
        group = group * size + lax.axis_index(name)
        groups *= size
    return groups, group


def prepare(op: str, axis_name: Hashable, size: int, nbytes: int, config, dtype) -> Launch:
    """This rank's kernel operands; the workspace is allocated (or reused) when the
    program is lowered, for the devices it is lowered on."""
    interpreting = interpreter_ready()
    groups, group = _groups(op, axis_name)
    # [groups * P, 2P, 2] resolved at lowering and baked into the program; this
    # rank's row: every rank's workspace and error record as this rank addresses them.
    table = LoweredConstant(workspace.TableRequest(op, axis_name, size, groups, nbytes),
                            group * size + lax.axis_index(axis_name))
    ctx = jnp.stack([lax.axis_index(axis_name),
                     jnp.int32(config.patience_ms())]).astype(jnp.int32)
    if interpreting:
        max_programs = _INTERPRETER_PROGRAMS
    else:
        max_programs = sm_count() * config.programs_per_sm
    status_check = errors.status_check(interpreting)
    if status_check == "async":
        errors.watchdog.start()
    return Launch(
        ctx=ctx, table=table, interpreting=interpreting, max_programs=max_programs,
        upcast=upcast_operands(dtype), remote_cache="" if interpreting else ".cg",
        on_timeout=functools.partial(errors.describe, op=op, axis_name=axis_name,
                                     timeout_s=config.timeout_s),
        status_check=status_check)


def tuned_or_default(cls, op: str, m_local: int, k: int, n: int, world: int, dtype,
                     out_dtype=None, w_transposed: bool = False, w_dtype=None, precision=None,
                     input_precision: str = "tf32"):
    """The autotuned config for this problem on this device kind, else the heuristic.

    Tuned configs are keyed by the result dtype, w's dtype (where it is not
    x's ``dtype``), w's layout and float32 MMAs' precision too (a config tuned
    for a bfloat16 result, a row-major w or tensorfloat32 is not assumed best
    for a float32 one, w^T or exact float32); the heuristic
    is told the item sizes of the MMAs' operands and of the result, and the
    launch's ``input_precision`` (``precision`` resolved for its MMAs).
    """
    from jax_flux import autotune

    out_dtype = jnp.dtype(out_dtype or dtype)
    tuned = autotune.lookup(op, device_kind(), m_local, k, n, dtype, world, out_dtype=out_dtype,
                            w_transposed=w_transposed, w_dtype=w_dtype, precision=precision)
    if tuned is not None:
        return tuned
    return cls.default(m_local, k, n, world, interpreter_ready(), sms=sm_count(),
                       itemsize=mma_dtype(dtype, w_dtype).itemsize,
                       out_itemsize=out_dtype.itemsize, input_precision=input_precision)


def device_kind() -> str:
    """The device kind autotuned entries are keyed by, at trace time: the
    enclosing mesh's, else the default backend's (the abstract mesh of a
    shard_map may not know it; that backend's devices are the ones a fused
    kernel can run on)."""
    return (getattr(jax.sharding.get_abstract_mesh(), "device_kind", None) or
            jax.devices()[0].device_kind)


def vmap_folding(launch: Callable, rows: int) -> Callable:
    """``launch(x, w, rows)`` as a function of (x, w) whose ``jax.vmap`` over x
    with one w folds the batch into a single launch.

    ``launch`` takes x holding a batch of problems of ``rows`` rows a rank
    each (the kernel's ROWS; all of x's rows when unbatched) and returns
    outputs whose rows are element-major. A batch of x against a shared w is
    flattened into x's rows and launched once: one kernel, w read once,
    instead of one launch (and one read of w) per element. A batched w (a
    weight per element) falls back to one launch per element (the kernel
    primitive's own batching: a loop every rank runs in step).
    """
    fn = jax.custom_batching.custom_vmap(lambda x, w: launch(x, w, rows))

    @fn.def_vmap
    def rule(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if w_batched or not x_batched:
            out = jax.vmap(lambda x, w: launch(x, w, rows),
                           in_axes=(0 if x_batched else None, 0 if w_batched else None))(x, w)
        else:
            out = jax.tree.map(lambda o: o.reshape(axis_size, -1, *o.shape[1:]),
                               fn(x.reshape(-1, *x.shape[2:]), w))
        return out, jax.tree.map(lambda _: True, out)

    return fn


def persistent_grid(num_programs: int | None, tiles: int, helpers: int,
                    max_programs: int) -> int:
    """Programs of a fused launch: ``num_programs`` if the config sets it, else one
    per output tile plus the helper programs (communication or reduction), at most
    ``max_programs``; always at least one GEMM program."""
    grid = num_programs or min(tiles + helpers, max_programs)
    return max(grid, helpers + 1)


def sm_count() -> int:
    """Multiprocessors of the default backend's first device (132 if it does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


