"""The symmetric workspace: per-rank memory whose address every rank of a mesh axis knows.

The fused kernels exchange data and signals through it instead of through
XLA's buffers (XLA may free or reuse those). Its addresses are fixed when a
program is lowered, for the concrete devices of the enclosing ``shard_map``
(``TableRequest`` is the ``custom_calls.LoweredConstant`` resolver), so each
rank's buffer lives on that rank's device whatever the mesh's device order.

One workspace serves every fused call over one mesh axis of one mesh: it is
allocated when the first such call is lowered, reused by later calls, and
grows when a larger call is lowered. A grown-out workspace is retired, never
freed, because programs compiled earlier hold its addresses; ``info()`` lists
live and retired ones, so a user hitting OOM can see what they hold.

Ranks along the axis form a group; a mesh with other (manual) axes has one
group per combination of their indices, each with its own buffers. Each
rank's buffer starts with its control words and signals (see
``custom_calls.signals``), zero when allocated: epochs start at 0. Each rank
also has an error record in host memory its device can write (pinned and
mapped on GPUs): the kernels fill it when a wait times out, and
``jax_flux.errors`` reads it from the host without touching the device.

Where the memory lives (``location`` in ``info()``):

* ``host``: CPU devices (Triton's interpreter), one process: host memory.
* ``host-shared``: CPU devices, one process per device group
  (``jax.distributed``): POSIX shared memory, each segment created by the
  process that owns the rank, its name exchanged through jax.distributed's
  key-value store, mapped by every process with a rank in the same group.
* ``cuda``: GPUs, one process: ``cuMemAlloc`` on each rank's device and peer
  access between the devices of a group (``jax_flux._cuda_workspace``).
* ``cuda-ipc``: GPUs over several processes (``jax.distributed``):
  ``cuMemAlloc`` by the owner, CUDA IPC handles exchanged through the
  key-value store and opened once per GPU of this process in the group (an
  IPC mapping belongs to the context it is opened in, so each rank gets its
  own row of addresses); a process's own GPUs of a group reach each other by
  peer access.

The last two map memory by handles that open only on the machine that made
them, so every rank of a group must be on one machine (other mesh axes may
span machines): a group that is not is a ValueError when the program is
lowered, in every process. On GPUs the kernels' waits on a peer are atomics
on its memory, which only links with native atomics (NVLink) carry out as
atomics: GPUs of a group linked otherwise (PCIe P2P) are a ValueError when
the program is lowered too, GPUs of other processes asked about by PCI bus
id (``jax_flux._cuda_workspace.check_links``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import threading
from typing import Any, Hashable

import jax
import numpy as np

from custom_calls import signals
from jax_flux import _exchange
from jax_flux._axes import axis_names

_ALIGN = 256
_RECORD_BYTES = 64
_MIN_BYTES = 1 << 16


@dataclasses.dataclass
class Buffer:
    """One rank's memory as this process sees it: ``ptr`` valid in this process."""

    ptr: int
    nbytes: int
    owned: bool  # allocated by this process (it zeroes it on reset)
    keep: Any = None  # what keeps the memory mapped (numpy array, mmap, driver handle)


@dataclasses.dataclass
class Record:
    """One rank's error record (``custom_calls.signals``): kernels write it at
    ``device_ptr``, the host reads it at ``host_ptr`` (the same memory)."""

    host_ptr: int
    device_ptr: int
    keep: Any = None

    def words(self) -> np.ndarray:
        """The record's int32 words, a live view of the memory."""
        return np.ctypeslib.as_array(
            (ctypes.c_int32 * signals.RECORD_WORDS).from_address(self.host_ptr))


@dataclasses.dataclass
class Workspace:
    """One axis's symmetric memory: ``buffers[group][rank]`` (None: not mapped here),
    and the error records of the ranks this process drives (None for others).

    ``views[group][viewer][rank]``, where set, is rank ``rank``'s memory as the
    device of rank ``viewer`` addresses it, when that differs from
    ``buffers[group][rank]``: a CUDA IPC mapping is opened in one device's
    context, so a group with several of this process's GPUs maps each peer
    in another process once per GPU.
    """

    key: tuple
    world: int
    groups: int
    nbytes: int
    location: str
    buffers: list[list[Buffer | None]]
    records: list[list[Record | None]]
    views: dict[tuple[int, int], list[Buffer | None]] = dataclasses.field(default_factory=dict)

    def table(self) -> np.ndarray:
        """uint32 [groups * world, 2 * world, 2]: row ``group * world + viewer`` holds
        (lo, hi) of every rank's base address as rank ``viewer`` sees it, then of
        every rank's error record (0: not mapped in this process)."""
        rows = []
        for g, (group, recs) in enumerate(zip(self.buffers, self.records)):
            records = [r.device_ptr if r is not None else 0 for r in recs]
            for viewer in range(self.world):
                seen = self.views.get((g, viewer), group)
                rows.append([b.ptr if b is not None else 0 for b in seen] + records)
        addr = np.array(rows, np.uint64)
        return np.stack([addr & 0xFFFFFFFF, addr >> 32], axis=-1).astype(np.uint32)

    def reset(self) -> None:
        """Zeroes the buffers this process owns and its error records. Only while
        no kernel runs."""
        for b in itertools.chain.from_iterable(self.buffers):
            if b is not None and b.owned:
                _backend(self.location).zero(b)
        for r in itertools.chain.from_iterable(self.records):
            if r is not None:
                r.words()[:] = 0

    def describe(self) -> dict:
        mapped = sum(b is not None for b in itertools.chain.from_iterable(self.buffers))
        owned = sum(b is not None and b.owned for b in itertools.chain.from_iterable(self.buffers))
        return {"key": self.key, "world": self.world, "groups": self.groups,
                "bytes_per_rank": self.nbytes,
                "total_bytes": self.nbytes * self.world * self.groups,
                "owned_bytes": self.nbytes * owned, "mapped_ranks": mapped,
                "location": self.location}


