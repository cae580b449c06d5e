"""Every impl of both ops against the float64 host reference and the lax collective,
in the same shard_map harness, forward and gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import testing
from tests.helpers import assert_close, cotangent, lax_reference, mesh_of, out_and_grads

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
    assert_close(out_and_grads(lambda x, w: ours(x, w, "tp", impl=impl), mesh, *specs, x, w),
                  out_and_grads(lambda x, w: ref(x, w, "tp"), mesh, *specs, x, w))


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

    assert_close(out_and_grads(lambda x, w: ours(x, w, axes, impl=impl), mesh, *specs, x, w),
                  out_and_grads(lambda x, w: ref(x, w, axes), mesh, *specs, x, w))


# What a profile shows of a launch: HLO's op_name metadata of the compiled
# program. The kernel (on CPU devices, the interpreter's callback) and the
# collectives of each impl, forward and backward.
_LAUNCH = re.compile(r" (custom-call|all-gather|reduce-scatter|collective-permute)(?:-start)?\("
                     r'.*op_name="([^"]*)"')


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_each_launch_is_named_by_its_op_and_impl(op, impl):
    mesh = mesh_of(4)
    x, w, _, _ = testing.random_operands(32, 16, 24, jnp.float32)
    g, _ = cotangent((32, 24), jnp.float32)
    xs, ws = testing.place(op, mesh, x, w)
    other = OPS[1 - OPS.index(op)]
    forward = testing.sharded(op, mesh, impl).lower(xs, ws).compile().as_text()
    names = {name for _, name in _LAUNCH.findall(forward)}
    assert names and all(f"/jax_flux.{op}[{impl}]/" in name for name in names), names
    # The backward's launch is the other op, named so inside this op's backward.
    backward = testing.sharded(op, mesh, impl, grad=True).lower(xs, ws, g).compile().as_text()
    names = {name for _, name in _LAUNCH.findall(backward)}
    assert any(f"/jax_flux.{op}[{impl}]/" in name for name in names), names
    assert any(f"/jax_flux.{op}.backward/jax_flux.{other}[{impl}]/" in name
               for name in names), names


@pytest.mark.parametrize("uses", ["both", "y", "gathered"])
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
def test_the_gathered_x_for_a_second_matmul(impl, uses):
    # y, xg = AG-GEMM(x, w1, return_gathered=True); z = xg @ w2: two weights of
    # one input, one all-gather. Gradients against lax's autodiff, including
    # the outputs the loss leaves unused (symbolic zero cotangents).
    mesh = mesh_of(4)
    rng = np.random.default_rng(0)
    x64, w1_64, w2_64 = (rng.standard_normal(s) for s in ((24, 16), (16, 8), (16, 12)))
    specs = (P("tp"), P(None, "tp"), P(None, "tp"))
    x, w1, w2 = (jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, s))
                 for a, s in zip((x64, w1_64, w2_64), specs))

    def ours(x, w1, w2):
        y, xg = jax_flux.all_gather_matmul(x, w1, "tp", impl=impl, return_gathered=True)
        return y, xg @ w2

    def lax_ref(x, w1, w2):
        xg = jax.lax.all_gather(x, "tp", axis=0, tiled=True)
        return xg @ w1, xg @ w2

    def loss(fn):
        f = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(P(None, "tp"),) * 2)

        def total(x, w1, w2):
            y, z = f(x, w1, w2)
            return {"both": (y * y).sum() + (z * z).sum(), "y": (y * y).sum(),
                    "gathered": (z * z).sum()}[uses]

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))

    gathered = jax.jit(jax.shard_map(
        lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", impl=impl, return_gathered=True),
        mesh=mesh, in_specs=specs[:2], out_specs=(P(None, "tp"), P()), check_vma=False))
    y, xg = gathered(x, w1)
    assert np.array_equal(np.asarray(xg), np.asarray(x))
    if impl == "fused":  # the kernel writes the gathered x: no all-gather beside it
        assert "stablehlo.all_gather" not in gathered.lower(x, w1).as_text()
    assert testing.relative_error(y, x64 @ w1_64) < 1e-5
    if impl == "fused":
        # The backward launches what the used outputs need: dx's GEMM-RS kernel
        # for y's cotangent, an XLA reduce-scatter for the gathered x's.
        text = loss(ours).lower(x, w1, w2).as_text()
        kernels, scatters = text.count("cpu_callback"), text.count("stablehlo.reduce_scatter")
        assert (kernels, scatters) == {"both": (2, 1), "y": (2, 0), "gathered": (1, 1)}[uses]
    (value, grads), (ref_value, ref_grads) = loss(ours)(x, w1, w2), loss(lax_ref)(x, w1, w2)
    assert abs(float(value) - float(ref_value)) < 1e-4 * abs(float(ref_value))
    for a, b in zip(grads, ref_grads):
        b = np.asarray(b, np.float64)  # w2's gradient is 0 where the loss leaves z out
        assert testing.relative_error(a, b) < 1e-5 if b.any() else not np.asarray(a).any()
