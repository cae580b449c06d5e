"""The symmetric workspace: per-rank memory whose address every rank of a mesh axis knows.

The fused kernels exchange data and signals through it instead of through
XLA's buffers (XLA may free or reuse those). One workspace serves every fused
call over one mesh axis: it is allocated when the first such call is traced,
reused by later calls, and grows when a larger call is traced. A grown-out
workspace is retired, never freed, because programs compiled earlier hold
its addresses; ``info()`` lists live and retired ones, so a user hitting OOM
can see what they hold.

Ranks along the axis form a group; a mesh with other (manual) axes has one
group per combination of their indices, each with its own buffers. Each
rank's buffer starts with its control words and signals (see
``custom_calls.signals``), zero when allocated: epochs start at 0.

Where the memory lives:

* CPU emulation (Triton's interpreter): host memory, one buffer per emulated
  device, shared by all of them in this process.
* CUDA: not built yet (issue 3 names it: per-device allocations with peer
  access, and CUDA IPC handles through jax.distributed for one process per
  GPU); requesting it raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Hashable

import numpy as np

_ALIGN = 256
_MIN_BYTES = 1 << 16


@dataclasses.dataclass
class Workspace:
    """One axis's symmetric memory: ``buffers[group][rank]``, ``nbytes`` each."""

    key: tuple
    world: int
    groups: int
    nbytes: int
    location: str
    buffers: list[list[np.ndarray]]

    def table(self) -> np.ndarray:
        """uint32 [groups, world, 2]: (lo, hi) of every rank's base address."""
        addr = np.array([[b.ctypes.data for b in group] for group in self.buffers], np.uint64)
        return np.stack([addr & 0xFFFFFFFF, addr >> 32], axis=-1).astype(np.uint32)

    def reset(self) -> None:
        """Zeroes every buffer (epochs, signals, data). Only while no kernel runs."""
        for group in self.buffers:
            for b in group:
                b.fill(0)

    def describe(self) -> dict:
        return {"key": self.key, "world": self.world, "groups": self.groups,
                "bytes_per_rank": self.nbytes,
                "total_bytes": self.nbytes * self.world * self.groups,
                "location": self.location}


_lock = threading.Lock()
_live: dict[tuple, Workspace] = {}
_retired: list[Workspace] = []


def _host_buffer(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + nbytes]  # a view keeps `raw` alive


def get(key: tuple, world: int, groups: int, nbytes: int, platform: str) -> Workspace:
    """The workspace for ``key``, with at least ``nbytes`` per rank."""
    if platform != "cpu":
        raise NotImplementedError(
            f"jax_flux's symmetric workspace on {platform} is not built yet (issue 3: per-device "
            f"CUDA allocations with peer access, CUDA IPC for one process per GPU); "
            f"impl='fused' runs on CPU devices through Triton's interpreter only, for now")
    with _lock:
        ws = _live.get(key)
        if ws is not None and ws.nbytes >= nbytes and (ws.world, ws.groups) == (world, groups):
            return ws
        size = max(nbytes, _MIN_BYTES, 2 * ws.nbytes if ws is not None else 0)
        size = -(-size // _ALIGN) * _ALIGN
        if ws is not None:
            _retired.append(ws)
        ws = Workspace(key=key, world=world, groups=groups, nbytes=size, location="host",
                       buffers=[[_host_buffer(size) for _ in range(world)] for _ in range(groups)])
        _live[key] = ws
        return ws


def info() -> list[dict]:
    """Every workspace allocated in this process: key, sizes, location, retired or not."""
    with _lock:
        return ([dict(ws.describe(), retired=False) for ws in _live.values()] +
                [dict(ws.describe(), retired=True) for ws in _retired])


def reset() -> None:
    """Zeroes every workspace, e.g. after a peer timeout left them out of step.

    Call it only while no fused kernel is running.
    """
    with _lock:
        for ws in list(_live.values()) + _retired:
            ws.reset()


def axis_key(mesh_axes: tuple[tuple[Hashable, int], ...], axis_name: Hashable) -> tuple:
    return ("axis", axis_name, mesh_axes)
