"""What the processes of a program tell each other, through jax.distributed's
key-value store, when a fused program's workspace is set up across them: the
machine each is on, and (``jax_flux.workspace``) its buffers' handles.

Every wait for another process's value is bounded (``EXCHANGE_TIMEOUT_S``): a
process that never lowers the program is an error naming it, never a hang.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket

import jax

# How long lowering waits for another process's value.
EXCHANGE_TIMEOUT_S = float(os.environ.get("JAX_FLUX_WORKSPACE_EXCHANGE_TIMEOUT_S", "300"))

_machines_checked: set = set()


def kv_client():
    """jax.distributed's key-value store client (RuntimeError without it)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax_flux's workspace across processes needs jax.distributed."
                           "initialize() (its key-value store carries the buffer handles)")
    return client


def await_value(client, key: str, who: str, what: str, raw: bool = False):
    """The value another process publishes at ``key`` (bytes with ``raw``);
    RuntimeError after EXCHANGE_TIMEOUT_S naming ``who`` and ``what``."""
    get = client.blocking_key_value_get_bytes if raw else client.blocking_key_value_get
    try:
        return get(key, int(EXCHANGE_TIMEOUT_S * 1000))
    except Exception as e:
        raise RuntimeError(f"jax_flux workspace: {who} did not publish {what} within "
                           f"{EXCHANGE_TIMEOUT_S:g} s; every process must lower the same "
                           f"fused calls ({e})") from e


def share(topic: str, key: tuple, slots, value, what: str) -> dict:
    """Every process of a program's mesh publishes ``value`` (JSON) under
    ``topic`` for workspace ``key`` and reads everyone else's: {process index:
    value}, the same in every process. ``slots[group][rank]``: the devices,
    whose processes take part. RuntimeError naming a process that does not
    publish ``what`` within EXCHANGE_TIMEOUT_S."""
    client = kv_client()
    prefix = f"jax_flux/{topic}/" + hashlib.sha1(repr(key).encode()).hexdigest()
    me = jax.process_index()
    # Overwritable: lowering again after a check refused a program asks again,
    # and publishes the same value.
    client.key_value_set(f"{prefix}/{me}", json.dumps(value), allow_overwrite=True)
    seen = {me: json.loads(json.dumps(value))}  # as the others see it: lists, string keys
    for p in sorted({d.process_index for d in itertools.chain.from_iterable(slots)} - {me}):
        seen[p] = json.loads(await_value(client, f"{prefix}/{p}", f"process {p}", what))
    return seen


def machine() -> tuple[str, str]:
    """(what identifies this process's machine, its host name). The kernel's boot
    id is the same for every process and container of one machine and differs
    between machines even where host names repeat; the host name stands in
    where there is none."""
    host = socket.gethostname()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or host, host
    except OSError:
        return host, host


def check_one_machine(op: str, axis_name, world: int, key: tuple, slots,
                      location: str) -> None:
    """Raises ValueError, in every process lowering the program, where a group's
    ranks (``slots[group][rank]``: devices) are on more than one machine: CUDA
    IPC handles and shared-memory names open only where they were made (a
    tensor-parallel axis runs over NVLink, inside a machine; a data-parallel
    axis may span machines). Once per workspace ``key``: every process
    publishes its machine and reads those of every process in the mesh, so
    all of them see the same answer."""
    if key in _machines_checked:
        return
    seen = {p: tuple(m) for p, m in share("machine", key, slots, machine(), "its machine").items()}
    for g, group in enumerate(slots):
        machines: dict[tuple, list] = {}
        for r, d in enumerate(group):
            machines.setdefault(seen[d.process_index], []).append((r, d.process_index))
        if len(machines) > 1:
            where = "; ".join(
                f"ranks {[r for r, _ in ranks]} on host {m[1]!r} (process"
                f"{'es' if len({p for _, p in ranks}) > 1 else ''} "
                f"{sorted({p for _, p in ranks})})" for m, ranks in machines.items())
            raise ValueError(
                f"{op}(impl='fused') over axis {axis_name!r} needs all of a group's {world} "
                f"ranks on one machine (the workspace ({location}) is mapped between its "
                f"processes, which only works inside a machine), but group {g} spans "
                f"{len(machines)} machines: {where}. Keep the tensor-parallel axis inside a "
                f"machine (other mesh axes may span machines), or use impl='xla' or 'ring' "
                f"for it")
    _machines_checked.add(key)
