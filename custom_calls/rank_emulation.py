"""P ranks of a fused kernel on one GPU, each rank's launch on its own CUDA stream.

A machine with one GPU gives JAX a world of size 1, which never exercises
the cross-rank protocol. This runs the real compiled kernels as P ranks
instead: every rank has its own workspace buffer (all on the one GPU, in a
pointer table like the real one), its own operands and its own stream, and
all P launches start together after one event, so their programs run
concurrently as on P GPUs. The grid of every rank must fit on the GPU at the
same time (``programs_per_rank * world <= multiprocessors``) or spin-waits
could starve; ``OneGpuWorld`` enforces that.

Used by the GPU tests (correctness, 200 repetitions, bitwise repeatability)
and the benchmarks (what the signalling costs against the same GEMM without
communication). Kernels are compiled with ``triton.compile`` and loaded
eagerly through ``custom_calls.cuda_driver``: no torch, no lazy loading.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import numpy as np

from custom_calls import ag_gemm, cuda_driver, gemm, gemm_rs, signals
from custom_calls.compiler import (FLOAT8_TYPE, TRITON_TYPE, Compiled, compile_kernel,
                                   ptx_param_count)

_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76
_POISON_BYTE = 0xFF  # NaN in bf16, f16, f32 and both float8 types


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A compiled kernel loaded on one device."""

    fn: int
    threads: int
    shared: int
    params: tuple[str, ...]  # Triton signature type of each runtime parameter


@functools.lru_cache(maxsize=64)
def _load(kernel, ordinal: int, pointers: tuple, constexprs: tuple, num_warps: int,
          num_stages: int) -> Loaded:
    cc = (cuda_driver.attribute(ordinal, _COMPUTE_CAPABILITY_MAJOR) * 10 +
          cuda_driver.attribute(ordinal, _COMPUTE_CAPABILITY_MINOR))
    c = compile_kernel(kernel, cc, pointers, constexprs, num_warps, num_stages)
    if c.global_scratch:
        raise NotImplementedError(f"{kernel.__name__} needs Triton global scratch memory; "
                                  f"the one-GPU rank emulation passes none")
    expected = len(c.params) + Compiled.TRAILING_SCRATCH_PARAMS
    if ptx_param_count(c.ptx, c.name) != expected:
        raise RuntimeError(f"{c.name}: {ptx_param_count(c.ptx, c.name)} PTX parameters, the "
                           f"launch passes {expected}: this Triton's kernel ABI changed")
    fn = cuda_driver.load_function(ordinal, c.cubin, c.name, c.shared)
    return Loaded(fn=fn, threads=32 * num_warps, shared=c.shared, params=c.params)


def _triton_type(dtype) -> str:
    """Triton's element type of a numpy (or ml_dtypes) dtype: bf16, fp8e4nv, ..."""
    return {**TRITON_TYPE, **FLOAT8_TYPE}[np.dtype(dtype).name]


def _param(kind: str, value: int):
    return ctypes.c_uint64(value) if kind.startswith("*") else ctypes.c_int32(value)