@dataclasses.dataclass(frozen=True)
class TableRequest:
    """Resolves, when a program is lowered, the address table of one fused call.

    Called with the concrete mesh and platform; returns ``Workspace.table()``
    (one row per rank of every group: the addresses it uses), after allocating
    (or reusing) the workspace.
    """

    op: str
    axis_name: Hashable
    world: int
    groups: int
    nbytes: int

    def __call__(self, mesh, platform: str) -> np.ndarray:
        key, slots, location = self.placement(mesh, platform)
        return _get(key, slots, self.nbytes, location).table()

    def placement(self, mesh, platform: str) -> tuple[tuple, list[list[Any]], str]:
        """(the workspace's key, the device of every (group, rank), its location)
        for this mesh; raises ValueError where the fused calls cannot run on it
        (a group over several machines, GPUs not linked with native atomics, a
        platform other than CUDA and the CPU).
        Nothing is allocated. Every process lowering the program gets the same
        answer (the cross-process checks exchange what they find)."""
        if platform not in ("cpu", "cuda"):
            raise ValueError(
                f"{self.op}(impl='fused') runs on CUDA GPUs and on CPU devices (through "
                f"Triton's interpreter), not on {platform!r} devices: its kernels time their "
                f"waits with CUDA's global timer and its workspace is CUDA memory; use "
                f"impl='xla' or 'ring' there")
        slots = _slots(self, mesh, platform)
        location = _location(platform, slots)
        key = ("axis", self.axis_name, _mesh_signature(mesh), location)
        if location in _ACROSS_PROCESSES:
            _exchange.check_one_machine(self.op, self.axis_name, self.world, key, slots,
                                        location)
        if location in ("cuda", "cuda-ipc"):
            from jax_flux import _cuda_workspace

            _cuda_workspace.check_links(self.op, self.axis_name, key, slots)
        return key, slots, location


_lock = threading.Lock()
_live: dict[tuple, Workspace] = {}
_retired: list[Workspace] = []


def _mesh_signature(mesh) -> tuple:
    if mesh is None or getattr(mesh, "empty", False):
        return ()
    return (tuple(zip(mesh.axis_names, mesh.devices.shape)),
            tuple(int(d.id) for d in mesh.devices.flat))


def _slots(req: TableRequest, mesh, platform: str) -> list[list[Any]]:
    """The device of every (group, rank), in the group order of ``_fused._groups``."""
    tp = axis_names(req.axis_name)
    if mesh is None or getattr(mesh, "empty", False) or not set(tp) <= set(mesh.axis_names):
        if platform != "cpu" or jax.process_count() > 1:
            raise ValueError(
                f"{req.op}(impl='fused') could not see the devices of the shard_map it runs "
                f"in when the program was lowered; call it inside jax.shard_map over a "
                f"jax.sharding.Mesh with axis {req.axis_name!r}")
        return [[None] * req.world for _ in range(req.groups)]
    names = list(mesh.axis_names)
    # The axis (or axes, in the tuple's order: lax.axis_index numbers ranks so)
    # last; the other axes row-major, as _groups numbers the groups.
    devices = np.moveaxis(mesh.devices, [names.index(a) for a in tp], range(-len(tp), 0))
    slots = devices.reshape(-1, int(np.prod(devices.shape[len(names) - len(tp):])))
    if slots.shape != (req.groups, req.world):
        raise ValueError(f"{req.op}(impl='fused'): mesh {dict(zip(names, mesh.devices.shape))} "
                         f"does not give {req.groups} groups of {req.world} ranks on axis "
                         f"{req.axis_name!r}")
    return [list(row) for row in slots]


# Where ranks live in other processes: their memory is mapped through an
# exchanged handle (CUDA IPC, a POSIX shared-memory name), which only opens on
# the machine that made it.
_ACROSS_PROCESSES = ("host-shared", "cuda-ipc")


