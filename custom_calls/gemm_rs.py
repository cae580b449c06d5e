"""Fused GEMM-ReduceScatter (Flux): one persistent Triton launch per call.

Rank r holds x [M, k] and w [k, N], M = P * m, and computes
z = (sum over ranks of x @ w)[r * m : (r + 1) * m], [m, N]. Each rank's
workspace holds a reduce buffer of P slots [P, m, N] in z's dtype (slot s:
the partial from rank s) and one signal per (source, tile). With W_TRANS, w is
stored transposed, [N, k] (the backward pass's dz @ w^T reads w in place).
ROWS < M_OWN: a batch of M_OWN / ROWS problems folded into one launch (jax.vmap
with a shared w): x is [batch, P * ROWS, k] flattened, so element b's rows
of owner o are x[b * P * ROWS + o * ROWS + i]; z is [batch, ROWS, N] flattened.

GEMM programs compute output tiles in rank-rotated order: the rows owned
by rank r+1 first, then r+2, ..., and this rank's own rows last, so ranks do
not all write to the same peer at once. The row tiles of all owners, in that
order, go in groups of GROUP_M (``gemm.group_order``, as in the plain GEMM),
so the programs running at once share w's column tiles in L2 instead of each
wave reading all of w; a group may span owners (decode: one row tile an
owner, all owners in a group, w read about once). Each finished tile is
stored straight into its owner's reduce buffer, in slot r (no atomics:
deterministic), and its signal ``sig[r * tiles + t] = epoch`` is
release-stored after the program's next GEMM (or before it waits, or ends):
the release's fence waits for the tile's stores into the owner, which by
then have had a GEMM's time to land, instead of stalling the program on
that round trip after every tile. Before the first write into an owner they
wait until it has finished its previous call (start barrier, once a program:
an owner that fails it gets nothing). They never wait on anything of this
call.

With REDUCE_PROGRAMS > 0, the last REDUCE_PROGRAMS programs to start (by
ticket, ``signals.take_ticket``; the others compute) reduce this rank's tiles
in about the order they are completed (grouped by GROUP_M row tiles):
acquire-wait for the tile's P signals (one per source and tile, indexed by
the tile's row-major id), sum the P partials in rank order 0..P-1 in float32,
store into z. Early tiles are reduced while the GEMM programs work on later
ones. With REDUCE_PROGRAMS == 0 every program computes, taking tiles one
ticket at a time in the tile order, and the program that takes an own tile
waits for the peers' partials of it and sums them into its accumulator.

The wait invariant: every wait of this call targets work that waits on
nothing of this call and is handed out, on its rank, at a lower ticket than
the waiting work (reducers' tickets follow the GEMM programs'; a peer's
partial of this rank's tile sits earlier in the peer's tile order than the
own tile here, or at the same place unrotated, and its signal is released
before the peer's program waits on anything). Tickets go to programs as
they run, so the kernel finishes whether its programs run concurrently (a
GPU, all or only some of them resident) or one after another (the
interpreter).
"""

import jax
import triton
import triton.language as tl

from custom_calls import signals
from custom_calls.binding import triton_call
from custom_calls.gemm import gemm_tile, group_order


