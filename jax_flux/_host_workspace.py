"""The workspace's CPU locations: ``host`` (one process) and ``host-shared``
(POSIX shared memory, several processes on one host), for Triton's interpreter.
"""

from __future__ import annotations

import itertools
import mmap
import os

import numpy as np

from jax_flux.workspace import _ALIGN, _RECORD_BYTES, Buffer, Record


class Host:
    """Host memory of this process (CPU devices, one process)."""

    # A peer's memory opened once serves every device of this process.
    maps_per_device = False

    def allocate(self, device, nbytes: int) -> Buffer:
        raw = np.zeros(nbytes + _ALIGN, np.uint8)
        start = (-raw.ctypes.data) % _ALIGN
        return Buffer(ptr=raw.ctypes.data + start, nbytes=nbytes, owned=True, keep=raw)

    def connect(self, devices) -> None:
        pass

    def record(self, device) -> Record:
        raw = np.zeros(_RECORD_BYTES * 2, np.uint8)
        ptr = raw.ctypes.data + (-raw.ctypes.data) % _RECORD_BYTES
        return Record(host_ptr=ptr, device_ptr=ptr, keep=raw)

    def zero(self, b: Buffer) -> None:
        (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * b.nbytes).from_address(b.ptr))
         .fill(0))


class SharedHost(Host):
    """POSIX shared memory (CPU devices, one process per device group, one host)."""

    _counter = itertools.count()

    def allocate(self, device, nbytes: int) -> Buffer:
        name = f"jax_flux-{os.getpid()}-{next(self._counter)}"
        path = f"/dev/shm/{name}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # zero-filled
            mem = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        _unlink_at_exit(path)
        return self._buffer(mem, nbytes, owned=True, name=name)

    def export(self, b: Buffer) -> bytes:
        return b.keep[1].encode()

    def open(self, handle: bytes, device, nbytes: int) -> Buffer:
        path = f"/dev/shm/{handle.decode()}"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise RuntimeError(
                f"jax_flux workspace: {path} (a peer's buffer) is not on this host; ranks of a "
                f"fused axis across processes must share one host") from e
        try:
            mem = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        return self._buffer(mem, nbytes, owned=False, name=handle.decode())

    @staticmethod
    def _buffer(mem: mmap.mmap, nbytes: int, *, owned: bool, name: str) -> Buffer:
        view = np.frombuffer(mem, np.uint8)
        return Buffer(ptr=view.ctypes.data, nbytes=nbytes, owned=owned, keep=(mem, name, view))


_to_unlink: list[str] = []


def _unlink_at_exit(path: str) -> None:
    import atexit

    if not _to_unlink:
        atexit.register(lambda: [os.path.exists(p) and os.unlink(p) for p in _to_unlink])
    _to_unlink.append(path)