def _location(platform: str, slots) -> str:
    multi = jax.process_count() > 1 and any(
        d is not None and d.process_index != jax.process_index()
        for d in itertools.chain.from_iterable(slots))
    if platform == "cpu":
        return "host-shared" if multi else "host"
    return "cuda-ipc" if multi else "cuda"


def _get(key: tuple, slots, nbytes: int, location: str) -> Workspace:
    with _lock:
        ws = _live.get(key)
        if ws is not None and ws.nbytes >= nbytes:
            return ws
        size = max(nbytes, _MIN_BYTES, 2 * ws.nbytes if ws is not None else 0)
        size = -(-size // _ALIGN) * _ALIGN
        buffers, views = _allocate(key, slots, size, location)
        records = _records(slots, location)
        if ws is not None:
            _retired.append(ws)
        ws = Workspace(key=key, world=len(slots[0]), groups=len(slots), nbytes=size,
                       location=location, buffers=buffers, records=records, views=views)
        _live[key] = ws
        return ws


def _allocate(key: tuple, slots, size: int, location: str):
    """(buffers[group][rank], views) of a new workspace (see ``Workspace``)."""
    backend = _backend(location)
    if location in ("host", "cuda"):
        buffers = [[backend.allocate(d, size) for d in group] for group in slots]
        for group in slots:
            backend.connect(group)
        return buffers, {}
    # Several processes: allocate our ranks and publish their handles (all of
    # them before waiting on any peer's), then map the peers of every group
    # we have a rank in.
    me = jax.process_index()
    client = _exchange.kv_client()
    prefix = "jax_flux/workspace/" + hashlib.sha1(repr((key, size)).encode()).hexdigest()
    buffers: list[list[Buffer | None]] = [[None] * len(g) for g in slots]
    for g, group in enumerate(slots):
        for r, d in enumerate(group):
            if d.process_index == me:
                buffers[g][r] = backend.allocate(d, size)
                client.key_value_set_bytes(f"{prefix}/{g}/{r}", backend.export(buffers[g][r]))
    views: dict[tuple[int, int], list[Buffer | None]] = {}
    for g, group in enumerate(slots):
        local = [v for v, d in enumerate(group) if d.process_index == me]
        if not local:
            continue
        # This process's own devices of a group reach each other's buffers
        # directly (peer access), as in one process: the usual multi-host
        # layout, one process per host with the tensor-parallel axis inside it.
        if len(local) > 1:
            backend.connect([group[v] for v in local])
        # Per device where the backend's mappings are (CUDA IPC); else one, shared.
        viewers = local if backend.maps_per_device and len(local) > 1 else local[:1]
        seen = {v: list(buffers[g]) for v in viewers}
        for r, d in enumerate(group):
            if buffers[g][r] is not None:
                continue
            handle = _exchange.await_value(
                client, f"{prefix}/{g}/{r}", f"process {d.process_index} (owner of rank {r} of "
                f"group {g}, device {d})", "its buffer", raw=True)
            for v in viewers:
                seen[v][r] = backend.open(handle, group[v], size)
            buffers[g][r] = seen[viewers[0]][r]
        if len(viewers) > 1:
            views.update({(g, v): seen[v] for v in viewers})
    return buffers, views


def _records(slots, location: str) -> list[list[Record | None]]:
    """A zeroed error record for every rank this process drives."""
    backend, me = _backend(location), jax.process_index()
    return [[backend.record(d) if d is None or d.process_index == me else None for d in group]
            for group in slots]


# ------------------------------------------------------------------ backends


def _backend(location: str):
    if location in ("host", "host-shared"):
        from jax_flux import _host_workspace

        return _host_workspace.Host() if location == "host" else _host_workspace.SharedHost()
    from jax_flux import _cuda_workspace

    return _cuda_workspace.Cuda() if location == "cuda" else _cuda_workspace.CudaIpc()


# -------------------------------------------------------------- public view


def info() -> list[dict]:
    """Every workspace allocated in this process: key, sizes, location, retired or not."""
    with _lock:
        return ([dict(ws.describe(), retired=False) for ws in _live.values()] +
                [dict(ws.describe(), retired=True) for ws in _retired])


def records():
    """(workspace, error record) for every rank this process drives, live and retired."""
    with _lock:
        spaces = list(_live.values()) + list(_retired)
    for ws in spaces:
        for record in itertools.chain.from_iterable(ws.records):
            if record is not None:
                yield ws, record


def reset() -> None:
    """Zeroes every workspace this process owns and its error records, e.g. after a
    peer timeout left them out of step. Call it in every process, only while no
    fused kernel is running."""
    from jax_flux import errors

    with _lock:
        for ws in list(_live.values()) + _retired:
            ws.reset()
    errors.watchdog.forget()  # outside _lock: the watchdog takes its own lock, then this one
