"""Fused AllGather-GEMM (Flux): one persistent Triton launch per call.

Rank r holds x [m, K] and w [K, n] and computes y = all_gather(x) @ w,
[P * m, n], reading peers' rows from its own gather buffer in the symmetric
workspace (``signals.py`` has the layout), into which the peers push them
(or from whose staged copies this rank pulls them, with PULL). With W_TRANS,
w is stored transposed, [n, K] (the backward pass's dy @ w^T reads w in place).
ROWS < M_LOCAL: a batch of M_LOCAL / ROWS problems folded into one launch
(jax.vmap with a shared w): x is [batch, ROWS, K] flattened, and y is
[batch, P * ROWS, n] flattened (element b's gathered rows at b * P * ROWS);
the gathered x keeps the gather's order, [P, batch * ROWS, K].

The first COMM_PROGRAMS programs to start (tickets [0, COMM_PROGRAMS) of
``signals.take_ticket``, whatever their ids) communicate: they push this
rank's shard to peers r+1, r+2, ... (so at step d every rank sends to
rank + d and receives from rank - d) in chunks of CHUNK_ROWS rows, each chunk followed by a release store
of its signal ``sig[r * chunks + j] = epoch`` in the peer's workspace. Before
the first write into a peer they wait until that peer has finished its
previous call (start barrier; a peer that fails it gets nothing, so it fails
itself rather than compute on stale rows). They never wait on anything of
this call. With PULL they read instead (``_pull_shards``): ticket 0 stages
this rank's shard in its own gather slot, signalling each chunk there, before
it waits on anything of this call; the communication programs then copy the
peers' staged chunks in, signalling their arrival in this rank's workspace.

The other programs are the GEMM: output tiles in rank-rotated order (own rows
first, read straight from x, then rows of rank r-1, r-2, ..., the order they
arrive in), each acquire-waiting only on the signals of the chunks its rows
lie in. The row tiles of all sources, in that order, go in groups of GROUP_M
(``gemm.group_order``, as in the plain GEMM), so the programs running at once
share w's column tiles in L2 instead of each wave reading all of w; a group
may span sources (decode: one row tile a source, all sources in a group, w
read about once). With
RETURN_GATHERED they also write the gathered x (the rows they read for tile
column 0), so the weight gradient needs no second all-gather.

Invariant that makes one source right both on a GPU (programs concurrent, all
or only some resident: another stream's kernel may hold SMs) and in the
interpreter (programs of a rank run one after another, ranks concurrently):
every wait of this call targets work that its program does before it waits
on anything of this call (pushes, PULL's staging at ticket 0) and, within a
rank, at a lower ticket than every program that waits for it. Tickets go to
programs in the order they start, so that work is always with a running
program.
(``custom_calls._program_threads`` runs the interpreter's programs concurrently
too, in shuffled order: tests/test_program_threads.py.)
"""

import jax
import triton
import triton.language as tl

from custom_calls import signals
from custom_calls.binding import triton_call
from custom_calls.gemm import gemm_tile, group_order


@triton.jit
def _copy_rows(src_ptr, dst_ptr, row0, row1, K,
               COPY_ROWS: tl.constexpr, COPY_COLS: tl.constexpr, SRC_CACHE: tl.constexpr):
    """dst[row, :K] = src[row, :K] for row0 <= row < row1 (row-major, K columns)."""
    offs_r = tl.arange(0, COPY_ROWS)
    offs_c = tl.arange(0, COPY_COLS)
    for r in range(row0, row1, COPY_ROWS):
        rows = r + offs_r
        row_ok = rows[:, None] < row1
        for c in range(0, K, COPY_COLS):
            cols = c + offs_c
            offs = rows[:, None].to(tl.int64) * K + cols[None, :]
            mask = row_ok & (cols[None, :] < K)
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask, cache_modifier=SRC_CACHE),
                     mask=mask)


