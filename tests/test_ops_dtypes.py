"""Both ops' result dtypes, float8 and mixed operands, and the weight given transposed,
for every impl, against the float64 host reference and the lax collective (forward and
gradient)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_flux import testing
from tests.helpers import cotangent, lax_reference, mesh_of

OPS = list(testing.OPS)


@pytest.mark.parametrize("out", [jnp.float32, jnp.bfloat16], ids=["bf16->f32", "f32->bf16"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_preferred_element_type(op, impl, out):
    # The result (and GEMM-RS's partials) in the preferred dtype: bf16 operands
    # with a float32 result are exact to float32 accumulation (a bf16 rounding
    # anywhere would give ~4e-3); float32 operands with a bf16 result round once.
    import jax

    src = jnp.bfloat16 if out == jnp.float32 else jnp.float32
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(104, 72, 24, src, seed=13)
    in_specs, out_spec = testing._SPECS[op]
    fn = testing.OPS[op]

    def run(g):
        f = jax.shard_map(lambda x, w: fn(x, w, "tp", impl=impl, preferred_element_type=out),
                          mesh=mesh, in_specs=in_specs, out_specs=out_spec)
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(g))

    g = jnp.asarray(np.random.default_rng(2).standard_normal((104, 24)), out)
    y, dx, dw = jax.jit(run)(g)
    assert y.dtype == jnp.dtype(out) and dx.dtype == dw.dtype == jnp.dtype(src)
    assert testing.relative_error(y, x64 @ w64) < (2e-5 if out == jnp.float32 else 1e-2)
    # The backward pass runs in the operands' dtype (the cotangent cast to it).
    g64 = np.asarray(g.astype(src), np.float64)
    tol = testing.TOLERANCE[jnp.dtype(src)]
    assert testing.relative_error(dx, g64 @ w64.T) < tol
    assert testing.relative_error(dw, x64.T @ g64) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_weight_given_transposed(op, impl, dtype):
    # w_transposed=True: W passed as W^T [N, K]; the same product, and dW^T
    # back in that layout (against the host and the plain layout's call).
    mesh = mesh_of(8)
    m, k, n = 48, 40, 32
    x, w, x64, w64 = testing.random_operands(m, k, n, dtype, seed=8)
    g, g64 = cotangent((m, n), dtype)
    xs, wts = testing.place(op, mesh, x, w, w_transposed=True)
    out, dx, dwt = testing.sharded(op, mesh, impl, grad=True, w_transposed=True)(xs, wts, g)
    assert dwt.shape == (n, k) and dwt.dtype == x.dtype
    tol = testing.TOLERANCE[jnp.dtype(dtype)]
    assert testing.relative_error(out, x64 @ w64) < tol
    assert testing.relative_error(dx, g64 @ w64.T) < tol
    assert testing.relative_error(dwt, (x64.T @ g64).T) < tol
    xs, ws = testing.place(op, mesh, x, w)
    _, pdx, pdw = testing.sharded(op, mesh, impl, grad=True)(xs, ws, g)
    assert testing.relative_error(dx, np.asarray(pdx, np.float64)) < tol
    assert testing.relative_error(dwt, np.asarray(pdw, np.float64).T) < tol


@pytest.mark.parametrize("dtype,w_transposed", [(jnp.float8_e4m3fn, True),
                                                (jnp.float8_e5m2, False)],
                         ids=["e4m3fn-wT", "e5m2"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_float8_operands(op, impl, dtype, w_transposed):
    # float8 operands, a bfloat16 result: the product of the float8 values is
    # exact to float32 accumulation and one bfloat16 rounding. The backward runs
    # in bfloat16 (the cotangent's dtype) and rounds the gradients to float8,
    # as JAX's autodiff of lax.dot_general does (the lax reference's too).
    mesh = mesh_of(8)
    m, k, n = 48, 40, 32
    x, w, x64, w64 = testing.random_operands(m, k, n, dtype, seed=9)
    g, g64 = cotangent((m, n), jnp.bfloat16)
    xs, ws = testing.place(op, mesh, x, w, w_transposed=w_transposed)
    out, dx, dw = testing.sharded(op, mesh, impl, grad=True, preferred_element_type=jnp.bfloat16,
                                  w_transposed=w_transposed)(xs, ws, g)
    assert out.dtype == jnp.bfloat16 and dx.dtype == dw.dtype == jnp.dtype(dtype)
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(jnp.bfloat16)]
    tol = testing.TOLERANCE[jnp.dtype(dtype)]
    dw64 = x64.T @ g64
    assert testing.relative_error(dx, g64 @ w64.T) < tol
    assert testing.relative_error(dw, dw64.T if w_transposed else dw64) < tol
    if not w_transposed:
        _, rdx, rdw = lax_reference(op, mesh, grad=True, out_dtype=jnp.bfloat16)(xs, ws, g)
        assert testing.relative_error(dx, np.asarray(rdx, np.float64)) < tol
        assert testing.relative_error(dw, np.asarray(rdw, np.float64)) < tol


# (x dtype, w dtype, preferred_element_type, w_transposed): a float8 weight
# with bfloat16 activations (weight-only float8: decode reads half the weight
# bytes), and e4m3 activations against an e5m2 weight given transposed.
MIXED = [(jnp.bfloat16, jnp.float8_e4m3fn, None, False),
         (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16, True)]


@pytest.mark.parametrize("mixed", MIXED, ids=["bf16-e4m3fn", "e4m3fn-e5m2-wT"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_mixed_operand_dtypes(op, impl, mixed):
    # x and w of two dtypes, one float8: the product of the values as given
    # (the float8 tile widened in registers), the backward in bfloat16 without
    # converting either operand, the gradients rounded to each operand's dtype
    # (as JAX's autodiff of lax.dot_general does: the lax reference's too).
    xd, wd, out_dtype, w_transposed = mixed
    mesh = mesh_of(8)
    m, k, n = 48, 40, 32
    x, w, x64, w64 = testing.random_operands(m, k, n, xd, seed=12, w_dtype=wd)
    g, g64 = cotangent((m, n), jnp.bfloat16)
    xs, ws = testing.place(op, mesh, x, w, w_transposed=w_transposed)
    out, dx, dw = testing.sharded(op, mesh, impl, grad=True, preferred_element_type=out_dtype,
                                  w_transposed=w_transposed)(xs, ws, g)
    assert out.dtype == jnp.bfloat16 and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert testing.relative_error(out, x64 @ w64) < testing.TOLERANCE[jnp.dtype(jnp.bfloat16)]
    dw64 = x64.T @ g64
    assert testing.relative_error(dx, g64 @ w64.T) < testing.TOLERANCE[jnp.dtype(xd)]
    assert testing.relative_error(dw, dw64.T if w_transposed else dw64) < testing.TOLERANCE[
        jnp.dtype(wd)]
    if not w_transposed:
        ref = lax_reference(op, mesh, grad=True, out_dtype=jnp.bfloat16)(xs, ws, g)
        for got, want in zip((out, dx, dw), ref):
            assert got.dtype == want.dtype
            assert testing.relative_error(got, np.asarray(want, np.float64)) < testing.TOLERANCE[
                jnp.dtype(got.dtype)]


@pytest.mark.parametrize("op", OPS)
def test_fused_float8_weight_is_never_widened_in_xla(op):
    # The fused kernels widen a float8 w tile by tile in registers, forward and
    # backward (dx = d @ w^T against the bfloat16 cotangent): the lowered
    # gradient converts no weight-shaped float8 tensor (a bfloat16 copy of w,
    # each step, before mixed operands) and makes no transposed copy. (XLA's
    # own dot for dW may widen the float8 x it reads; that is not w.)
    mesh = mesh_of(8)
    for xd in (jnp.bfloat16, jnp.float8_e4m3fn):
        x, w, _, _ = testing.random_operands(64, 48, 40, xd, w_dtype=jnp.float8_e4m3fn)
        g, _ = cotangent((64, 40), jnp.bfloat16)
        xs, ws = testing.place(op, mesh, x, w)
        text = testing.sharded(op, mesh, "fused", grad=True,
                               preferred_element_type=jnp.bfloat16).lower(xs, ws, g).as_text()
        local = "x".join(map(str, ws.sharding.shard_shape(ws.shape)))
        converts = [line for line in text.splitlines() if "stablehlo.convert" in line]
        assert not [c for c in converts if f"<{local}xf8E4M3FN>) ->" in c], converts
        assert text.count("stablehlo.transpose") == 0
        assert text.count("cpu_callback") == 2


def test_preferred_element_type_must_be_a_supported_dtype():
    import jax

    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(16, 8, 8, jnp.float32)
    for bad, match in ((jnp.float64, "preferred_element_type float64 is not supported"),
                       (jnp.int8, "preferred_element_type int8 is not supported"),
                       ("nonsense", "preferred_element_type 'nonsense' is not a dtype")):
        f = jax.shard_map(lambda x, w: testing.OPS["all_gather_matmul"](
            x, w, "tp", preferred_element_type=bad), mesh=mesh,
            in_specs=testing._SPECS["all_gather_matmul"][0],
            out_specs=testing._SPECS["all_gather_matmul"][1])
        with pytest.raises(ValueError, match=match):
            f(x, w)
