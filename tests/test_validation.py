"""Bad input raises a ValueError naming shapes, dtypes and the axis size, before any kernel."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jax_flux
from tests.helpers import mesh_of

OPS = [jax_flux.all_gather_matmul, jax_flux.matmul_reduce_scatter]


def call(op, x, w, axis_name="tp", **kw):
    """Traces op on local shards x, w (replicated into every rank) over 8 ranks."""
    f = jax.shard_map(lambda x, w: op(x, w, axis_name, **kw), mesh=mesh_of(8),
                      in_specs=(P(), P()), out_specs=P("tp"), check_vma=False)
    return jax.eval_shape(f, x, w)


def arr(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("op", OPS)
def test_x_has_2_or_more_dims_and_w_2(op):
    match = r"x must have 2 or more dims \(\[rows, \.\.\., K\]\) and w 2, got x{} and w{}.*size 8"
    with pytest.raises(ValueError, match=match.format(r"\(8,\)", r"\(8, 3\)")):
        call(op, arr((8,)), arr((8, 3)))
    with pytest.raises(ValueError, match=match.format(r"\(8, 4\)", r"\(4, 3, 2\)")):
        call(op, arr((8, 4)), arr((4, 3, 2)))
    with pytest.raises(ValueError, match=r"contraction.*x\(8, 4, 2\) @ w\(4, 3\).*size 8"):
        call(op, arr((8, 4, 2)), arr((4, 3)))


@pytest.mark.parametrize("op", OPS)
def test_contraction_sizes_must_match(op):
    with pytest.raises(ValueError, match=r"contraction.*x\(8, 4\) @ w\(5, 3\).*size 8"):
        call(op, arr((8, 4)), arr((5, 3)))


@pytest.mark.parametrize("op", OPS)
def test_contraction_of_a_transposed_weight(op):
    with pytest.raises(ValueError, match=r"contraction.*x\(8, 4\) @ w\(4, 3\)\.T \(w_transposed\)"):
        call(op, arr((8, 4)), arr((4, 3)), w_transposed=True)
    with pytest.raises(ValueError, match="w_transposed must be a bool"):
        call(op, arr((8, 4)), arr((3, 4)), w_transposed="yes")
    assert call(op, arr((8, 4)), arr((3, 4)), w_transposed=True).shape[1] == 3


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_operands_need_a_preferred_element_type(op, dtype):
    with pytest.raises(ValueError, match=r"float8 operands \(x float8_e\w+, w float8_e\w+\) "
                                         r"need preferred_element_type, one of bfloat16"):
        call(op, arr((8, 4), dtype), arr((4, 3), dtype))
    with pytest.raises(ValueError, match="preferred_element_type float8_e4m3fn is not supported"):
        call(op, arr((8, 4), dtype), arr((4, 3), dtype), preferred_element_type=jnp.float8_e4m3fn)
    out = call(op, arr((8, 4), dtype), arr((4, 3), dtype), preferred_element_type=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("op", OPS)
def test_dtypes_must_match_unless_one_is_float8(op):
    with pytest.raises(ValueError, match="one dtype unless one is float8.*x float32 and w "
                                         "bfloat16"):
        call(op, arr((8, 4)), arr((4, 3), jnp.bfloat16))
    # lax.dot_general's promotion: a float8 weight against bfloat16 (float32)
    # activations gives bfloat16 (float32); two float8 kinds need the result named.
    e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
    assert call(op, arr((8, 4), jnp.bfloat16), arr((4, 3), e4m3)).dtype == jnp.bfloat16
    assert call(op, arr((8, 4), e5m2), arr((4, 3), jnp.float32)).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"float8 operands \(x float8_e4m3fn, w float8_e5m2\)"):
        call(op, arr((8, 4), e4m3), arr((4, 3), e5m2))
    with pytest.raises(ValueError, match="w has dtype int8, not supported"):
        call(op, arr((8, 4), e4m3), arr((4, 3), jnp.int8))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16, jnp.int8])
def test_unsupported_dtype(op, dtype):
    with pytest.raises(ValueError, match=f"x has dtype {jnp.dtype(dtype).name}, not supported"):
        call(op, arr((8, 4), dtype), arr((4, 3), dtype))


def test_reduce_scatter_rows_divisible_by_axis_size():
    rs = jax_flux.matmul_reduce_scatter
    with pytest.raises(ValueError, match=r"x\(12, 4\) has 12 rows in dim 0, not divisible by "
                                         r"the size 8"):
        call(rs, arr((12, 4)), arr((4, 3)))
    # Scattered along dim 0: 12 x 2 rows flattened would divide, dim 0 does not.
    with pytest.raises(ValueError, match=r"x\(12, 2, 4\) has 12 rows in dim 0, not divisible "
                                         r"by the size 8"):
        call(rs, arr((12, 2, 4)), arr((4, 3)))
    with pytest.raises(ValueError, match=r"x\(8, 12, 4\) has 12 rows in dim 1, not divisible "
                                         r"by the size 8"):
        call(rs, arr((8, 12, 4)), arr((4, 3)), scatter_dimension=-2)


@pytest.mark.parametrize("op,what", [(jax_flux.all_gather_matmul, "axis"),
                                     (jax_flux.matmul_reduce_scatter, "scatter_dimension")])
@pytest.mark.parametrize("dim", [2, -1, 3, -4, 1.0, True, None])
def test_the_row_dim_is_a_dim_of_x_before_its_last(op, what, dim):
    # x [8, 8, 4]: dims 0 and 1 (or -3 and -2); the last is the contraction dim.
    with pytest.raises(ValueError, match=rf"{what} must be a dim of x\(8, 8, 4\) other than its "
                                         rf"last \(the contraction dim\): an int from 0 to 1 "
                                         rf"\(or -3 to -2\), got {dim!r}"):
        call(op, arr((8, 8, 4)), arr((4, 3)), **{what: dim})


@pytest.mark.parametrize("op", OPS)
def test_unknown_impl(op):
    with pytest.raises(ValueError, match="impl must be one of"):
        call(op, arr((8, 4)), arr((4, 3)), impl="nccl")


@pytest.mark.parametrize("op", OPS)
def test_config_only_for_fused(op):
    with pytest.raises(ValueError, match="config applies to impl='fused' only"):
        call(op, arr((8, 4)), arr((4, 3)), impl="ring", config=object())


@pytest.mark.parametrize("op", OPS)
def test_outside_shard_map(op):
    with pytest.raises(ValueError, match="unbound axis name 'tp'.*shard_map"):
        op(jnp.ones((8, 4)), jnp.ones((4, 3)), "tp")


@pytest.mark.parametrize("op", OPS)
def test_bad_axis_name_tuples(op):
    # A tuple of distinct axes is one axis (tests/test_ops.py); a list, a repeated
    # axis or an unbound one is an error.
    with pytest.raises(ValueError, match="a mesh axis or a tuple of distinct ones"):
        op(jnp.ones((8, 4)), jnp.ones((4, 3)), ["tp"])
    with pytest.raises(ValueError, match="a mesh axis or a tuple of distinct ones"):
        op(jnp.ones((8, 4)), jnp.ones((4, 3)), ("tp", "tp"))
    with pytest.raises(ValueError, match="unbound axis name 'dp'.*shard_map"):
        call(op, arr((8, 4)), arr((4, 3)), axis_name=("tp", "dp"))


def test_return_gathered_must_be_a_bool():
    with pytest.raises(ValueError, match="return_gathered must be a bool, got 'yes'"):
        call(jax_flux.all_gather_matmul, arr((8, 4)), arr((4, 3)), return_gathered="yes")
