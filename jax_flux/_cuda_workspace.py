"""The workspace's GPU locations: ``cuda`` (one process, all its GPUs) and ``cuda-ipc``
(several processes), over ``custom_calls.cuda_driver``.

Buffers are ``cuMemAlloc``ed in each rank's device's primary context (the one
XLA uses), so the addresses are valid in XLA's kernels; with unified virtual
addressing a peer's address is valid on every device once peer access is on.
Unverified on a GPU so far: ``tests/test_gpu_fused.py`` exercises both.
"""

from __future__ import annotations

import itertools
import warnings

import jax

from custom_calls import cuda_driver, nvml
from jax_flux.workspace import _RECORD_BYTES, Buffer, Record

_links_checked: set = set()


def ordinal_of(device) -> int:
    """The CUDA ordinal of a jax device in this process (or an int ordinal)."""
    return device if isinstance(device, int) else int(device.local_hardware_id)


def check_links(op: str, axis_name, key: tuple, slots) -> None:
    """Raises ValueError, before anything is allocated, where two GPUs of a group
    (``slots[group][rank]``: devices) are not linked with native atomics, as
    NVLink links them and PCIe P2P does not.

    The kernels' waits on a peer (the start barrier; AG-GEMM pull's staged
    chunks) are system-scope atomics on the peer's memory (an acquire load is
    ``atomic_add(ptr, 0)``: Triton 3.6 has no atomic load). Over a link
    without native atomics CUDA carries an atomic out as a read, then a
    write: a peer's newer epoch written in between is overwritten with the
    older one, and the ranks' later calls then pass waits on stale signals
    and read stale data, silently. Once per workspace ``key``.

    One process: its driver answers for every pair. Several (``cuda-ipc``,
    on one machine: ``_exchange.check_one_machine`` comes first): each
    process publishes its GPUs' PCI bus ids, asks about the links from its
    own GPUs (its driver where it sees the peer, NVML where it does not: one
    process per GPU often sees only its own) and publishes what it found;
    every process raises the same error. A link nobody could ask about (no
    NVML, the peer hidden) is named in a warning, not refused.
    """
    if key in _links_checked:
        return
    if {d.process_index for group in slots for d in group} == {jax.process_index()}:
        found = {"no_access": [], "no_atomics": [], "unverified": []}
        for group in slots:
            lacking = cuda_driver.weak_links(ordinal_of(d) for d in group)
            found["no_access"] += lacking[0]
            found["no_atomics"] += lacking[1]
    else:
        found = _links_across_processes(key, slots)
    if found["no_access"] or found["no_atomics"]:
        problems = "; ".join(
            f"{what} {pairs} (from, to)" for what, pairs in
            (("no peer access between GPUs", found["no_access"]),
             ("peer access without native atomics (PCIe, not NVLink) between GPUs",
              found["no_atomics"])) if pairs)
        raise ValueError(
            f"{op}(impl='fused') over axis {axis_name!r} needs every pair of a group's GPUs "
            f"linked with native atomics (NVLink), but found {problems}. Its waits on a peer "
            f"are atomics on the peer's memory, which CUDA carries out over a link without "
            f"native atomics as a read, then a write: a peer's newer epoch can be "
            f"overwritten with an older one, and later calls would then read stale data "
            f"without noticing. Use impl='xla' or 'ring' on this axis (`python -m "
            f"jax_flux.doctor` lists the links)")
    if found["unverified"]:
        pairs = [(a, b) for a, b, _ in found["unverified"]]
        why = "; ".join(sorted({reason for _, _, reason in found["unverified"]}))
        warnings.warn(
            f"{op}(impl='fused') over axis {axis_name!r}: could not check that the links "
            f"{pairs} (from, to) have native atomics (NVLink), which the kernels need "
            f"({why}). Over PCIe P2P the fused ops could read stale data without "
            f"noticing; make NVML (libnvidia-ml.so.1) loadable, or every GPU visible to "
            f"every process, to have them checked", stacklevel=2)
    _links_checked.add(key)


def _links_across_processes(key: tuple, slots) -> dict[str, list]:
    """``check_links``'s findings over several processes, the same in each:
    {"no_access" | "no_atomics" | "unverified": [(from, to), ...]}, GPUs named
    "bus id (process p)"; an unverified pair carries why."""
    from jax_flux import _exchange

    me = jax.process_index()
    mine = {str(d.id): cuda_driver.bus_id(ordinal_of(d))
            for group in slots for d in group if d.process_index == me}
    bus = {int(i): b for ids in _exchange.share("gpu-bus-ids", key, slots, mine,
                                                "its GPUs' PCI bus ids").values()
           for i, b in ids.items()}
    found: dict[str, list] = {"no_access": [], "no_atomics": [], "unverified": []}
    for group in slots:
        for a, b in itertools.permutations(group, 2):
            if a.process_index != me:
                continue  # asked by a's process
            pair = [f"{bus[a.id]} (process {a.process_index})",
                    f"{bus[b.id]} (process {b.process_index})"]
            peer = ordinal_of(b) if b.process_index == me else cuda_driver.ordinal_of_bus(
                bus[b.id])
            try:
                link = (cuda_driver.p2p_attributes(ordinal_of(a), peer) if peer is not None
                        else nvml.link(bus[a.id], bus[b.id]))
            except nvml.NvmlError as e:
                found["unverified"].append([*pair, f"the peer is hidden from this process's "
                                                   f"CUDA, and {e}"])
                continue
            if not link["access"]:
                found["no_access"].append(pair)
            elif not link["native_atomics"]:
                found["no_atomics"].append(pair)
    everyone = _exchange.share("gpu-links", key, slots, found, "what it found of its links")
    return {kind: [tuple(pair) for p in sorted(everyone) for pair in everyone[p][kind]]
            for kind in found}


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
