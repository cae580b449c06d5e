"""A numpy-backed stand-in for the torch tensors Triton's interpreter expects.

The interpreter (triton.runtime.interpreter.GridExecutor) reads a kernel
argument through a handful of torch methods: ``data_ptr``, ``dtype``,
``untyped_storage().data_ptr()/.cpu()``, ``storage_offset``, ``size``,
``stride``, ``new_empty`` + ``set_`` (to build its host copy) and ``copy_``
(to write the host copy back). ``HostTensor`` implements exactly those over a
numpy array, with ``cpu()`` returning the same storage, so the kernel reads
and writes the caller's memory in place: no copies, and raw addresses taken
from a ``HostTensor`` stay valid for other ranks' kernels.
"""

from __future__ import annotations

import numpy as np

# Triton recognises an argument's element type from ``str(arg.dtype)`` with
# the "torch." prefix stripped.
_TRITON_NAMES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
}


class _DType:
    """Prints as ``torch.<name>``, which is all Triton inspects."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, _DType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class _Storage:
    """The storage behind a HostTensor: the base numpy array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def cpu(self) -> "_Storage":
        # Host memory already: the interpreter works on the caller's buffer.
        return self

    def copy_(self, other: "_Storage") -> "_Storage":
        if other.data_ptr() != self.data_ptr():
            np.copyto(self.array, other.array)
        return self


class HostTensor:
    """A C-contiguous numpy array dressed as the torch tensor Triton expects."""

    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray):
        if not array.flags.c_contiguous:
            raise ValueError("HostTensor needs a C-contiguous array")
        name = _TRITON_NAMES.get(array.dtype.name)
        if name is None:
            raise ValueError(f"Triton has no element type for numpy dtype {array.dtype}")
        self.array = array
        self.dtype = _DType(name)

    # --- what the interpreter calls -------------------------------------
    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self) -> _Storage:
        return _Storage(self.array)

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self.array.shape

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def new_empty(self, *_, **__) -> "HostTensor":
        return HostTensor(self.array)

    def set_(self, storage: _Storage, offset: int, size, stride) -> "HostTensor":
        # Only the identity view is ever requested (offset 0, own shape).
        if offset != 0 or tuple(size) != self.array.shape:
            raise ValueError("HostTensor.set_ supports only the identity view")
        self.array = storage.array
        return self

    def copy_(self, other: "HostTensor") -> "HostTensor":
        if other.data_ptr() != self.data_ptr():
            np.copyto(self.array, other.array)
        return self

    # --- convenience ------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __repr__(self) -> str:
        return f"HostTensor(shape={self.array.shape}, dtype={self.dtype})"
