"""One XLA binding for all jax_flux Triton kernels, on CUDA and on the CPU.

``triton_call`` binds the primitive ``jax_flux_triton_call``, whose lowering
depends on the platform the program is compiled for:

* CUDA: jax-triton's ``triton_call`` (imported lazily: it does not import
  without a CUDA jaxlib), which compiles the kernel and emits one custom call
  launched on XLA's stream.
* CPU: a host callback that runs the very same ``@triton.jit`` source through
  Triton's interpreter on numpy buffers (``_interpreter_launch``). Inside a
  ``shard_map`` over emulated CPU devices, XLA runs each device's callback on
  its own thread, so the ranks' kernels run concurrently, as on GPUs.

The calling convention is jax-triton's: kernel parameters are the positional
``args`` in order (arrays become pointers, Python scalars are passed by value
and specialise the kernel), then one pointer per output, then ``metaparams``
as constexprs. Runtime values (a rank, an epoch) must be arrays. An operand
may also be a ``LoweredConstant``: a table fixed when the program is lowered
for its concrete devices (the symmetric workspace's addresses), of which the
kernel gets one row chosen at run time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.experimental import io_callback
from jax.interpreters import batching, mlir

from custom_calls import _mode
from custom_calls._interpreter_launch import interleave, run_interpreted
from custom_calls._jax_compat import (jax_triton_outputs, lowering_for_export,
                                     varying_axes_of_aval as _varying_axes)

Grid = tuple[int, ...]


class PeerTimeoutError(RuntimeError):
    """A fused kernel waited past its timeout for a peer that never arrived."""


def _raise_on_status(status: np.ndarray, on_status) -> None:
    if int(status[0]) != 0:
        raise PeerTimeoutError(on_status(np.asarray(status)))


@dataclasses.dataclass(frozen=True)
class LoweredConstant:
    """A kernel operand whose value is fixed when the program is lowered.

    Attributes:
      resolve: hashable ``resolve(mesh, platform) -> np.ndarray [G, ...]``,
        called by the lowering with the concrete ``jax.sharding.Mesh`` the
        enclosing ``shard_map`` is lowered on (``None`` outside one) and
        ``"cpu"`` or ``"cuda"``. Memory it hands out must outlive every
        program lowered with it.
      index: int32 scalar array; the kernel receives ``resolve(...)[index]``.
    """

    resolve: Callable[[Any, str], np.ndarray]
    index: Any


triton_call_p = jax_core.Primitive("jax_flux_triton_call")
triton_call_p.multiple_results = True


@triton_call_p.def_abstract_eval
def _abstract_eval(*avals, out_shapes, **_):
    if not avals:
        raise ValueError("a jax_flux Triton call needs at least one array operand")
    # triton_call made every operand vary over the same mesh axes (inside
    # shard_map); outputs do too, so any operand's aval is the template.
    template = max(avals, key=lambda a: len(_varying_axes(a)))
    return [template.update(shape=tuple(s.shape), dtype=np.dtype(s.dtype), weak_type=False)
            for s in out_shapes]


@functools.lru_cache(maxsize=256)
def _jitted_bind(params: tuple):
    return jax.jit(functools.partial(triton_call_p.bind, **dict(params)))


@triton_call_p.def_impl
def _eager_impl(*args, **params):
    # Outside jit: compile the one call (cached by its static parameters).
    return _jitted_bind(tuple(sorted(params.items())))(*args)


def _batch(args, dims, **params):
    """``jax.vmap``: one launch per batch element, in a loop (``lax.map``).

    (jax_flux folds a batch against a shared weight into one launch before
    it gets here: ``jax_flux._fused.vmap_folding``.)

    A kernel is written for one problem; its grid, workspace offsets and
    signals are per call. Every rank runs the same program, so the ranks'
    calls stay in step (each iteration is a call with its own epoch).
    """
    mapped = [d is not None for d in dims]  # None: batching's "not mapped"
    xs = [jnp.moveaxis(a, d, 0) for a, d, m in zip(args, dims, mapped) if m]

    def one(slices):
        it = iter(slices)
        return triton_call_p.bind(*[next(it) if m else a for a, m in zip(args, mapped)],
                                  **params)

    outs = jax.lax.map(one, xs)
    return outs, [0] * len(outs)


batching.primitive_batchers[triton_call_p] = _batch


def triton_call(
    *args: Any,
    kernel: Any,
    out_shape: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    grid: int | Sequence[int],
    num_warps: int = 4,
    num_stages: int = 3,
    input_output_aliases: dict[int, int] | None = None,
    zeroed_outputs: Sequence[int] = (),
    status_output: int | None = None,
    on_status: Callable[[np.ndarray], str] | None = None,
    status_check: str = "sync",
    resident: bool = False,
    **metaparams: Any,
) -> Any:
    """Calls a ``@triton.jit`` kernel on JAX arrays, on CUDA or on the CPU.

    Args:
      *args: kernel operands in parameter order: JAX arrays (passed as
        pointers) and Python ``bool``/``int``/``float`` (passed by value).
      kernel: the ``@triton.jit`` function.
      out_shape: one ``jax.ShapeDtypeStruct`` or a sequence of them; one
        pointer per output follows the operands.
      grid: number of programs, an int or a tuple of up to 3 ints.
      num_warps: warps per program (compiled path only).
      num_stages: software-pipelining stages (compiled path only).
      input_output_aliases: ``{array operand index: output index}``; the
        output starts as a copy of (on CUDA: is) that operand.
      zeroed_outputs: indices of outputs set to zero before the launch.
      status_output: index of a zeroed int32 output the kernel sets nonzero
        when it gave up waiting for a peer; with ``status_check="sync"`` the
        call then raises ``PeerTimeoutError`` with the message
        ``on_status(status)``.
      on_status: formats a nonzero status (a host int32 array) as a message.
      status_check: ``"sync"`` (check the status in the program: on CUDA one
        device-to-host read and host synchronisation per call) or
        ``"async"`` (no check here; the kernel's error record reports it,
        see ``jax_flux.errors``).
      resident: a persistent kernel, its grid meant to run in one wave
        (its programs spin-wait on peers). When lowered for a GPU, a grid
        larger than the SMs x the programs of this compiled kernel that fit
        one SM raises ValueError (``compiler.check_resident``) before
        anything runs.
      **metaparams: ``tl.constexpr`` parameters of the kernel.

    Returns:
      One array, or a list of arrays when ``out_shape`` is a sequence.
    """
    single = not isinstance(out_shape, (list, tuple))
    out_shapes = (out_shape,) if single else tuple(out_shape)
    out_shapes = tuple(jax.ShapeDtypeStruct(tuple(s.shape), s.dtype) for s in out_shapes)
    grid = (grid,) if isinstance(grid, int) else tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3 or min(grid) < 1:
        raise ValueError(f"grid must be 1 to 3 positive ints, got {grid}")

    if status_check not in ("sync", "async"):
        raise ValueError(f"status_check must be 'sync' or 'async', got {status_check!r}")
    if status_output is not None:
        if on_status is None:
            raise ValueError("status_output needs on_status to describe a failure")
        zeroed_outputs = tuple(sorted(set(zeroed_outputs) | {status_output}))
    arrays, scalars, lowered = [], [], []
    for i, a in enumerate(args):
        if isinstance(a, (bool, int, float)):
            scalars.append((i, a))
        elif isinstance(a, LoweredConstant):
            lowered.append((len(arrays), a.resolve))
            arrays.append(jnp.asarray(a.index, jnp.int32))
        else:
            arrays.append(a)
    arrays = _same_varying_axes(arrays)
    outs = triton_call_p.bind(
        *arrays,
        kernel=kernel,
        scalars=tuple(scalars),
        lowered=tuple(lowered),
        out_shapes=out_shapes,
        grid=grid,
        num_warps=int(num_warps),
        num_stages=int(num_stages),
        input_output_aliases=tuple(sorted((input_output_aliases or {}).items())),
        zeroed_outputs=tuple(zeroed_outputs),
        status_output=status_output,
        on_status=on_status,
        status_check=status_check,
        resident=bool(resident),
        metaparams=tuple(sorted(metaparams.items())),
    )
    return outs[0] if single else list(outs)


def _same_varying_axes(arrays: list) -> list:
    """Inside shard_map, casts operands to vary over the union of their mesh axes."""
    axes = [_varying_axes(jax.typeof(a)) for a in arrays]
    union = frozenset().union(*axes)
    return [a if ax == union else jax.lax.pcast(a, tuple(sorted(union - ax, key=str)),
                                                to="varying")
            for a, ax in zip(arrays, axes)]


def _lowering_mesh(ctx):
    """The concrete mesh of the shard_map this program is lowered in, or None."""
    return getattr(ctx.module_context.axis_context, "mesh", None)


def _with_lowered_constants(ctx, kernel, lowered: tuple, platform: str):
    """Resolves the LoweredConstant operands for the mesh this program is lowered on;
    returns a function that swaps each one's index operand for its table row, and
    the operands' dtypes after that swap.

    Refuses a program lowered for ``jax.export``: the tables hold this process's
    addresses (the symmetric workspace), meaningless in the process that would
    load the serialized program.
    """
    if lowered and lowering_for_export(ctx):
        raise ValueError(
            f"{kernel.__name__}: jax_flux's fused kernels (impl='fused') cannot be exported "
            f"(jax.export): "
            f"the program would hold this process's symmetric-workspace addresses, fixed "
            f"when it is lowered. Export it with impl='xla' or 'ring' (impl='auto' takes "
            f"the faster of those itself when exporting)")
    tables = dict((pos, np.asarray(resolve(_lowering_mesh(ctx), platform)))
                  for pos, resolve in lowered)

    def substitute(arrays: Sequence[Any]) -> list:
        arrays = list(arrays)
        for pos, table in tables.items():
            arrays[pos] = jnp.asarray(table)[arrays[pos]]
        return arrays

    dtypes = [tables[i].dtype if i in tables else np.dtype(a.dtype)
              for i, a in enumerate(ctx.avals_in)]
    return substitute, dtypes


# --------------------------------------------------------------------- CPU


def _cpu_lowering(ctx, *args, kernel, scalars, lowered, out_shapes, grid, num_warps, num_stages,
                  input_output_aliases, zeroed_outputs, status_output, on_status, status_check,
                  resident, metaparams):
    del num_warps, num_stages, resident  # the interpreter has neither SMs nor warps
    substitute, _ = _with_lowered_constants(ctx, kernel, lowered, "cpu")

    def host_fn(*arrays):
        outputs = run_interpreted(
            kernel, grid, arrays, scalars=scalars, out_shapes=out_shapes,
            input_output_aliases=input_output_aliases, zeroed_outputs=zeroed_outputs,
            metaparams=metaparams)
        if status_output is not None and status_check == "sync":
            _raise_on_status(outputs[status_output], on_status)
        return outputs

    def callback(*arrays):
        arrays = substitute(arrays)
        if status_output is None:
            return jax.pure_callback(host_fn, list(out_shapes), *arrays)
        # Communicating kernels have side effects on the workspace: XLA must
        # neither drop nor reorder them (it runs side-effecting callbacks of a
        # device in program order, the same order on every rank).
        return io_callback(host_fn, list(out_shapes), *arrays, ordered=False)

    return mlir.lower_fun(callback, multiple_results=True)(ctx, *args)


# -------------------------------------------------------------------- CUDA


@functools.cache
def _jax_triton():
    try:
        import jax_triton
    except Exception as e:  # ImportError, or its own failure without CUDA jaxlib
        raise RuntimeError(
            "jax_flux's Triton kernels on GPU need jax-triton (pip install 'jax-triton==0.3.1' "
            f"with triton 3.6, or 0.4.x with triton >= 3.7 and jax >= 0.11): {e}") from e
    return jax_triton


def check_status(status, on_status) -> None:
    """Raises PeerTimeoutError from the running program when ``status[0] != 0``.

    XLA's GPU conditional reads its predicate on the host, so this costs one
    small device-to-host read and a stream synchronisation per fused call
    (``benchmarks/status_check.py`` measures it).
    """
    jax.lax.cond(status[0] != 0,
                 lambda s: io_callback(functools.partial(_raise_on_status, on_status=on_status),
                                       None, s, ordered=False),
                 lambda s: None, status)


def gpu_target(mesh) -> tuple[int, int] | None:
    """(SMs, compute capability as 90 for 9.0) of the GPU a program is lowered for:
    the mesh's first device, else the default backend's; None if that is no GPU."""
    devices = getattr(mesh, "devices", None)
    device = devices.flat[0] if devices is not None else jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return None
    major, minor = str(capability).split(".")[:2]
    return getattr(device, "core_count", None) or 132, int(major) * 10 + int(minor)


def _check_resident(kernel, grid: Grid, dtypes: list, scalars: tuple,
                    out_shapes: Sequence[jax.ShapeDtypeStruct], target: tuple[int, int],
                    metaparams: tuple, num_warps: int, num_stages: int) -> None:
    """``compiler.check_resident`` with the kernel's signature as jax-triton types it:
    array operands, then outputs, are pointers in parameter order (scalars are
    typed i32 here; a resident kernel should take none)."""
    from custom_calls import compiler

    sms, capability = target
    names = [n for n in kernel.arg_names if n not in dict(metaparams)]
    runtime = interleave([np.dtype(d) for d in dtypes], scalars) + [
        np.dtype(s.dtype) for s in out_shapes]
    pointers = tuple((name, compiler.pointer_type(d)) for name, d in zip(names, runtime)
                     if isinstance(d, np.dtype))
    compiler.check_resident(kernel, int(np.prod(grid)), sms=sms, capability=capability,
                            pointers=pointers, constexprs=metaparams, num_warps=num_warps,
                            num_stages=num_stages)


def _gpu_lowering(ctx, *args, kernel, scalars, lowered, out_shapes, grid, num_warps, num_stages,
                  input_output_aliases, zeroed_outputs, status_output, on_status, status_check,
                  resident, metaparams, platform):
    substitute, dtypes = _with_lowered_constants(ctx, kernel, lowered, platform)
    target = gpu_target(_lowering_mesh(ctx))
    if resident and target is not None:  # before jax-triton compiles and anything launches
        _check_resident(kernel, grid, dtypes, scalars, out_shapes, target, metaparams,
                        num_warps, num_stages)
    jt = _jax_triton()

    def call(*arrays):
        arrays = substitute(arrays)
        outs = jt.triton_call(
            *interleave(arrays, scalars), kernel=kernel, grid=grid,
            **jax_triton_outputs(jt, out_shapes),
            num_warps=num_warps, num_stages=num_stages,
            input_output_aliases=dict(input_output_aliases),
            zeroed_outputs=zeroed_outputs, **dict(metaparams))
        if status_output is not None and status_check == "sync":
            check_status(outs[status_output], on_status)
        return outs

    return mlir.lower_fun(call, multiple_results=True)(ctx, *args)


mlir.register_lowering(triton_call_p, _cpu_lowering, platform="cpu")
for _platform in ("cuda", "rocm"):  # the workspace refuses rocm (CUDA memory, CUDA's timer)
    mlir.register_lowering(triton_call_p, functools.partial(_gpu_lowering, platform=_platform),
                           platform=_platform)


def interpreter_ready() -> bool:
    """True when this process runs Triton kernels through the interpreter."""
    return _mode.interpreting()


__all__ = ["LoweredConstant", "PeerTimeoutError", "triton_call", "triton_call_p", "run_interpreted",
           "interpreter_ready"]
