"""The workspace's GPU locations: ``cuda`` (one process, all its GPUs) and ``cuda-ipc``
(several processes), over ``custom_calls.cuda_driver``.

Buffers are ``cuMemAlloc``ed in each rank's device's primary context (the one
XLA uses), so the addresses are valid in XLA's kernels; with unified virtual
addressing a peer's address is valid on every device once peer access is on.
Unverified on a GPU so far: ``tests/test_gpu_fused.py`` exercises both.
"""

from __future__ import annotations

import jax

from custom_calls import cuda_driver
from jax_flux.workspace import _RECORD_BYTES, Buffer, Record

_links_checked: set = set()


def ordinal_of(device) -> int:
    """The CUDA ordinal of a jax device in this process (or an int ordinal)."""
    return device if isinstance(device, int) else int(device.local_hardware_id)


def check_links(op: str, axis_name, key: tuple, slots) -> None:
    """Raises ValueError, before anything is allocated, where two GPUs of a group
    that this process drives (``slots[group][rank]``: devices) are not linked
    with native atomics, as NVLink links them and PCIe P2P does not.

    The kernels' waits on a peer (the start barrier; AG-GEMM pull's staged
    chunks) are system-scope atomics on the peer's memory (an acquire load is
    ``atomic_add(ptr, 0)``: Triton 3.6 has no atomic load). Over a link
    without native atomics CUDA carries an atomic out as a read, then a
    write: a peer's newer epoch written in between is overwritten with the
    older one, and the ranks' later calls then pass waits on stale signals
    and read stale data, silently. Once per workspace ``key``. Ranks in other
    processes are not visible to this one's driver and are not checked.
    """
    if key in _links_checked:
        return
    me = jax.process_index()
    no_access, no_atomics = [], []
    for group in slots:
        lacking = cuda_driver.weak_links(ordinal_of(d) for d in group if d.process_index == me)
        no_access += lacking[0]
        no_atomics += lacking[1]
    if no_access or no_atomics:
        found = "; ".join(
            f"{what} {pairs} (from, to)" for what, pairs in
            (("no peer access between GPUs", no_access),
             ("peer access without native atomics (PCIe, not NVLink) between GPUs",
              no_atomics)) if pairs)
        raise ValueError(
            f"{op}(impl='fused') over axis {axis_name!r} needs every pair of a group's GPUs "
            f"linked with native atomics (NVLink), but found {found}. Its waits on a peer "
            f"are atomics on the peer's memory, which CUDA carries out over a link without "
            f"native atomics as a read, then a write: a peer's newer epoch can be "
            f"overwritten with an older one, and later calls would then read stale data "
            f"without noticing. Use impl='xla' or 'ring' on this axis (`python -m "
            f"jax_flux.doctor` lists the links)")
    _links_checked.add(key)


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
