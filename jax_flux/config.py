"""Tuning configurations of the fused kernels: frozen dataclasses, validated on construction.

``config=None`` in the ops picks ``default(...)``: a heuristic by shape,
dtype and axis size. Block sizes are powers of two (Triton's tl.arange needs
them); tl.dot on a GPU needs every block dimension >= 16.
"""

from __future__ import annotations

import dataclasses


def _pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


def _positive(name: str, value, lo: int = 1) -> None:
    if not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(n)))


def _block_k(itemsize: int, input_precision: str = "tf32") -> int:
    """K of a GEMM tile on a GPU: 64 elements (128 bytes a row) for 16- and 32-bit
    types, 128 for float8 (the same bytes; an FP8 MMA takes K = 32 at once), 32
    for exact float32 (``_exact_f32``)."""
    if itemsize == 4 and input_precision == "ieee":
        return 32
    return 128 if itemsize == 1 else 64


# float32 MMAs other than one tensorfloat32 pass (the ops' precision HIGHEST:
# "ieee", float32 FMAs on the CUDA cores; TF32_TF32_F32_X3: "tf32x3", three
# tf32 MMAs a step) need more registers a thread than a tile's accumulators:
# compiled for sm_90 with 4 warps a 128x128 tile spills into the K loop (ieee:
# ~10 KB of stack a thread, more local-memory accesses than FMAs; tf32x3: 552 B,
# 242 accesses a step). With 8 warps (64 accumulators a thread) and, for ieee,
# K tiles of 32, nothing spills in the K loops of both fused kernels (ieee:
# 2048 FFMA of ~2300 instructions; tf32x3: ~740 with 24 wgmma a warpgroup).
WIDE_F32 = ("ieee", "tf32x3")