class OneGpuWorld:
    """``world`` ranks on GPU ``ordinal``: workspace buffers, streams and a pool of buffers."""

    def __init__(self, world: int, ordinal: int = 0, programs_per_rank: int | None = None,
                 skip_ranks=()):
        """``skip_ranks`` never launch (to test that their peers time out, not hang)."""
        self.world, self.ordinal = world, ordinal
        self.skip_ranks = frozenset(skip_ranks)
        sms = cuda_driver.multiprocessor_count(ordinal)
        self.programs_per_rank = programs_per_rank or sms // world
        if self.programs_per_rank * world > sms or self.programs_per_rank < 2:
            raise ValueError(f"{world} ranks x {self.programs_per_rank} programs must fit on "
                             f"{sms} multiprocessors at once, with at least 2 programs a rank")
        self.streams = [cuda_driver.stream(ordinal) for _ in range(world)]
        self.start = cuda_driver.event(ordinal)
        self.ends = [cuda_driver.event(ordinal) for _ in range(world)]
        self._buffers: dict[tuple, int] = {}
        self._ws_bytes, self._ws = 0, []

    # ------------------------------------------------------------ memory

    def buffer(self, rank: int, name: str, nbytes: int) -> int:
        """A device buffer reused across calls (never freed)."""
        key = (rank, name, max(nbytes, 1))
        if key not in self._buffers:
            self._buffers[key] = cuda_driver.allocate(self.ordinal, max(nbytes, 1))
        return self._buffers[key]

    def upload(self, rank: int, name: str, host: np.ndarray) -> int:
        host = np.ascontiguousarray(host)
        ptr = self.buffer(rank, name, host.nbytes)
        cuda_driver.to_device(self.ordinal, ptr, host)
        return ptr

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        cuda_driver.to_host(self.ordinal, ptr, out)
        return out

    def workspace(self, nbytes: int) -> int:
        """The pointer table (uint32 lo, hi) of every rank's buffer of at least ``nbytes``,
        then of every rank's error record (device memory here: ``_check_status`` reads
        the status outputs instead)."""
        if nbytes > self._ws_bytes:  # new buffers: zero, so epochs restart at 0 on every rank
            self._ws = [cuda_driver.allocate(self.ordinal, nbytes) for _ in range(self.world)]
            self._ws_bytes = nbytes
            for r in range(self.world):
                cuda_driver.fill(self.ordinal, self.buffer(r, "record", 4 * signals.RECORD_WORDS),
                                 4 * signals.RECORD_WORDS, 0)
        addr = np.array(self._ws + [self.buffer(r, "record", 4 * signals.RECORD_WORDS)
                                    for r in range(self.world)], np.uint64)
        table = np.stack([addr & 0xFFFFFFFF, addr >> 32], -1).astype(np.uint32)
        return self.upload(0, "table", table)

    # ---------------------------------------------------------- launches

    def launch_all(self, loaded: Loaded, grid: int, per_rank_args: list[list[int]], *,
                   persistent: bool = True) -> float:
        """Starts every rank's launch together; returns the slowest rank's time in ms.

        A persistent (communicating) kernel's grid must fit its share of the GPU.
        """
        if persistent and grid > self.programs_per_rank:
            raise ValueError(f"grid {grid} exceeds {self.programs_per_rank} programs per rank")
        s0 = self.streams[0]
        cuda_driver.record(self.ordinal, self.start, s0)
        launched = [r for r in range(self.world) if r not in self.skip_ranks]
        for r in launched:
            args = per_rank_args[r]
            if len(args) != len(loaded.params):
                raise ValueError(f"{len(args)} arguments for {len(loaded.params)} parameters")
            params = [_param(k, v) for k, v in zip(loaded.params, args)]
            params += [ctypes.c_uint64(0)] * Compiled.TRAILING_SCRATCH_PARAMS
            stream = self.streams[r]
            cuda_driver.wait(self.ordinal, stream, self.start)
            cuda_driver.launch(self.ordinal, loaded.fn, grid, loaded.threads, loaded.shared,
                               stream, params)
            cuda_driver.record(self.ordinal, self.ends[r], stream)
        times = [cuda_driver.elapsed_ms(self.ordinal, self.start, self.ends[r]) for r in launched]
        for s in self.streams:
            cuda_driver.synchronize(self.ordinal, s)
        return max(times)

    def _status(self, rank: int) -> int:
        ptr = self.buffer(rank, "status", 4 * signals.STATUS_WORDS)
        cuda_driver.fill(self.ordinal, ptr, 4 * signals.STATUS_WORDS, 0)
        return ptr

    def _check_status(self, op: str) -> None:
        for r in sorted(set(range(self.world)) - self.skip_ranks):
            st = self.download(self.buffer(r, "status", 4 * signals.STATUS_WORDS),
                               (signals.STATUS_WORDS,), np.int32)
            if st[0]:
                raise RuntimeError(f"{op}: rank {r} timed out: status {st.tolist()}")

    def _output(self, rank: int, name: str, nbytes: int) -> int:
        ptr = self.buffer(rank, name, nbytes)
        cuda_driver.fill(self.ordinal, ptr, nbytes, _POISON_BYTE)
        return ptr

    def _ctx(self, rank: int, timeout_ms: int) -> int:
        return self.upload(rank, "ctx", np.array([rank, timeout_ms], np.int32))

    # --------------------------------------------------------------- ops

    def ag_gemm(self, xs, ws, *, cfg: dict, grid: int, timeout_ms: int, precision: str,
                return_gathered: bool = False, out_dtype=None, w_transposed: bool = False):
        """Each rank r: all_gather(xs)[P*m, K] @ ws[r] (ws[r] given as w^T [n, K] with
        ``w_transposed``; float8 ws against wider xs are widened in the kernel),
        in ``out_dtype`` (default xs's). Returns (ys, xgs or
        None, ms). A wait gives up after ``timeout_ms`` of the GPU's timer."""
        dtype, (m, k) = xs[0].dtype, xs[0].shape
        n = ws[0].shape[0] if w_transposed else ws[0].shape[1]
        out = np.dtype(out_dtype or dtype)
        sig_off, data_off, nbytes = ag_gemm.workspace_bytes(self.world, m, k, dtype.itemsize,
                                                            cfg["chunk_rows"])
        table = self.workspace(nbytes)
        pointers = tuple(ag_gemm.pointer_types(_triton_type(dtype), _triton_type(out),
                                               _triton_type(ws[0].dtype)).items())
        constexprs = dict(M_LOCAL=m, N=n, K=k, WORLD=self.world, SIG_OFF=sig_off,
                          DATA_OFF=data_off, CHUNK_ROWS=cfg["chunk_rows"],
                          COMM_PROGRAMS=cfg["comm_programs"],
                          BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                          GROUP_M=cfg.get("group_m", 8),
                          COPY_ROWS=cfg["copy_rows"], COPY_COLS=cfg["copy_cols"],
                          RETURN_GATHERED=return_gathered, UPCAST=False,
                          INPUT_PRECISION=precision, REMOTE_CACHE=".cg",
                          ROTATE=cfg.get("rotate", True), PULL=cfg.get("pull", False),
                          W_TRANS=w_transposed, ROWS=m)
        loaded = _load(ag_gemm.ag_gemm_kernel, self.ordinal, pointers,
                       tuple(sorted(constexprs.items())), cfg["num_warps"], cfg["num_stages"])
        y_bytes = self.world * m * n * out.itemsize
        xg_bytes = self.world * m * k * dtype.itemsize if return_gathered else dtype.itemsize
        args = [[self.upload(r, "x", xs[r]), self.upload(r, "w", ws[r]), self._ctx(r, timeout_ms),
                 table, self._output(r, "y", y_bytes), self._status(r),
                 self._output(r, "xg", xg_bytes)] for r in range(self.world)]
        ms = self.launch_all(loaded, grid, args)
        self._check_status("ag_gemm")
        ys = [self.download(a[4], (self.world * m, n), out) for a in args]
        xgs = ([self.download(a[6], (self.world * m, k), dtype) for a in args]
               if return_gathered else None)
        return ys, xgs, ms

    def gemm_rs(self, xs, ws, *, cfg: dict, grid: int, timeout_ms: int, precision: str,
                out_dtype=None, w_transposed: bool = False):
        """Each rank r: its rows of sum over ranks of xs[s] @ ws[s] (ws[s] given as
        w^T [N, k] with ``w_transposed``), in ``out_dtype`` (default xs's; the
        partials too). Returns (zs, ms). A wait gives up after ``timeout_ms`` of
        the GPU's timer."""
        dtype, (m_total, k) = xs[0].dtype, xs[0].shape
        n = ws[0].shape[0] if w_transposed else ws[0].shape[1]
        out = np.dtype(out_dtype or dtype)
        m_own = m_total // self.world
        sig_off, data_off, nbytes = gemm_rs.workspace_bytes(
            self.world, m_own, n, out.itemsize, cfg["block_m"], cfg["block_n"])
        table = self.workspace(nbytes)
        pointers = tuple(gemm_rs.pointer_types(_triton_type(dtype), _triton_type(out),
                                               _triton_type(ws[0].dtype)).items())
        constexprs = dict(M_OWN=m_own, N=n, K=k, WORLD=self.world, SIG_OFF=sig_off,
                          DATA_OFF=data_off, REDUCE_PROGRAMS=cfg["reduce_programs"],
                          BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                          GROUP_M=cfg.get("group_m", 8), UPCAST=False,
                          INPUT_PRECISION=precision, REMOTE_CACHE=".cg",
                          ROTATE=cfg.get("rotate", True), W_TRANS=w_transposed, ROWS=m_own)
        loaded = _load(gemm_rs.gemm_rs_kernel, self.ordinal, pointers,
                       tuple(sorted(constexprs.items())), cfg["num_warps"], cfg["num_stages"])
        z_bytes = m_own * n * out.itemsize
        args = [[self.upload(r, "x", xs[r]), self.upload(r, "w", ws[r]), self._ctx(r, timeout_ms),
                 table, self._output(r, "z", z_bytes), self._status(r)]
                for r in range(self.world)]
        ms = self.launch_all(loaded, grid, args)
        self._check_status("gemm_rs")
        return [self.download(a[4], (m_own, n), out) for a in args], ms

    def matmul(self, a_s, b_s, *, block_m: int, block_n: int, block_k: int, num_warps: int,
               num_stages: int, precision: str, out_dtype=None, b_transposed: bool = False):
        """Each rank: a_s[r] @ b_s[r] by the plain tiled GEMM, no communication, all
        ranks at once: the baseline the fused kernels' signalling cost is measured on
        (b_s[r] given as b^T with ``b_transposed``; c in ``out_dtype``, default
        a's). Returns (cs, ms)."""
        dtype, (m, k) = a_s[0].dtype, a_s[0].shape
        n = b_s[0].shape[0] if b_transposed else b_s[0].shape[1]
        out = np.dtype(out_dtype or dtype)
        pointers = tuple(gemm.pointer_types(_triton_type(dtype), _triton_type(b_s[0].dtype),
                                            _triton_type(out)).items())
        constexprs = dict(M=m, N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                          GROUP_M=8, UPCAST=False, INPUT_PRECISION=precision,
                          B_TRANS=b_transposed)
        loaded = _load(gemm.matmul_kernel, self.ordinal, pointers,
                       tuple(sorted(constexprs.items())), num_warps, num_stages)
        c_bytes = m * n * out.itemsize
        args = [[self.upload(r, "a", a_s[r]), self.upload(r, "b", b_s[r]),
                 self._output(r, "c", c_bytes)] for r in range(self.world)]
        tiles = -(-m // block_m) * -(-n // block_n)
        ms = self.launch_all(loaded, tiles, args, persistent=False)
        return [self.download(a[2], (m, n), out) for a in args], ms
