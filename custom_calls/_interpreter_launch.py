"""One kernel launch through Triton's interpreter, on host (numpy) arrays.

What ``binding``'s CPU lowering runs in each device's host callback, and what
tests call directly: operands aligned as on a GPU, outputs poisoned so a tile
the kernel never writes shows, the launch on ``HostTensor`` views.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from custom_calls import _program_threads
from custom_calls._host_tensor import HostTensor

Grid = tuple[int, ...]

# Value written into every output before a CPU launch, so a tile the kernel
# never writes shows up in a comparison instead of passing as stale memory.
_POISON_INT = -0x5A5A5A5A


def interleave(arrays: Sequence[Any], scalars: tuple) -> list:
    """Rebuilds the kernel's operand list: scalars back at their positions."""
    out, it = [], iter(arrays)
    positions = dict(scalars)
    for i in range(len(arrays) + len(scalars)):
        out.append(positions[i] if i in positions else next(it))
    return out


def _poison(a: np.ndarray) -> None:
    if np.issubdtype(a.dtype, np.integer):
        a.fill(np.array(_POISON_INT).astype(a.dtype))
    else:
        a.fill(np.nan)


_ALIGN = 16


def aligned(a: np.ndarray) -> np.ndarray:
    """``a`` at a 16-byte aligned address (copied if it is not): kernels rely on
    operand alignment as on a GPU (jax-triton assumes it of XLA's buffers)."""
    if a.ctypes.data % _ALIGN == 0:
        return a
    raw = np.empty(a.nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def run_interpreted(kernel, grid: Grid, arrays: Sequence[np.ndarray], *, scalars: tuple,
                    out_shapes: Sequence[jax.ShapeDtypeStruct], input_output_aliases: tuple,
                    zeroed_outputs: tuple, metaparams: tuple) -> list[np.ndarray]:
    """Runs one kernel launch through Triton's interpreter on host arrays."""
    if not hasattr(kernel, "rewrite"):  # triton.runtime.interpreter.InterpretedFunction
        raise RuntimeError(
            "jax_flux runs Triton kernels on CPU devices through Triton's interpreter, but "
            "triton was imported in compiled mode before jax_flux. Set TRITON_INTERPRET=1 "
            "before anything imports triton, or import jax_flux first.")
    _program_threads.install()  # the shim too; programs one by one unless asked otherwise
    inputs = [aligned(np.ascontiguousarray(a)) for a in arrays]
    outputs = [aligned(np.empty(s.shape, s.dtype)) for s in out_shapes]
    for o in outputs:
        _poison(o)
    for i in zeroed_outputs:
        outputs[i].fill(0)
    for i, o in input_output_aliases:
        np.copyto(outputs[o], inputs[i])
    operands = interleave([HostTensor(a) for a in inputs], scalars)
    kernel[grid](*operands, *[HostTensor(o) for o in outputs], **dict(metaparams))
    return outputs
