"""Every impl of both ops against the float64 host reference and the lax collective,
in the same shard_map harness, forward and gradient."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_flux import testing
from tests.helpers import cotangent, count_equations, lax_reference, mesh_of

OPS = list(testing.OPS)
IMPLS = ["xla", "ring", "fused", "auto"]
# (M, K, N) global; M and N divisible by 8. Rows per rank 1, 8 and 13.
SHAPES = [(64, 48, 40), (104, 72, 24), (8, 136, 16)]
DTYPES = [jnp.float32, jnp.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_reference(op, impl, shape, dtype):
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(*shape, dtype)
    xs, ws = testing.place(op, mesh, x, w)
    out = testing.sharded(op, mesh, impl)(xs, ws)
    assert out.shape == (shape[0], shape[2]) and out.dtype == jnp.dtype(dtype)
    tol = testing.TOLERANCE[jnp.dtype(dtype)]
    assert testing.relative_error(out, x64 @ w64) < tol
    lax_out = lax_reference(op, mesh)(xs, ws)
    assert testing.relative_error(out, np.asarray(lax_out, np.float64)) < tol


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("op", OPS)
def test_ring_every_axis_size(op, size):
    # Odd and even sizes exercise the unequal forward/backward halves of the ring.
    mesh = mesh_of(size)
    x, w, x64, w64 = testing.random_operands(6 * size, 5 * size, 4 * size, jnp.float32, seed=size)
    xs, ws = testing.place(op, mesh, x, w)
    out = testing.sharded(op, mesh, "ring")(xs, ws)
    assert testing.relative_error(out, x64 @ w64) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_lax_autodiff(op, impl, dtype):
    mesh = mesh_of(8)
    m, k, n = 48, 40, 32
    x, w, x64, w64 = testing.random_operands(m, k, n, dtype, seed=3)
    g, g64 = cotangent((m, n), dtype)
    xs, ws = testing.place(op, mesh, x, w)
    out, dx, dw = testing.sharded(op, mesh, impl, grad=True)(xs, ws, g)
    _, rdx, rdw = lax_reference(op, mesh, grad=True)(xs, ws, g)
    tol = testing.TOLERANCE[jnp.dtype(dtype)]
    # Host float64 truth: d/dX sum(G * XW) = G W^T, d/dW = X^T G.
    assert testing.relative_error(dx, g64 @ w64.T) < tol
    assert testing.relative_error(dw, x64.T @ g64) < tol
    assert testing.relative_error(dx, np.asarray(rdx, np.float64)) < tol
    assert testing.relative_error(dw, np.asarray(rdw, np.float64)) < tol
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("op", OPS)
def test_fused_backward_reads_the_weight_in_place(op):
    # dx = d @ w^T: the fused kernel reads w as w^T where it lies; a transposed
    # copy of w (one weight's bytes read and written, each step) is not made.
    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(64, 48, 40, jnp.float32)
    g, _ = cotangent((64, 40), jnp.float32)
    xs, ws = testing.place(op, mesh, x, w)
    text = testing.sharded(op, mesh, "fused", grad=True).lower(xs, ws, g).as_text()
    assert text.count("stablehlo.transpose") == 0
    assert text.count("cpu_callback") == 2  # the forward's kernel and dx's


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
def test_replicated_weight_gradient_is_summed_over_ranks(impl):
    # A weight passed replicated (P()) into shard_map: its gradient is the sum of
    # every rank's contribution, as JAX's own autodiff of the lax collective gives.
    import jax
    from jax.sharding import PartitionSpec as P

    from jax_flux import matmul_reduce_scatter
    from jax_flux.gemm_rs import reference

    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(32, 24, 16, jnp.float32, seed=5)

    def loss(op):
        f = jax.shard_map(op, mesh=mesh, in_specs=(P(), P()), out_specs=P("tp"))
        return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))

    dx, dw = loss(lambda x, w: matmul_reduce_scatter(x, w, "tp", impl=impl))(x, w)
    rdx, rdw = loss(lambda x, w: reference(x, w, "tp"))(x, w)
    assert testing.relative_error(dw, np.asarray(rdw, np.float64)) < 1e-5
    assert testing.relative_error(dx, np.asarray(rdx, np.float64)) < 1e-5


def _out_and_grads(fn, mesh, in_specs, out_spec, x, w, seed=4):
    """(out, dx, dw) of the global view of ``fn`` over ``mesh``, the gradients for
    a random cotangent (a permutation of the output's rows would show)."""
    import jax

    f = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec)
    shape = jax.eval_shape(f, x, w)
    g = jnp.asarray(np.random.default_rng(seed).standard_normal(shape.shape), shape.dtype)

    def run(x, w):
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(g))

    return jax.jit(run)(x, w)


def _assert_close(got, want, tol=1e-5):
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert testing.relative_error(a, np.asarray(b, np.float64)) < tol


# (x spec, w spec, out spec, x shape, w shape) on a ("dp", "tp") mesh, by op and
# by which operand varies over "dp": x split over dp with a weight replicated along
# it (data x tensor parallelism), or x replicated along dp with a weight per group.
_DP_CASES = {
    ("all_gather_matmul", "x"): ((("dp", "tp"), None), (None, "tp"), ("dp", "tp"),
                                 (32, 24), (24, 16)),
    ("all_gather_matmul", "w"): (("tp", None), ("dp", "tp"), ("dp", "tp"), (16, 24), (48, 16)),
    ("matmul_reduce_scatter", "x"): (("dp", "tp"), ("tp", None), (("dp", "tp"), None),
                                     (32, 24), (24, 16)),
    ("matmul_reduce_scatter", "w"): ((None, "tp"), (("dp", "tp"), None),
                                     (("dp", "tp"), None), (16, 24), (48, 16)),
}


