"""The tiled GEMM: the tile loop every fused kernel extends, and a plain matmul kernel.

``gemm_tile`` computes one [BLOCK_M, BLOCK_N] tile of ``a @ b`` in float32,
masking ragged edges in M, N and K. ``matmul_kernel`` launches one program per
output tile in grouped (L2-friendly) order; ``matmul`` wraps it for JAX
arrays through ``custom_calls.binding.triton_call``.

Operands are row-major: a [M, K], b [K, N] (or, with B_TRANS, b^T [N, K]), c [M, N].
They share one dtype, or one is float8 (``mma_dtype`` says what the MMAs run in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from custom_calls import _mode
from custom_calls.binding import triton_call


@triton.jit
def gemm_tile(a_ptr, b_ptr, rows, a_rows, cols, M, N, K,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              A_CACHE: tl.constexpr, B_TRANS: tl.constexpr):
    """float32 tile of a[rows, :] @ b[:, cols]; rows >= M / cols >= N read as 0.

    ``a_rows``: where row ``rows[i]`` lies in a (``rows`` itself, except where
    a's rows are interleaved: a batch folded into one launch).
    UPCAST casts operands to float32 before tl.dot: set only on the interpreter
    path, whose tl.dot is wrong for bfloat16 operands. A_CACHE is the load
    cache modifier for a (".cg" where peers wrote it: bypass a stale L1).
    B_TRANS: b is stored transposed, [N, K] row-major (K contiguous), as a
    weight is in a backward pass (dx = dy @ w^T reads w [K_fwd, N_fwd] as is).

    Mixed operands (``mma_dtype``): two float8 kinds go to tl.dot as they are
    (Hopper's FP8 MMAs take e4m3 x e5m2); a float8 tile against a 16/32-bit
    one is widened to that dtype in registers after its load, so a float8
    weight is read from memory at one byte an element and never copied wider.
    """
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * K + offs_k[None, :]
    if B_TRANS:
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * K + offs_k[:, None]
        b_step = BLOCK_K
    else:
        b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * N + cols[None, :]
        b_step = BLOCK_K * N
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0, cache_modifier=A_CACHE)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        if a.dtype.is_fp8() and not b.dtype.is_fp8():
            a = a.to(b.dtype)
        if b.dtype.is_fp8() and not a.dtype.is_fp8():
            b = b.to(a.dtype)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    return acc


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of linear tile id ``tile``, GROUP_M row tiles per group."""
    return group_order(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def group_order(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of the ``tile``-th of tiles_m x tiles_n tiles taken in
    groups of GROUP_M row tiles, column by column inside a group (the last
    group may have fewer rows): programs that run at once share column tiles
    of the right-hand operand in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (tile % per_group) % group_rows
    tile_n = (tile % per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  B_TRANS: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = gemm_tile(a_ptr, b_ptr, rows, rows, cols, M, N, K, BLOCK_K, UPCAST, INPUT_PRECISION, "",
                    B_TRANS)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def pointer_types(t: str, b: str | None = None, out: str | None = None) -> dict:
    """Triton types of ``matmul_kernel``'s pointer parameters: elements of type ``t``
    (b's ``b``, c's ``out``, if given)."""
    return {"a_ptr": f"*{t}", "b_ptr": f"*{b or t}", "c_ptr": f"*{out or t}"}


def is_float8(dtype) -> bool:
    return jnp.dtype(dtype).name.startswith("float8")


def mma_dtype(a_dtype, b_dtype=None):
    """The dtype ``gemm_tile``'s tl.dot runs in for operands of these dtypes: theirs
    when they agree or both are float8 (a's: Triton's FP8 MMAs take mixed kinds),
    else the one that is not float8 (the float8 tile is widened to it)."""
    a, b = jnp.dtype(a_dtype), jnp.dtype(a_dtype if b_dtype is None else b_dtype)
    if a == b or (is_float8(a) and is_float8(b)):
        return a
    if is_float8(a) == is_float8(b):
        raise ValueError(f"operands of dtypes {a} and {b}: they must agree unless one is float8")
    return b if is_float8(a) else a


def upcast_operands(a_dtype, b_dtype=None) -> bool:
    """Whether tl.dot operands must be cast to float32 (interpreter + bfloat16 MMAs)."""
    return _mode.interpreting() and mma_dtype(a_dtype, b_dtype) == jnp.bfloat16


def matmul(a: jax.Array, b: jax.Array, *, block_m: int = 64, block_n: int = 64,
           block_k: int = 32, group_m: int = 8, num_warps: int = 4, num_stages: int = 3,
           input_precision: str = "ieee", out_dtype=None,
           b_transposed: bool = False) -> jax.Array:
    """``a @ b`` by ``matmul_kernel``: row-major 2-D operands of one dtype (or one
    float8, as ``mma_dtype`` allows), float32 accumulate.

    With ``b_transposed``, ``b`` is given as b^T [N, K] and read in place
    (``a @ b.T`` without a transposed copy). Shapes are not checked here
    beyond rank and contraction size; jax_flux validates user input before it
    reaches a kernel.
    """
    (m, k), (k2, n) = a.shape, b.shape[::-1] if b_transposed else b.shape
    if k != k2:
        raise ValueError(f"matmul needs a [M, K] and b [K, N], got {a.shape} and {b.shape}")
    mma = mma_dtype(a.dtype, b.dtype)
    out_dtype = mma if out_dtype is None else out_dtype
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    return triton_call(
        a, b, kernel=matmul_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=grid,
        num_warps=num_warps, num_stages=num_stages, M=m, N=n, K=k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        UPCAST=upcast_operands(a.dtype, b.dtype), INPUT_PRECISION=input_precision, B_TRANS=b_transposed)
