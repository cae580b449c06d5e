"""The workspace's GPU locations: ``cuda`` (one process, all its GPUs) and ``cuda-ipc``
(several processes), over ``custom_calls.cuda_driver``.

Buffers are ``cuMemAlloc``ed in each rank's device's primary context (the one
XLA uses), so the addresses are valid in XLA's kernels; with unified virtual
addressing a peer's address is valid on every device once peer access is on.
Unverified on a GPU so far: ``tests/test_gpu_fused.py`` exercises both.
"""

from __future__ import annotations

from custom_calls import cuda_driver
from jax_flux.workspace import _RECORD_BYTES, Buffer, Record


def ordinal_of(device) -> int:
    """The CUDA ordinal of a jax device in this process (or an int ordinal)."""
    return device if isinstance(device, int) else int(device.local_hardware_id)


class Cuda:
    """One process drives every GPU of a group: per-device memory plus peer access."""

    maps_per_device = False  # nothing is opened: every buffer is this process's own

    def allocate(self, device, nbytes: int) -> Buffer:
        ordinal = ordinal_of(device)
        return Buffer(ptr=cuda_driver.allocate(ordinal, nbytes), nbytes=nbytes, owned=True,
                      keep=ordinal)

    def connect(self, devices) -> None:
        cuda_driver.enable_peer_access(ordinal_of(d) for d in devices)

    def zero(self, b: Buffer) -> None:
        cuda_driver.fill(b.keep, b.ptr, b.nbytes, 0)

    def record(self, device) -> Record:
        """Pinned host memory the rank's device writes and the host polls."""
        ordinal = ordinal_of(device)
        host, dev = cuda_driver.host_mapped(ordinal, _RECORD_BYTES)
        return Record(host_ptr=host, device_ptr=dev, keep=ordinal)


class CudaIpc(Cuda):
    """Several processes: the owner allocates, peers open its CUDA IPC handle."""

    # An IPC mapping belongs to the context it is opened in: open it once per
    # GPU of this process that uses it (CUDA allows one context per device).
    maps_per_device = True

    def export(self, b: Buffer) -> bytes:
        return cuda_driver.export_handle(b.keep, b.ptr)

    def open(self, handle: bytes, device, nbytes: int) -> Buffer:
        """Maps a peer's buffer for ``device``'s kernels."""
        ordinal = ordinal_of(device)
        return Buffer(ptr=cuda_driver.open_handle(ordinal, handle), nbytes=nbytes, owned=False,
                      keep=ordinal)