@dataclasses.dataclass(frozen=True)
class _Common:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Total persistent grid; None: one program per output tile, capped at
    # programs_per_sm x the number of SMs (GPU) or 4 (interpreter).
    num_programs: int | None = None
    # Programs resident per SM the default grid assumes (2 fits two 3-stage
    # 128x128x64 bf16 tiles of 4 warps in Hopper's registers and shared
    # memory). Programs wait on each other, so the grid must co-reside: one
    # larger than the compiled kernel allows is a ValueError when the program
    # is lowered for a GPU (custom_calls.compiler.check_resident).
    programs_per_sm: int = 1
    timeout_s: float = 60.0
    # Rank-rotated tile order (Flux's swizzle): ranks start on different peers.
    # Off: every rank walks the ranks in order 0, 1, ... (for comparison).
    rotate: bool = True
    # Output tiles go in groups of group_m row tiles (column by column inside
    # a group, as Triton's plain GEMM), the rows of all ranks in the rotated
    # order, so the programs running at once share w's column tiles in L2;
    # 1: row-major (each wave of programs reads every column of w).
    group_m: int = 8

    def _check_common(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            _pow2(name, getattr(self, name), 1, 1024)
        _pow2("num_warps", self.num_warps, 1, 32)
        _positive("num_stages", self.num_stages)
        if self.num_programs is not None:
            _positive("num_programs", self.num_programs, 2)
        if self.programs_per_sm not in (1, 2, 3, 4):
            raise ValueError(f"programs_per_sm must be 1 to 4, got {self.programs_per_sm!r}")
        _positive("group_m", self.group_m)
        if not isinstance(self.rotate, bool):
            raise ValueError(f"rotate must be a bool, got {self.rotate!r}")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s <= 3600:
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {self.timeout_s!r}")

    def _check_helpers(self, name: str, count: int) -> None:
        """``count`` helper programs (``name``) leave at least one GEMM program."""
        _positive(name, count)
        if self.num_programs is not None and self.num_programs <= count:
            raise ValueError(f"num_programs ({self.num_programs}) must exceed {name} "
                             f"({count}): GEMM programs are the rest")

    def patience_ms(self) -> int:
        """What a wait may spend before it reports a timeout, in milliseconds of
        the GPU's global timer (of the host's clock in the interpreter)."""
        return max(1, round(self.timeout_s * 1000))  # <= 3.6e6: an int32


@dataclasses.dataclass(frozen=True)
class AllGatherMatmulConfig(_Common):
    """Fused AllGather-GEMM tuning.

    Attributes:
      block_m, block_n, block_k: GEMM tile.
      group_m: row tiles per group of the tile order (rows of all ranks).
      rotate: rank-rotated tile order (own rows first, then peers').
      num_warps, num_stages: Triton compile options (GPU).
      chunk_rows: rows per communication chunk (one signal each); independent
        of the GEMM tile.
      comm_programs: programs that push this rank's shard to its peers (or,
        with ``pull``, copy the peers' shards in).
      pull: the communication programs read the peers' rows (each rank first
        stages its shard in its own workspace) instead of writing this rank's
        rows into the peers' buffers: NVLink reads instead of posted writes,
        and each rank fetches in the order its own GEMM consumes.
      copy_rows, copy_cols: tile of the communication copy loop.
      num_programs: total persistent grid, communication programs included.
      programs_per_sm: programs per SM the default grid assumes (GPU).
      timeout_s: seconds a wait may spin before the call fails (the GPU's clock;
        the host's when interpreted).
    """

    chunk_rows: int = 128
    comm_programs: int = 2
    copy_rows: int = 32
    copy_cols: int = 128
    pull: bool = False

    def __post_init__(self):
        self._check_common()
        if not isinstance(self.pull, bool):
            raise ValueError(f"pull must be a bool, got {self.pull!r}")
        _positive("chunk_rows", self.chunk_rows)
        self._check_helpers("comm_programs", self.comm_programs)
        _pow2("copy_rows", self.copy_rows, 1, 1024)
        _pow2("copy_cols", self.copy_cols, 1, 4096)

    @classmethod
    def default(cls, m_local: int, k: int, n: int, world: int, interpreting: bool, *,
                sms: int = 132, itemsize: int = 2, out_itemsize: int | None = None,
                input_precision: str = "tf32"):
        """Heuristic: tiles no larger than the problem; chunks of about a GEMM tile;
        communication programs as the push rate wants, fewer where that saves a
        wave of GEMM tiles on ``sms`` SMs. ``itemsize``: the operands' (what is
        copied); the result's (``out_itemsize``) changes nothing here;
        ``input_precision``: float32 MMAs' (``WIDE_F32``: 8 warps)."""
        if interpreting:
            return cls(block_m=_clamp_pow2(m_local, 16, 64), block_n=_clamp_pow2(n, 16, 64),
                       block_k=_clamp_pow2(k, 16, 64), chunk_rows=max(1, min(m_local, 32)),
                       comm_programs=1, copy_rows=16, copy_cols=_clamp_pow2(k, 16, 64))
        block_m = _clamp_pow2(m_local, 16, 128)
        # A communication program has one copy tile of loads in flight at a
        # time (its stores into a peer may not pass them), so it moves about
        # tile bytes / load latency (~1 us). An AG-GEMM pushes (P-1)/(P n)
        # bytes per GEMM flop: ~85 GB/s at 600 TFLOP/s for GPT-3's n = 6144 a
        # rank, so ~128 KiB in flight in all by that estimate (4 x 8 KiB gave a
        # quarter). Measure on a GPU (benchmarks.emulated, benchmarks.tune).
        chunk_rows = max(block_m, min(m_local, 256))
        items = (world - 1) * -(-m_local // chunk_rows)  # chunks to push (none at P = 1)
        block_n = _clamp_pow2(n, 16, 128)
        tiles = world * -(-m_local // block_m) * -(-n // block_n)
        # Up to 8 programs, the most of those that leave the GEMM the fewest
        # waves of tiles (384 tiles on 132 SMs: 4 programs, 3 full waves of
        # 128; 7 would leave 125 and a 4th wave).
        comm = min(range(1, max(1, min(8, items)) + 1),
                   key=lambda c: (-(-tiles // max(1, sms - c)), -c))
        # Copy tiles that make up the 128 KiB: up to 128 bytes a thread of 4
        # warps (64 elements of a 16-bit type, 32 of a 4-byte one, 128 of a
        # float8); however few rows a rank has (decode: 8 rows x 2048
        # columns, not 8 valid rows of 32).
        elements = min(32768 // itemsize, max(8192, (128 << 10) // (comm * itemsize)))
        copy_rows = _clamp_pow2(min(m_local, 32), 1, 32)
        wide = itemsize == 4 and input_precision in WIDE_F32
        return cls(block_m=block_m, block_n=block_n, block_k=_block_k(itemsize, input_precision),
                   num_warps=8 if wide else 4, chunk_rows=chunk_rows,
                   comm_programs=comm, copy_rows=copy_rows,
                   copy_cols=_clamp_pow2(min(k, elements // copy_rows), 16, 4096))


@dataclasses.dataclass(frozen=True)
class MatmulReduceScatterConfig(_Common):
    """Fused GEMM-ReduceScatter tuning.

    Attributes:
      block_m, block_n, block_k: GEMM tile; also the unit of signalling and
        of the reduction.
      group_m: row tiles per group of the tile order (rows of all owners).
      rotate: rank-rotated tile order (the next rank's rows first, own last).
      reduce_programs: programs that sum the P partials of this rank's rows
        while the GEMM runs; 0: no such programs, the GEMM program that
        computes one of this rank's own tiles (the last in its order) sums
        the peers' partials of that tile into it right there (every SM
        reduces at the end instead of a few throughout; the GPU default).
        Programs then take tiles by ticket (``custom_calls.signals.take_ticket``),
        so it finishes with any number of them resident.
      num_warps, num_stages: Triton compile options (GPU).
      num_programs: total persistent grid, reduction programs included.
      programs_per_sm: programs per SM the default grid assumes (GPU).
      timeout_s: seconds a wait may spin before the call fails (the GPU's clock;
        the host's when interpreted).
    """

    reduce_programs: int = 8

    def __post_init__(self):
        self._check_common()
        _positive("reduce_programs", self.reduce_programs, 0)
        if self.reduce_programs != 0:
            self._check_helpers("reduce_programs", self.reduce_programs)

    @classmethod
    def default(cls, m_local: int, k: int, n: int, world: int, interpreting: bool, *,
                sms: int = 132, itemsize: int = 2, out_itemsize: int | None = None,
                input_precision: str = "tf32"):
        """Heuristic: tiles no larger than a rank's rows; small M gets small tiles;
        8 warps for 4-byte operands or results (with 4, the epilogue's float32
        sum spills into the K loop: seen for float32 and for bfloat16 operands
        with a float32 result); K tiles of 32 for exact float32
        (``input_precision`` "ieee", ``WIDE_F32``)."""
        if interpreting:
            # The GPU's reduction too (the own tiles' epilogue; in order the
            # first program takes every tile by ticket), so the CPU suite runs
            # the path GPUs run; reduction programs are tested by their configs.
            return cls(block_m=_clamp_pow2(m_local, 16, 64), block_n=_clamp_pow2(n, 16, 64),
                       block_k=_clamp_pow2(k, 16, 64), reduce_programs=0)
        # reduce_programs=0 (the own tiles' epilogue sums the partials) on a GPU:
        # own tiles come last, so reduction programs can only start near the
        # end, and a few of them summing tile after tile are bound by load
        # latency: by a model (README) ~0.5 ms after a ~1.8 ms GEMM at GPT-3's
        # M=8192, and several times the GEMM at decode size.
        block_m = _clamp_pow2(m_local, 16, 128)
        return cls(block_m=block_m, block_n=_clamp_pow2(n, 16, 128),
                   block_k=_block_k(itemsize, input_precision),
                   reduce_programs=0,
                   num_warps=8 if max(itemsize, out_itemsize or itemsize) >= 4 else 4)
