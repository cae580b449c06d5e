"""Signal, wait and peer-address helpers shared by the fused kernels.

The symmetric workspace of one rank is one allocation laid out as

    [control: CONTROL_BYTES][signals: int32, up to DATA_OFF][data from DATA_OFF ...]

the same split for every call (see ``DATA_OFF``), so data never lands in signal words.

control holds int32 words of this rank:

* ``EPOCH``: how many fused calls this rank has completed on this workspace
  (an epoch is never reset; call c writes signal value c, so stale signals of
  earlier calls are always smaller);
* ``EXIT``: programs of the running launch that have finished; the last one
  resets it and publishes ``EPOCH = c``, which is also the start barrier a
  peer waits for before overwriting this rank's buffers;
* ``FAILED``, ``FAILED_PEER``: the code of this rank's first failed wait and
  the peer it waited for (0 until then, and again after a reset);
* ``TICKET``: tickets handed out in the running launch (``take_ticket``), 0
  between launches (the last program out resets it).

Peers' base addresses come in a table of uint32 (lo, hi) pairs (an int64 JAX
array would be truncated with x64 off): entries [0, WORLD) are the ranks'
workspaces, entry WORLD + r is rank r's error record (below; only a rank's own
entry is read, so entries of ranks in other processes may be 0).

A rank's error record is RECORD_WORDS int32 words of host-visible memory,
[code, rank, peer, index, epoch, seen, 0, 0]: the first wait on that rank
that ever fails fills it (and the FAILED control words), and it stays set
until the workspace is reset. A host thread can read it without touching the
device (``jax_flux.errors``); every later call on the rank sees FAILED and
fails fast (code EARLIER_FAILURE) instead of waiting out its timeout again.

Synchronisation uses ``tl.atomic_*`` with explicit ``sem``/``scope`` (plain
stores for the single-writer error record), no inline PTX of ours, so one
source runs compiled on GPUs (Triton 3.6 to 3.9) and in Triton's interpreter.
Waits are timed by the GPU's global timer, which the interpreter shim
(``_interpreter_shim``) maps to the host's clock: ``patience`` is milliseconds
in both.
"""

import triton
import triton.language as tl
# Called as ``cuda.globaltimer()``: the module attribute is what the
# interpreter shim replaces (a name imported from it would keep the PTX).
from triton.language.extra import cuda

CONTROL_BYTES = 128
# Every call on a workspace uses the same split: its signals in
# [CONTROL_BYTES, DATA_OFF), its data from DATA_OFF. An offset computed per call
# would let one call's data (any bytes) land in the signal words of a later call
# with another layout, where a garbage value >= the epoch lets a wait pass before
# its data arrives (seen: an AG-GEMM followed by a GEMM-RS on one axis).
DATA_OFF = 1 << 20
MAX_SIGNALS = (DATA_OFF - CONTROL_BYTES) // 4


def layout(op: str, n_signals: int) -> tuple[int, int]:
    """(signal offset, data offset) of a call that uses ``n_signals`` signal words."""
    if n_signals > MAX_SIGNALS:
        raise ValueError(f"{op}(impl='fused') needs {n_signals} signals, more than the "
                         f"workspace's {MAX_SIGNALS}: use larger tiles (block_m/block_n) or "
                         f"communication chunks (chunk_rows)")
    return CONTROL_BYTES, DATA_OFF
# Globals a kernel reads must be tl.constexpr; the host reads them with .value.
EPOCH = tl.constexpr(0)
EXIT = tl.constexpr(1)
FAILED = tl.constexpr(2)
FAILED_PEER = tl.constexpr(3)
TICKET = tl.constexpr(4)

# Codes a failed wait leaves in the status output, [code, rank, peer, index,
# epoch, seen], and in the error record; ``seen`` is the value the wait last
# read (below ``epoch``: timed out; above: the ranks are out of step). Each
# code names its op.
AG_PEER_IDLE = tl.constexpr(1)  # AG-GEMM start barrier: the peer's previous call never finished
WAIT_ROWS = tl.constexpr(2)  # AG-GEMM: a chunk of a peer's rows never arrived
WAIT_PARTIAL = tl.constexpr(3)  # GEMM-RS: a peer's partial tile never arrived
RS_PEER_IDLE = tl.constexpr(4)  # GEMM-RS start barrier
# Status only: this rank's FAILED word was already set (by an earlier call)
# when the call began; [5, rank, FAILED_PEER, FAILED, epoch, 0].
EARLIER_FAILURE = tl.constexpr(5)
STATUS_WORDS = 6
RECORD_WORDS = 8


@triton.jit
def peer_base(table_ptr, peer):
    """Base address (int64) of rank ``peer``'s workspace, from the (lo, hi) table."""
    lo = tl.load(table_ptr + 2 * peer).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(table_ptr + 2 * peer + 1).to(tl.int64)
    return lo | (hi << 32)