@triton.jit
def _push_shard(x_ptr, table_ptr, status_ptr, rank, epoch, patience, M_LOCAL, K,
                chunks, comm,
                WORLD: tl.constexpr, SIG_OFF: tl.constexpr, DATA_OFF: tl.constexpr,
                CHUNK_ROWS: tl.constexpr, COMM_PROGRAMS: tl.constexpr,
                COPY_ROWS: tl.constexpr, COPY_COLS: tl.constexpr, ROTATE: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    seen = tl.full((), 0, tl.int32)  # peers found idle (signals.peer_idle)
    for item in range(comm, (WORLD - 1) * chunks, COMM_PROGRAMS):
        # Items in send order: all chunks for peer rank+1, then rank+2, ...
        # (ROTATE off: every rank sends to peer 0 first, then 1, ...).
        d = item // chunks
        if ROTATE:
            peer = (rank + d + 1) % WORLD
        else:
            peer = d + (d >= rank).to(tl.int32)
        chunk = item % chunks
        idle, seen = signals.peer_idle(seen, table_ptr, rank, peer, epoch, patience, status_ptr,
                                       signals.AG_PEER_IDLE, WORLD)
        if idle:
            peer_ws = signals.peer_base(table_ptr, peer)
            dst = (signals.rebase(x_ptr, signals.data_ptr(peer_ws, DATA_OFF, dtype)) +
                   rank.to(tl.int64) * M_LOCAL * K)
            row0 = chunk * CHUNK_ROWS
            _copy_rows(x_ptr, dst, row0, tl.minimum(row0 + CHUNK_ROWS, M_LOCAL), K,
                       COPY_ROWS, COPY_COLS, "")
            sig = signals.as_ptr(peer_ws, SIG_OFF, tl.int32) + rank * chunks + chunk
            signals.store_release(sig, epoch)


@triton.jit
def _pull_shards(x_ptr, table_ptr, status_ptr, base, rank, epoch, patience, M_LOCAL, K,
                 chunks, comm,
                 WORLD: tl.constexpr, SIG_OFF: tl.constexpr, DATA_OFF: tl.constexpr,
                 CHUNK_ROWS: tl.constexpr, COMM_PROGRAMS: tl.constexpr,
                 COPY_ROWS: tl.constexpr, COPY_COLS: tl.constexpr, REMOTE_CACHE: tl.constexpr,
                 ROTATE: tl.constexpr):
    """PULL: ticket 0 first stages this rank's shard in its own gather slot, chunk
    by chunk, each followed by ``sig[rank * chunks + j] = epoch`` in its own
    workspace (once every peer has finished its previous call, which read that
    slot). Then the communication programs copy the peers' staged chunks into
    this rank's slots, in the order the GEMM reads them (rank-1, rank-2, ...),
    acquire-waiting on each chunk's staging signal in the peer's workspace and
    release-storing its arrival signal here. Staging precedes every wait of
    this call at ticket 0, so waits target work that waits on nothing."""
    dtype = x_ptr.dtype.element_ty
    gather = signals.rebase(x_ptr, signals.data_ptr(base, DATA_OFF, dtype))
    my_signals = signals.as_ptr(base, SIG_OFF, tl.int32)
    if comm == 0:
        idle = rank == rank
        for d in range(1, WORLD):
            idle &= signals.wait_peer_idle(table_ptr, rank, (rank + d) % WORLD, epoch, patience,
                                           status_ptr, signals.AG_PEER_IDLE, WORLD)
        if idle:  # else nothing is staged: the peers fail rather than read stale rows
            own = gather + rank.to(tl.int64) * M_LOCAL * K
            for chunk in range(0, chunks):
                row0 = chunk * CHUNK_ROWS
                _copy_rows(x_ptr, own, row0, tl.minimum(row0 + CHUNK_ROWS, M_LOCAL), K,
                           COPY_ROWS, COPY_COLS, "")
                signals.store_release(my_signals + rank * chunks + chunk, epoch)
    for item in range(comm, (WORLD - 1) * chunks, COMM_PROGRAMS):
        d = item // chunks
        if ROTATE:
            src = (rank - d - 1 + WORLD) % WORLD  # the GEMM's order: rank-1, rank-2, ...
        else:
            src = d + (d >= rank).to(tl.int32)
        chunk = item % chunks
        src_ws = signals.peer_base(table_ptr, src)
        staged = signals.as_ptr(src_ws, SIG_OFF, tl.int32) + src * chunks + chunk
        if signals.wait_epoch(staged, epoch, patience, status_ptr, table_ptr, signals.WAIT_ROWS,
                              rank, src, chunk, WORLD):
            offset = src.to(tl.int64) * M_LOCAL * K
            remote = signals.rebase(x_ptr, signals.data_ptr(src_ws, DATA_OFF, dtype)) + offset
            row0 = chunk * CHUNK_ROWS
            _copy_rows(remote, gather + offset, row0, tl.minimum(row0 + CHUNK_ROWS, M_LOCAL), K,
                       COPY_ROWS, COPY_COLS, REMOTE_CACHE)
            signals.store_release(my_signals + src * chunks + chunk, epoch)


@triton.jit
def _gemm_tiles(x_ptr, w_ptr, y_ptr, xg_ptr, status_ptr, table_ptr, base, rank, epoch, patience,
                M_LOCAL, N, K, chunks, gemm_index, gemm_programs,
                WORLD: tl.constexpr, SIG_OFF: tl.constexpr, DATA_OFF: tl.constexpr,
                CHUNK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, COPY_ROWS: tl.constexpr,
                COPY_COLS: tl.constexpr, RETURN_GATHERED: tl.constexpr, UPCAST: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, REMOTE_CACHE: tl.constexpr,
                ROTATE: tl.constexpr, W_TRANS: tl.constexpr, ROWS: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    gather = signals.rebase(x_ptr, signals.data_ptr(base, DATA_OFF, dtype))
    my_signals = signals.as_ptr(base, SIG_OFF, tl.int32)
    tiles_m = tl.cdiv(M_LOCAL, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for t in range(gemm_index, WORLD * tiles_m * tiles_n, gemm_programs):
        # Row tile `row_tile` of all sources' rows in arrival order.
        row_tile, tile_n = group_order(t, WORLD * tiles_m, tiles_n, GROUP_M)
        step = row_tile // tiles_m
        tile_m = row_tile % tiles_m
        if ROTATE:
            src = (rank - step + WORLD) % WORLD  # own rows, then rank - 1, rank - 2, ...
        else:
            src = step + rank * 0  # rank order (as a tensor, like the rotated branch)
        row0 = tile_m * BLOCK_M
        row1 = tl.minimum(row0 + BLOCK_M, M_LOCAL)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        arrived = src == src
        if src == rank:
            a_ptr = x_ptr
        else:
            # Wait only for the chunks this tile's rows lie in.
            for c in range(row0 // CHUNK_ROWS, (row1 - 1) // CHUNK_ROWS + 1):
                arrived &= signals.wait_epoch(my_signals + src * chunks + c, epoch, patience,
                                              status_ptr, table_ptr, signals.WAIT_ROWS, rank, src,
                                              c, WORLD)
            a_ptr = gather + tl.cast(src, tl.int64) * M_LOCAL * K
        acc = gemm_tile(a_ptr, w_ptr, rows, rows, cols, M_LOCAL, N, K, BLOCK_K, UPCAST,
                        INPUT_PRECISION, REMOTE_CACHE, W_TRANS)
        # Rows that never arrived give NaN, not a plausible product of stale data.
        acc = tl.where(arrived, acc, float("nan"))
        if ROWS == M_LOCAL:
            out_rows = tl.cast(src, tl.int64) * M_LOCAL + rows
        else:  # a folded batch: element b's gathered rows at b * WORLD * ROWS
            out_rows = ((rows // ROWS) * (WORLD * ROWS) + tl.cast(src, tl.int64) * ROWS +
                        rows % ROWS)
        tl.store(y_ptr + out_rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M_LOCAL) & (cols[None, :] < N))
        if RETURN_GATHERED:
            if tile_n == 0:
                _copy_rows(a_ptr, xg_ptr + tl.cast(src, tl.int64) * M_LOCAL * K, row0, row1, K,
                           COPY_ROWS, COPY_COLS, REMOTE_CACHE)


@triton.jit
def ag_gemm_kernel(x_ptr, w_ptr, ctx_ptr, table_ptr, y_ptr, status_ptr, xg_ptr,
                   M_LOCAL: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   WORLD: tl.constexpr, SIG_OFF: tl.constexpr, DATA_OFF: tl.constexpr,
                   CHUNK_ROWS: tl.constexpr, COMM_PROGRAMS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, COPY_ROWS: tl.constexpr, COPY_COLS: tl.constexpr,
                   RETURN_GATHERED: tl.constexpr, UPCAST: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, REMOTE_CACHE: tl.constexpr,
                   ROTATE: tl.constexpr, PULL: tl.constexpr, W_TRANS: tl.constexpr,
                   ROWS: tl.constexpr):
    rank = tl.load(ctx_ptr)
    patience = tl.load(ctx_ptr + 1)
    base, epoch = signals.begin_call(table_ptr, rank, status_ptr)
    chunks = tl.cdiv(M_LOCAL, CHUNK_ROWS)
    # Roles by ticket: the first programs to run communicate (what peers wait for).
    role = signals.take_ticket(base)
    if role < COMM_PROGRAMS:
        if PULL:
            _pull_shards(x_ptr, table_ptr, status_ptr, base, rank, epoch, patience, M_LOCAL, K,
                         chunks, role, WORLD, SIG_OFF, DATA_OFF, CHUNK_ROWS, COMM_PROGRAMS,
                         COPY_ROWS, COPY_COLS, REMOTE_CACHE, ROTATE)
        else:
            _push_shard(x_ptr, table_ptr, status_ptr, rank, epoch, patience, M_LOCAL, K,
                        chunks, role, WORLD, SIG_OFF, DATA_OFF, CHUNK_ROWS, COMM_PROGRAMS,
                        COPY_ROWS, COPY_COLS, ROTATE)
    else:
        _gemm_tiles(x_ptr, w_ptr, y_ptr, xg_ptr, status_ptr, table_ptr, base, rank, epoch, patience,
                    M_LOCAL, N, K, chunks, role - COMM_PROGRAMS,
                    tl.num_programs(0) - COMM_PROGRAMS, WORLD, SIG_OFF, DATA_OFF, CHUNK_ROWS,
                    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, COPY_ROWS, COPY_COLS, RETURN_GATHERED,
                    UPCAST, INPUT_PRECISION, REMOTE_CACHE, ROTATE, W_TRANS, ROWS)
    signals.end_call(base, epoch)


def pointer_types(t: str, out: str | None = None, w: str | None = None) -> dict:
    """Triton types of ``ag_gemm_kernel``'s pointer parameters: operands of element
    type ``t`` (w's: ``w``, default ``t``), the result of ``out`` (default ``t``)."""
    return {"x_ptr": f"*{t}", "w_ptr": f"*{w or t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
            "y_ptr": f"*{out or t}", "status_ptr": "*i32", "xg_ptr": f"*{t}"}


def workspace_bytes(world: int, m_local: int, k: int, itemsize: int, chunk_rows: int):
    """(signal offset, data offset, total bytes) of one rank's workspace for this call."""
    chunks = -(-m_local // chunk_rows)
    sig_off, data_off = signals.layout("all_gather_matmul", world * chunks)
    return sig_off, data_off, data_off + world * m_local * k * itemsize


def ag_gemm(x, w, ctx, table, *, world: int, sig_off: int, data_off: int, chunk_rows: int,
            comm_programs: int, gemm_programs: int, block_m: int, block_n: int, block_k: int,
            group_m: int, copy_rows: int, copy_cols: int, num_warps: int, num_stages: int,
            return_gathered: bool, upcast: bool, input_precision: str, remote_cache: str,
            rotate: bool, on_timeout, status_check: str = "sync",
            pull: bool = False, out_dtype=None, w_transposed: bool = False,
            rows: int | None = None):
    """Launches ``ag_gemm_kernel``; returns (y [P*m, n] in ``out_dtype`` (default
    x's), status [5] int32, xg or a dummy [1]). With ``w_transposed``, w is
    given as w^T [n, K] and read in place. ``rows``: rows per element of a
    folded batch (default: all of x's, no batch)."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    out_shape = [
        jax.ShapeDtypeStruct((world * m, n), out_dtype or x.dtype),
        jax.ShapeDtypeStruct((signals.STATUS_WORDS,), "int32"),
        jax.ShapeDtypeStruct((world * m, k) if return_gathered else (1,), x.dtype),
    ]
    return triton_call(
        x, w, ctx, table, kernel=ag_gemm_kernel, out_shape=out_shape,
        grid=(comm_programs + gemm_programs,), num_warps=num_warps, num_stages=num_stages,
        zeroed_outputs=(1,), status_output=1, on_status=on_timeout, status_check=status_check,
        resident=True,
        M_LOCAL=m, N=n, K=k, WORLD=world, SIG_OFF=sig_off, DATA_OFF=data_off,
        CHUNK_ROWS=chunk_rows,
        COMM_PROGRAMS=comm_programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m,
        COPY_ROWS=copy_rows, COPY_COLS=copy_cols, RETURN_GATHERED=return_gathered,
        UPCAST=upcast, INPUT_PRECISION=input_precision, REMOTE_CACHE=remote_cache,
        ROTATE=rotate, PULL=pull, W_TRANS=w_transposed, ROWS=rows or m)
