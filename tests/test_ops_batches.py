"""Batches of problems and row layouts of x, every impl against lax in the same
shard_map harness: jax.vmap over the ops (the fused impl folds a batch sharing
w into its one launch), x with middle dims, and gathering / scattering along
a later dim (lax's axis / scatter_dimension)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import testing
from tests.helpers import assert_close, count_equations, mesh_of, out_and_grads

OPS = list(testing.OPS)


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
    assert_close(got, want)


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


# Gathering or scattering along a dim after the first (lax's axis /
# scatter_dimension): x [b, s, h] with the sequence sharded (MaxText), and a
# 4-D x gathered along dim 2 counted from the end, against lax in the same
# harness, output and gradients; the fused impl in one launch.
_ROW_DIM_CASES = [((3, 40, 24), 1), ((2, 2, 24, 5, 16), -3)]


@pytest.mark.parametrize("case", range(len(_ROW_DIM_CASES)))
@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_gathered_or_scattered_along_a_later_dim(op, impl, case):
    from jax import lax

    mesh = mesh_of(8)
    shape, dim = _ROW_DIM_CASES[case]
    nd = len(shape)
    rng = np.random.default_rng(23 + case)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((shape[-1], 16)) / 5, jnp.float32)
    spec = [None] * nd
    if op == "all_gather_matmul":
        spec[dim] = "tp"  # x sharded along the gathered dim; w's columns; y's columns
        in_specs, out_spec = (P(*spec), P(None, "tp")), P(*[None] * (nd - 1), "tp")
        fn = lambda x, w: jax_flux.all_gather_matmul(x, w, "tp", axis=dim, impl=impl)  # noqa: E731
        ref = lambda x, w: lax.all_gather(x, "tp", axis=dim, tiled=True) @ w  # noqa: E731
    else:
        spec[-1] = "tp"  # x's contraction dim and w's rows sharded; z scattered along dim
        out = [None] * nd
        out[dim] = "tp"
        in_specs, out_spec = (P(*spec), P("tp", None)), P(*out)
        fn = lambda x, w: jax_flux.matmul_reduce_scatter(  # noqa: E731
            x, w, "tp", scatter_dimension=dim, impl=impl)
        ref = lambda x, w: lax.psum_scatter(x @ w, "tp", scatter_dimension=dim % nd,  # noqa: E731
                                            tiled=True)
    got = out_and_grads(fn, mesh, in_specs, out_spec, x, w)
    want = out_and_grads(ref, mesh, in_specs, out_spec, x, w)
    assert got[0].shape == (*shape[:-1], 16)
    assert_close(got, want)
    if impl == "fused":
        f = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec)
        jaxpr = jax.make_jaxpr(f)(x, w).jaxpr
        assert count_equations(jaxpr, ("jax_flux_triton_call",)) == 1
        assert count_equations(jaxpr, ("while", "scan")) == 0


def test_the_gathered_x_along_a_later_dim():
    mesh = mesh_of(8)
    rng = np.random.default_rng(29)
    x = jnp.asarray(rng.standard_normal((3, 40, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 16)) / 5, jnp.float32)

    def body(x, w):
        y, xg = jax_flux.all_gather_matmul(x, w, "tp", axis=1, impl=impl,
                                           return_gathered=True)
        return y, xg[None]  # every rank's gathered x, stacked

    for impl in ("xla", "fused"):
        y, xg = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "tp"), P(None, "tp")),
                                      out_specs=(P(None, None, "tp"), P("tp"))))(x, w)
        assert testing.relative_error(y, np.asarray(x, np.float64) @ np.asarray(w)) < 1e-5
        assert xg.shape == (8, 3, 40, 24)
        for rank in range(8):
            np.testing.assert_array_equal(xg[rank], x)  # the whole x, in every rank


# x with middle dims, as Megatron lays out activations ([s, b, h], sequence
# split over tp): gathered / scattered along dim 0, the middle dims going
# along, as lax.all_gather / psum_scatter then @ treat them.
_ND_SPECS = {  # (x, w), out: AG gathers x's rows, RS reduces over x's last dim
    "all_gather_matmul": ((P("tp"), P(None, "tp")), P(None, None, None, "tp")),
    "matmul_reduce_scatter": ((P(None, None, None, "tp"), P("tp", None)), P("tp")),
}


def _lax_nd(op, x, w):
    if op == "all_gather_matmul":
        return jax.lax.all_gather(x, "tp", axis=0, tiled=True) @ w
    return jax.lax.psum_scatter(x @ w, "tp", scatter_dimension=0, tiled=True)


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_x_with_middle_dims(op, impl):
    mesh = mesh_of(4)
    (sx, sw), so = _ND_SPECS[op]
    x64 = np.random.default_rng(0).standard_normal((12, 3, 2, 16))  # [s, b, heads, h]
    w64 = np.random.default_rng(1).standard_normal((16, 8)) / 4
    g64 = np.random.default_rng(2).standard_normal((12, 3, 2, 8))
    x, w, g = (jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, s))
               for a, s in ((x64, sx), (w64, sw), (g64, so)))

    def run(fn):
        f = jax.shard_map(fn, mesh=mesh, in_specs=(sx, sw), out_specs=so)
        out, vjp = jax.vjp(jax.jit(f), x, w)
        return (out, *vjp(g))

    out, dx, dw = run(lambda x, w: testing.OPS[op](x, w, "tp", impl=impl))
    ref = run(functools.partial(_lax_nd, op))
    assert out.shape == (12, 3, 2, 8) and dx.shape == x.shape and dw.shape == w.shape
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    for a, b in zip((out, dx, dw), ref):
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-5