@triton.jit
def as_ptr(address, offset_bytes, DTYPE: tl.constexpr):
    """``address + offset_bytes`` as a pointer to DTYPE."""
    return (address + offset_bytes).to(tl.pointer_type(DTYPE))


@triton.jit
def data_ptr(address, DATA_OFF: tl.constexpr, DTYPE: tl.constexpr):
    """The data region of a workspace as a pointer to DTYPE (256-byte aligned:
    workspace bases are, and DATA_OFF is a multiple of 256)."""
    tl.static_assert(DATA_OFF % 256 == 0, "DATA_OFF must keep the data region 256-byte aligned")
    return as_ptr(address, DATA_OFF, DTYPE)


@triton.jit
def rebase(arg_ptr, ptr):
    """``ptr`` rebuilt as ``arg_ptr`` + an offset Triton can see is 16 bytes.

    Triton's alignment analysis knows kernel arguments are 16-byte aligned but
    knows nothing of a pointer cast from an integer (a workspace address), so
    loads through it are neither vectorized nor pipelined (no cp.async). Both
    pointers are 16-byte aligned (XLA's buffers, as jax-triton assumes; the
    workspace's data regions), so the offset is a whole number of 16-byte
    units and this changes no address.
    """
    ITEM: tl.constexpr = arg_ptr.dtype.element_ty.primitive_bitwidth // 8
    diff = ptr.to(tl.int64, bitcast=True) - arg_ptr.to(tl.int64, bitcast=True)
    return arg_ptr + (diff // 16) * (16 // ITEM)


@triton.jit
def load_acquire(ptr):
    return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def store_release(ptr, value):
    # Every thread of the program must have issued its data stores first.
    tl.debug_barrier()
    tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def record_of(table_ptr, rank, WORLD: tl.constexpr):
    """This rank's error record, as an int32 pointer."""
    return as_ptr(peer_base(table_ptr, WORLD + rank), 0, tl.int32)


@triton.jit
def wait_epoch(ptr, target, patience, status_ptr, table_ptr, code, rank, peer, index,
               WORLD: tl.constexpr):
    """Spins until ``*ptr`` (acquire) reaches ``target``, for at most ``patience``
    milliseconds of the GPU's global timer (the host's clock in the interpreter).

    Returns whether it found exactly ``target``. A value above it cannot come
    from ranks in step (a peer writes epoch e + 1 into this rank's memory only
    after this rank finished call e, and finishes call e + 1 only after this
    rank wrote into it), so it fails at once: the ranks' calls are out of step.
    On failure the first failing wait of the launch records [code, rank, peer,
    index, target, seen] in the (zeroed) status output, and the first of this
    rank ever in its error record, and the program goes on, so the launch ends
    and the host can report it: never a hang. Once a wait of the launch has
    failed (or the launch began with FAILED set), later waits poll once.
    """
    value = load_acquire(ptr)
    status_clear = tl.atomic_add(status_ptr, 0, sem="relaxed") == 0
    # Only a wait that must spin reads the clock: in the interpreter every read
    # hands the host's cores to the other programs (_interpreter_shim), which a
    # wait already satisfied should not pay for.
    if (value < target) & status_clear:
        now = cuda.globaltimer()
        deadline = now + patience.to(tl.int64) * 1_000_000
        while (value < target) & (now < deadline):
            value = load_acquire(ptr)
            now = cuda.globaltimer()
    if value != target:
        if tl.atomic_cas(status_ptr, 0, code, sem="relaxed") == 0:
            tl.store(status_ptr + 1, rank)
            tl.store(status_ptr + 2, peer)
            tl.store(status_ptr + 3, index)
            tl.store(status_ptr + 4, target)
            tl.store(status_ptr + 5, value)
            # Winning the status means this rank had not failed when the launch
            # began (begin_call), so this is the only writer of its FAILED words
            # and error record: plain stores, no atomics on host memory. Fields
            # first, the code last (the host reads the code, then the fields,
            # and re-reads until two reads agree): the FAILED word's atomic
            # between them is a system-scope fence (MEMBAR.SYS), so the fields
            # reach the host before the code does.
            ctrl = as_ptr(peer_base(table_ptr, rank), 0, tl.int32)
            tl.store(ctrl + FAILED_PEER, peer)
            record_ptr = record_of(table_ptr, rank, WORLD)
            tl.store(record_ptr + 1, rank)
            tl.store(record_ptr + 2, peer)
            tl.store(record_ptr + 3, index)
            tl.store(record_ptr + 4, target)
            tl.store(record_ptr + 5, value)
            tl.debug_barrier()
            tl.atomic_xchg(ctrl + FAILED, code, sem="acq_rel", scope="sys")
            tl.store(record_ptr, code)
    tl.debug_barrier()
    return value == target


@triton.jit
def begin_call(table_ptr, rank, status_ptr):
    """(this rank's workspace base, this call's epoch).

    FAILED set (a control word next to EPOCH, in device memory: no extra trip
    to the host-side record) means an earlier call on this rank failed and
    the workspace is out of step until it is reset: the status says so and
    every wait of this launch polls once (fail fast).
    """
    base = peer_base(table_ptr, rank)
    ctrl = as_ptr(base, 0, tl.int32)
    epoch = load_acquire(ctrl + EPOCH) + 1
    earlier = tl.load(ctrl + FAILED, volatile=True)
    if earlier != 0:
        if tl.atomic_cas(status_ptr, 0, EARLIER_FAILURE, sem="relaxed") == 0:
            tl.store(status_ptr + 1, rank)
            tl.store(status_ptr + 2, tl.load(ctrl + FAILED_PEER, volatile=True))
            tl.store(status_ptr + 3, earlier)
            tl.store(status_ptr + 4, epoch)
            tl.store(status_ptr + 5, 0)
    tl.debug_barrier()
    return base, epoch


@triton.jit
def wait_peer_idle(table_ptr, rank, peer, epoch, patience, status_ptr, code,
                   WORLD: tl.constexpr):
    """Start barrier: ``peer`` has finished call ``epoch - 1``, so it no longer
    reads the buffers this call is about to write into. Returns whether it
    has; a caller that gets False must not write into ``peer`` (the peer then
    times out itself rather than compute on data it did not wait for)."""
    ctrl = as_ptr(peer_base(table_ptr, peer), EPOCH * 4, tl.int32)
    return wait_epoch(ctrl, epoch - 1, patience, status_ptr, table_ptr, code, rank, peer, 0,
                      WORLD)


@triton.jit
def peer_idle(seen, table_ptr, rank, peer, epoch, patience, status_ptr, code,
              WORLD: tl.constexpr):
    """``wait_peer_idle`` for a program that writes into ``peer`` again and again:
    (whether ``peer`` has finished call ``epoch - 1``, ``seen`` updated).

    ``seen`` (int32, 0 at the start of the call) has a bit for every peer this
    program has already found idle in this call. Such a peer stays idle for
    the rest of it: it cannot finish this call before it has everything this
    rank sends it, so its EPOCH stays at ``epoch - 1`` until then. Only a peer
    not seen yet is asked, so a program pays the round trip to a peer's memory
    (an atomic over NVLink) once a call, not once a tile or chunk. A peer that
    fails is asked again next time (polled once: the failure is recorded).
    Axes of more than 32 ranks ask every time (int32: one register beside the
    GEMM's accumulators, which already take nearly all of them).
    """
    if WORLD <= 32:
        bit = tl.full((), 1, tl.int32) << peer
        idle = (seen & bit) != 0
        if (seen & bit) == 0:
            idle = wait_peer_idle(table_ptr, rank, peer, epoch, patience, status_ptr, code, WORLD)
            seen = tl.where(idle, seen | bit, seen)
    else:
        idle = wait_peer_idle(table_ptr, rank, peer, epoch, patience, status_ptr, code, WORLD)
    return idle, seen


@triton.jit
def take_ticket(base):
    """The next ticket of this launch on this rank: 0, 1, 2, ... in the order its
    programs ask, whatever their ids.

    Work handed out by ticket goes to programs that are running. On a GPU a
    launch's programs need not all be resident at once (another stream's
    kernel, NCCL's say, may hold SMs while ours start), so work that peers
    wait for must not be tied to a program id that may not have started:
    the kernels give their communication roles (AG-GEMM) and, where GEMM
    programs wait, their tiles (GEMM-RS reducing in the epilogue) by ticket,
    in an order where every wait targets work of lower tickets on other ranks
    that waits on nothing. Then any number of resident programs finishes.
    Relaxed: a ticket orders no data (the signals do).
    """
    return tl.atomic_add(as_ptr(base, TICKET * 4, tl.int32), 1, sem="relaxed", scope="gpu")


@triton.jit
def end_call(base, epoch):
    """Exit protocol: the last program of the launch resets the tickets and
    publishes EPOCH = epoch.

    Every program has read EPOCH and taken its last ticket before it arrives
    here, so none of this launch reads the bumped epoch or the reset count.
    """
    tl.debug_barrier()
    exit_ptr = as_ptr(base, EXIT * 4, tl.int32)
    ticket = tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="sys")
    if ticket == tl.num_programs(0) - 1:
        tl.atomic_xchg(as_ptr(base, TICKET * 4, tl.int32), 0, sem="relaxed", scope="sys")
        tl.atomic_xchg(exit_ptr, 0, sem="relaxed", scope="sys")
        tl.atomic_xchg(as_ptr(base, EPOCH * 4, tl.int32), epoch, sem="release", scope="sys")
