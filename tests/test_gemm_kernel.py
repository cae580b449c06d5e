"""The tiled Triton GEMM through the custom-call binding (the interpreter on CPU) against jnp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from custom_calls import triton_call
from custom_calls.gemm import matmul, matmul_kernel, mma_dtype, upcast_operands
from jax_flux import testing
from tests.helpers import mesh_of

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(64, 64, 64), (50, 70, 33), (1, 200, 7), (97, 16, 130)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_host_float64(shape, dtype):
    m, k, n = shape
    a, b, a64, b64 = testing.random_operands(m, k, n, dtype, seed=m + n)
    c = jax.jit(lambda a, b: matmul(a, b, block_m=32, block_n=32, block_k=16))(a, b)
    assert c.shape == (m, n) and c.dtype == jnp.dtype(dtype)
    assert testing.relative_error(c, a64 @ b64) < testing.TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_gemm_reads_b_transposed_in_place(dtype):
    # b given as b^T [N, K] (K contiguous): the layout the fused kernels' backward reads w in.
    a, b, a64, b64 = testing.random_operands(50, 70, 33, dtype, seed=5)
    c = jax.jit(lambda a, bt: matmul(a, bt, block_m=32, block_n=32, block_k=16,
                                     b_transposed=True))(a, b.T)
    assert c.shape == (50, 33)
    assert testing.relative_error(c, a64 @ b64) < testing.TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.parametrize("a_dtype,b_dtype", [(jnp.bfloat16, jnp.float8_e4m3fn),
                                             (jnp.float8_e5m2, jnp.float32),
                                             (jnp.float8_e4m3fn, jnp.float8_e5m2)],
                         ids=["bf16-e4m3fn", "e5m2-f32", "e4m3fn-e5m2"])
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b", "bT"])
def test_gemm_mixed_operands(a_dtype, b_dtype, b_transposed):
    # One operand float8: widened in registers to the other's dtype, or, both
    # float8 of two kinds, multiplied as they are (a bfloat16 result).
    mma = mma_dtype(a_dtype, b_dtype)
    out = jnp.bfloat16 if mma.itemsize == 1 else None
    a, b, a64, b64 = testing.random_operands(50, 70, 33, a_dtype, seed=6, w_dtype=b_dtype)
    c = jax.jit(lambda a, b: matmul(a, b, block_m=32, block_n=32, block_k=16, out_dtype=out,
                                    b_transposed=b_transposed))(a, b.T if b_transposed else b)
    assert c.dtype == jnp.dtype(out or mma)
    assert testing.relative_error(c, a64 @ b64) < testing.TOLERANCE[c.dtype]


def test_mma_dtype():
    e4m3, e5m2 = jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2)
    assert mma_dtype(jnp.bfloat16, e4m3) == mma_dtype(e5m2, jnp.bfloat16) == jnp.bfloat16
    assert mma_dtype(e4m3, e5m2) == e4m3 and mma_dtype(jnp.float16) == jnp.float16
    with pytest.raises(ValueError, match="bfloat16 and float32: they must agree"):
        mma_dtype(jnp.bfloat16, jnp.float32)
    assert upcast_operands(jnp.bfloat16, e4m3) and not upcast_operands(e4m3, e5m2)


def test_gemm_matches_jnp_dot():
    a, b, _, _ = testing.random_operands(40, 24, 56, jnp.float32, seed=7)
    c = jax.jit(matmul)(a, b)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a @ b), rtol=1e-5, atol=1e-5)


def test_gemm_float32_output_from_bf16():
    a, b, a64, b64 = testing.random_operands(33, 40, 17, jnp.bfloat16, seed=9)
    c = jax.jit(lambda a, b: matmul(a, b, out_dtype=jnp.float32))(a, b)
    assert c.dtype == jnp.float32
    # Only input rounding remains: float32 accumulation of bf16-exact values.
    assert testing.relative_error(c, a64 @ b64) < 1e-6


def test_bf16_operands_are_upcast_only_in_the_interpreter():
    assert upcast_operands(jnp.bfloat16)
    assert not upcast_operands(jnp.float16) and not upcast_operands(jnp.float32)


def test_gemm_inside_shard_map_on_8_devices():
    mesh = mesh_of(8)
    a, b, a64, b64 = testing.random_operands(8 * 19, 45, 8 * 11, jnp.float32, seed=11)
    # Block-diagonal product: rank r multiplies its row block of a by its column block of b.
    f = jax.jit(jax.shard_map(lambda a, b: matmul(a, b, block_m=16, block_n=16, block_k=16),
                              mesh=mesh, in_specs=(P("tp"), P(None, "tp")), out_specs=P("tp")))
    c = np.asarray(f(a, b), np.float64).reshape(8, 19, 11)
    for r in range(8):
        ref = a64[r * 19:(r + 1) * 19] @ b64[:, r * 11:(r + 1) * 11]
        assert testing.relative_error(c[r], ref) < 1e-5


def test_unwritten_tiles_show_as_poison():
    # Launch half the programs the output needs: the other tiles must read NaN.
    a, b, _, _ = testing.random_operands(64, 16, 32, jnp.float32)
    c = triton_call(a, b, kernel=matmul_kernel,
                    out_shape=jax.ShapeDtypeStruct((64, 32), jnp.float32), grid=(2,),
                    M=64, N=32, K=16, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, UPCAST=False,
                    INPUT_PRECISION="ieee", B_TRANS=False)
    c = np.asarray(c)
    assert np.isfinite(c[:32]).all() and np.isnan(c[32:]).all()


def test_zeroed_and_aliased_outputs():
    a, b, _, _ = testing.random_operands(16, 16, 16, jnp.float32)
    prior = jnp.full((16, 16), 3.0, jnp.float32)
    # grid 0-size launches are refused; launch one tile of four, so the aliased
    # buffer keeps its prior value outside that tile and the zeroed one is 0.
    c, z = triton_call(a, b, 16, 16, 16, prior, kernel=_two_output_kernel,
                       out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)] * 2, grid=1,
                       input_output_aliases={2: 0}, zeroed_outputs=(1,), BLOCK=8)
    c, z = np.asarray(c), np.asarray(z)
    np.testing.assert_allclose(c[:8, :8], np.asarray(a @ b)[:8, :8], rtol=1e-5, atol=1e-5)
    assert (c[8:] == 3.0).all() and (z == 0).all()


def test_grid_validated():
    a, b, _, _ = testing.random_operands(8, 8, 8, jnp.float32)
    with pytest.raises(ValueError, match="grid must be"):
        triton_call(a, b, kernel=matmul_kernel, out_shape=jax.ShapeDtypeStruct((8, 8), a.dtype),
                    grid=(0,))


import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from custom_calls.gemm import gemm_tile  # noqa: E402


@triton.jit
def _two_output_kernel(a_ptr, b_ptr, M, N, K, prior_ptr, c_ptr, z_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    acc = gemm_tile(a_ptr, b_ptr, rows, rows, cols, M, N, K, BLOCK, False, "ieee", "", False)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)