@triton.jit
def _sum_partials(z_ptr, partials, my_signals, own, status_ptr, table_ptr, rank, epoch, patience,
                  M_OWN, N, per_owner, tile, rows, cols, WORLD: tl.constexpr,
                  HAS_OWN: tl.constexpr, REMOTE_CACHE: tl.constexpr):
    """z[rows, cols] = the P partials of this rank's tile ``tile`` summed in
    float32 in a fixed order (bitwise repeatable), each acquire-waited for.

    Without HAS_OWN: every partial from its slot, in rank order 0..P-1. With
    HAS_OWN: this rank's own partial is ``own`` (float32, in registers), first,
    then the peers' in rank order (the sum starts in own's registers: two
    float32 tiles live at once would spill). A sum missing a partial is NaN,
    not a plausible wrong value.
    """
    mask = (rows[:, None] < M_OWN) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    if HAS_OWN:
        acc = own
    else:
        acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    arrived = tile == tile
    for src in range(0, WORLD):
        peer_slot = True
        if HAS_OWN:
            peer_slot = src != rank
        if peer_slot:
            arrived &= signals.wait_epoch(my_signals + src * per_owner + tile, epoch, patience,
                                          status_ptr, table_ptr, signals.WAIT_PARTIAL, rank, src,
                                          tile, WORLD)
            part = tl.load(partials + tl.cast(src, tl.int64) * M_OWN * N + offs, mask=mask,
                           other=0.0, cache_modifier=REMOTE_CACHE)
            acc += part.to(tl.float32)
    acc = tl.where(arrived, acc, float("nan"))
    tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tile(x_ptr, w_ptr, z_ptr, table_ptr, status_ptr, base, rank, epoch, patience, M_OWN,
               N, K, t, WORLD: tl.constexpr, SIG_OFF: tl.constexpr,
               DATA_OFF: tl.constexpr, REDUCE_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               REMOTE_CACHE: tl.constexpr, ROTATE: tl.constexpr, W_TRANS: tl.constexpr,
               ROWS: tl.constexpr, seen, pending):
    """Output tile ``t`` of the tile order: computed, then stored into its owner's
    slot, or (REDUCE_PROGRAMS == 0, an own tile) summed here with the peers'
    partials of it. Returns (seen, pending) for the next tile.

    ``seen``: the owners this program has found idle in this call
    (``signals.peer_idle``). A stored tile's signal is released one tile later
    (``pending``: its owner * per_owner + tile, -1 for none): after this
    program's next GEMM, when the tile's stores into the owner have had that
    long to land, so the release's system fence (which waits for them) does
    not stall the program on a round trip to the owner after every tile. A
    pending signal is released before anything that waits on this call (an
    own tile's sum) and when the program runs out of tiles (``_flush``).
    """
    dtype = z_ptr.dtype.element_ty  # partials travel in the result's dtype
    tiles_m = tl.cdiv(M_OWN, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_owner = tiles_m * tiles_n
    # Row tile `row_tile` of all owners' rows in send order.
    row_tile, tile_n = group_order(t, WORLD * tiles_m, tiles_n, GROUP_M)
    step = row_tile // tiles_m
    tile_m = row_tile % tiles_m
    if ROTATE:
        owner = (rank + 1 + step) % WORLD  # rank + 1 first, own rows last
    else:
        owner = step + rank * 0  # rank order (as a tensor, like the rotated one)
    tile = tile_m * tiles_n + tile_n  # the signal's index: row-major, whatever the order
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROWS == M_OWN:  # the owner's rows are contiguous in x
        acc = gemm_tile(x_ptr + owner.to(tl.int64) * M_OWN * K, w_ptr, rows, rows, cols,
                        M_OWN, N, K, BLOCK_K, UPCAST, INPUT_PRECISION, "", W_TRANS)
    else:  # a folded batch: element b's rows of this owner at b * WORLD * ROWS + owner * ROWS
        a_rows = (rows // ROWS) * (WORLD * ROWS) + owner * ROWS + rows % ROWS
        acc = gemm_tile(x_ptr, w_ptr, rows, a_rows, cols, M_OWN, N, K, BLOCK_K, UPCAST,
                        INPUT_PRECISION, "", W_TRANS)
    _flush(pending, table_ptr, rank, epoch, per_owner, SIG_OFF)
    pending = rank * 0 - 1
    reduce_here = False
    if REDUCE_PROGRAMS == 0:
        reduce_here = owner == rank
    if reduce_here:
        # This rank's own tile: sum it with the peers' partials right here.
        partials = signals.rebase(z_ptr, signals.data_ptr(base, DATA_OFF, dtype))
        _sum_partials(z_ptr, partials, signals.as_ptr(base, SIG_OFF, tl.int32), acc,
                      status_ptr, table_ptr, rank, epoch, patience, M_OWN, N, per_owner,
                      tile, rows, cols, WORLD, True, REMOTE_CACHE)
    else:
        idle, seen = signals.peer_idle(seen, table_ptr, rank, owner, epoch, patience,
                                       status_ptr, signals.RS_PEER_IDLE, WORLD)
        if idle:
            owner_ws = signals.peer_base(table_ptr, owner)
            slot = (signals.rebase(z_ptr, signals.data_ptr(owner_ws, DATA_OFF, dtype)) +
                    rank.to(tl.int64) * M_OWN * N)
            tl.store(slot + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(dtype),
                     mask=(rows[:, None] < M_OWN) & (cols[None, :] < N))
            pending = owner * per_owner + tile
    return seen, pending


@triton.jit
def _flush(pending, table_ptr, rank, epoch, per_owner, SIG_OFF: tl.constexpr):
    """Releases the signal of the tile stored last (``pending``: its owner *
    per_owner + tile), if there is one (not -1): ``sig[rank * per_owner + tile]``
    in the owner's workspace."""
    if pending >= 0:
        owner = pending // per_owner
        sig = (signals.as_ptr(signals.peer_base(table_ptr, owner), SIG_OFF, tl.int32) +
               rank * per_owner + pending % per_owner)
        signals.store_release(sig, epoch)


@triton.jit
def _reduce_tiles(z_ptr, status_ptr, table_ptr, base, rank, epoch, patience, M_OWN, N, reducer,
                  REDUCE_PROGRAMS: tl.constexpr, WORLD: tl.constexpr, SIG_OFF: tl.constexpr,
                  DATA_OFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr, REMOTE_CACHE: tl.constexpr):
    partials = signals.rebase(z_ptr, signals.data_ptr(base, DATA_OFF, z_ptr.dtype.element_ty))
    my_signals = signals.as_ptr(base, SIG_OFF, tl.int32)
    tiles_m = tl.cdiv(M_OWN, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_owner = tiles_m * tiles_n
    for i in range(reducer, per_owner, REDUCE_PROGRAMS):
        tile_m, tile_n = group_order(i, tiles_m, tiles_n, GROUP_M)
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _sum_partials(z_ptr, partials, my_signals, 0.0, status_ptr, table_ptr, rank, epoch,
                      patience, M_OWN, N, per_owner, tile_m * tiles_n + tile_n, rows, cols,
                      WORLD, False, REMOTE_CACHE)


@triton.jit
def gemm_rs_kernel(x_ptr, w_ptr, ctx_ptr, table_ptr, z_ptr, status_ptr,
                   M_OWN: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   WORLD: tl.constexpr, SIG_OFF: tl.constexpr, DATA_OFF: tl.constexpr,
                   REDUCE_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, REMOTE_CACHE: tl.constexpr,
                   ROTATE: tl.constexpr, W_TRANS: tl.constexpr, ROWS: tl.constexpr):
    rank = tl.load(ctx_ptr)
    patience = tl.load(ctx_ptr + 1)
    base, epoch = signals.begin_call(table_ptr, rank, status_ptr)
    per_owner = tl.cdiv(M_OWN, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    tiles = WORLD * per_owner
    # Carried from tile to tile (_gemm_tile): owners found idle, and the signal
    # of the tile stored last, not released yet (-1: none).
    seen, pending = tl.full((), 0, tl.int32), rank * 0 - 1
    if REDUCE_PROGRAMS == 0:
        # Tiles by ticket, in the tile order, to whichever program is running:
        # an own tile (waiting) at position i needs the peers' tiles at positions
        # <= i, which wait on nothing (signals.take_ticket).
        t = signals.take_ticket(base)
        while t < tiles:
            seen, pending = _gemm_tile(
                x_ptr, w_ptr, z_ptr, table_ptr, status_ptr, base, rank, epoch, patience, M_OWN,
                N, K, t, WORLD, SIG_OFF, DATA_OFF, REDUCE_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K,
                GROUP_M, UPCAST, INPUT_PRECISION, REMOTE_CACHE, ROTATE, W_TRANS, ROWS, seen,
                pending)
            t = signals.take_ticket(base)
        _flush(pending, table_ptr, rank, epoch, per_owner, SIG_OFF)
    else:
        # Roles by ticket: the first programs to run compute (and wait on
        # nothing of this call), the last REDUCE_PROGRAMS reduce.
        role = signals.take_ticket(base)
        gemm_programs = tl.num_programs(0) - REDUCE_PROGRAMS
        if role < gemm_programs:
            for t in range(role, tiles, gemm_programs):
                seen, pending = _gemm_tile(
                    x_ptr, w_ptr, z_ptr, table_ptr, status_ptr, base, rank, epoch, patience,
                    M_OWN, N, K, t, WORLD, SIG_OFF, DATA_OFF, REDUCE_PROGRAMS, BLOCK_M, BLOCK_N,
                    BLOCK_K, GROUP_M, UPCAST, INPUT_PRECISION, REMOTE_CACHE, ROTATE, W_TRANS,
                    ROWS, seen, pending)
            _flush(pending, table_ptr, rank, epoch, per_owner, SIG_OFF)
        else:
            _reduce_tiles(z_ptr, status_ptr, table_ptr, base, rank, epoch, patience, M_OWN, N,
                          role - gemm_programs, REDUCE_PROGRAMS, WORLD, SIG_OFF, DATA_OFF,
                          BLOCK_M, BLOCK_N, GROUP_M, REMOTE_CACHE)
    signals.end_call(base, epoch)


def pointer_types(t: str, out: str | None = None, w: str | None = None) -> dict:
    """Triton types of ``gemm_rs_kernel``'s pointer parameters: operands of element
    type ``t`` (w's: ``w``, default ``t``), the result (and the partials) of ``out``
    (default ``t``)."""
    return {"x_ptr": f"*{t}", "w_ptr": f"*{w or t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
            "z_ptr": f"*{out or t}", "status_ptr": "*i32"}


def workspace_bytes(world: int, m_own: int, n: int, itemsize: int, block_m: int, block_n: int):
    """(signal offset, data offset, total bytes) of one rank's workspace for this call."""
    tiles = -(-m_own // block_m) * -(-n // block_n)
    sig_off, data_off = signals.layout("matmul_reduce_scatter", world * tiles)
    return sig_off, data_off, data_off + world * m_own * n * itemsize


def gemm_rs(x, w, ctx, table, *, world: int, sig_off: int, data_off: int, gemm_programs: int,
            reduce_programs: int, block_m: int, block_n: int, block_k: int, group_m: int,
            num_warps: int, num_stages: int, upcast: bool, input_precision: str,
            remote_cache: str, rotate: bool, on_timeout, status_check: str = "sync",
            out_dtype=None, w_transposed: bool = False, rows: int | None = None):
    """Launches ``gemm_rs_kernel``; returns (z [M/P, N] in ``out_dtype`` (default
    x's; the partials travel in it too), status [5] int32). With
    ``w_transposed``, w is given as w^T [N, k] and read in place. ``rows``:
    rows a rank owns per element of a folded batch (default: all, no batch)."""
    m_total, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    m_own = m_total // world
    out_shape = [jax.ShapeDtypeStruct((m_own, n), out_dtype or x.dtype),
                 jax.ShapeDtypeStruct((signals.STATUS_WORDS,), "int32")]
    return triton_call(
        x, w, ctx, table, kernel=gemm_rs_kernel, out_shape=out_shape,
        grid=(gemm_programs + reduce_programs,), num_warps=num_warps, num_stages=num_stages,
        status_output=1, on_status=on_timeout, status_check=status_check, resident=True,
        M_OWN=m_own, N=n, K=k, WORLD=world, SIG_OFF=sig_off, DATA_OFF=data_off,
        REDUCE_PROGRAMS=reduce_programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, UPCAST=upcast,
        INPUT_PRECISION=input_precision, REMOTE_CACHE=remote_cache, ROTATE=rotate,
        W_TRANS=w_transposed, ROWS=rows or m_own)