@pytest.mark.parametrize("varying", ["x", "w"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_gradients_on_a_data_and_tensor_parallel_mesh(op, impl, varying):
    # A gradient varies over "dp" where its operand does not: it must be summed
    # over dp exactly where JAX's autodiff of the lax collective sums it.
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jax_flux.ag_gemm import reference as ag_reference
    from jax_flux.gemm_rs import reference as rs_reference

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    x_spec, w_spec, out_spec, x_shape, w_shape = _DP_CASES[op, varying]
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) / 5, jnp.float32)
    ours = testing.OPS[op]
    ref = {"all_gather_matmul": ag_reference, "matmul_reduce_scatter": rs_reference}[op]

    specs = (P(*x_spec), P(*w_spec)), P(*out_spec)
    _assert_close(_out_and_grads(lambda x, w: ours(x, w, "tp", impl=impl), mesh, *specs, x, w),
                  _out_and_grads(lambda x, w: ref(x, w, "tp"), mesh, *specs, x, w))


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


@pytest.mark.parametrize("axes", [("a", "b"), ("b", "a")], ids=["ab", "ba"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_a_tuple_of_axes_is_one_axis(op, impl, axes):
    # As lax collectives take it: ranks numbered in the tuple's order (first
    # major), whatever the mesh's order; with a "dp" axis making two groups.
    # Forward and gradients against the lax reference on the same tuple.
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jax_flux.ag_gemm import reference as ag_reference
    from jax_flux.gemm_rs import reference as rs_reference

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("dp", "a", "b"))
    if op == "all_gather_matmul":
        specs = (P(("dp", *axes)), P(None, axes)), P("dp", axes)
        ref = ag_reference
    else:
        specs = (P("dp", axes), P(axes)), P(("dp", *axes))
        ref = rs_reference
    x, w, _, _ = testing.random_operands(64, 24, 16, jnp.float32, seed=21)
    ours = testing.OPS[op]

    _assert_close(_out_and_grads(lambda x, w: ours(x, w, axes, impl=impl), mesh, *specs, x, w),
                  _out_and_grads(lambda x, w: ref(x, w, axes), mesh, *specs, x, w))


@pytest.mark.parametrize("batched", ["x", "x,w"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_vmap_over_the_op(op, impl, batched):
    # jax.vmap of the global-view function (shard_map pushes it inside): a batch of
    # problems, with the weight shared or batched too; the fused kernel runs once
    # an element. Output and gradients for a random cotangent against the reference.
    import jax

    from jax_flux.ag_gemm import reference as ag_reference
    from jax_flux.gemm_rs import reference as rs_reference

    mesh = mesh_of(8)
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.standard_normal((3, 32, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3 if "w" in batched else 1, 24, 16)) / 5, jnp.float32)
    w = w if "w" in batched else w[0]
    in_specs, out_spec = testing._SPECS[op]
    w_axis = 0 if "w" in batched else None

    def run(fn):
        f = jax.vmap(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec),
                     in_axes=(0, w_axis))
        g = jnp.asarray(np.random.default_rng(5).standard_normal((3, 32, 16)), jnp.float32)

        def with_grads(x, w):
            out, vjp = jax.vjp(f, x, w)
            return (out, *vjp(g))

        return jax.jit(with_grads)(x, w)

    ref = {"all_gather_matmul": ag_reference, "matmul_reduce_scatter": rs_reference}[op]
    got = run(lambda x, w: testing.OPS[op](x, w, "tp", impl=impl))
    want = run(lambda x, w: ref(x, w, "tp"))
    assert got[0].shape == (3, 32, 16)
    _assert_close(got, want)


@pytest.mark.parametrize("op", OPS)
def test_vmap_with_a_shared_weight_is_one_launch(op):
    # The batch folds into the kernel's rows: one launch (not a loop of them),
    # nested vmaps too, ragged rows; a weight per element still loops.
    import jax

    mesh = mesh_of(8)
    rng = np.random.default_rng(19)
    x = jnp.asarray(rng.standard_normal((2, 3, 40, 24)), jnp.float32)  # 5 rows a rank
    w = jnp.asarray(rng.standard_normal((24, 16)) / 5, jnp.float32)
    in_specs, out_spec = testing._SPECS[op]
    f = jax.shard_map(lambda x, w: testing.OPS[op](x, w, "tp", impl="fused"), mesh=mesh,
                      in_specs=in_specs, out_specs=out_spec)
    nested = jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(0, None))
    jaxpr = jax.make_jaxpr(nested)(x, w).jaxpr
    assert count_equations(jaxpr, ("jax_flux_triton_call",)) == 1
    assert count_equations(jaxpr, ("while", "scan")) == 0
    out = jax.jit(nested)(x, w)
    want = np.einsum("abmk,kn->abmn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert testing.relative_error(out, want) < 1e-5
    ws = jnp.stack([w, 2 * w])
    looped = jax.make_jaxpr(jax.vmap(f, in_axes=(0, 0)))(x[0, :2], ws).jaxpr
    assert count_equations(looped, ("while", "scan")) == 1
