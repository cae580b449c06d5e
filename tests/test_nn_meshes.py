"""jax_flux.nn on other meshes and layouts: a (dp, tp) mesh with the batch, and the
kernels too (FSDP), split over dp; batch-first activations; tensor parallelism
over a tuple of axes; a mesh with explicit axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_flux import testing
from jax_flux.nn import ColumnParallelLinear
from tests.helpers import mesh_of
from tests.nn_helpers import dense, mlp, pair, x_of


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_batch_split_over_a_data_parallel_axis(impl):
    # A (dp, tp) mesh: the batch (dim 1) over "dp", parameters replicated along it,
    # their gradients summed over it; against the same layers on one device.
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    col, row = pair(mesh, impl, batch_axis="dp")
    x = x_of(b=4, seed=8)
    out = nnx.jit(mlp)(col, row, x)
    assert tuple(out.sharding.spec)[:2] == ("tp", "dp")
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5

    def grads(col, row):
        loss = lambda c, r: jnp.sum(jnp.sin(mlp(c, r, x)))  # noqa: E731
        return jax.tree.leaves(nnx.to_pure_dict(nnx.state(
            nnx.jit(nnx.grad(loss, argnums=(0, 1)))(col, row))))

    want = grads(*pair(mesh_of(1), "xla"))
    got = grads(col, row)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
def test_batch_first_activations(impl):
    # sequence_dim=1: x [B, S, H] (MaxText's layout), S split over "tp" and B
    # over "dp"; the ops gather and scatter along S in place. Outputs (sequence
    # parallel and replicated decode) and gradients as the sequence-first
    # layers' on the transposed x, in global view and in a user's shard_map.
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    col, row = pair(mesh, impl, batch_axis="dp", sequence_dim=1)
    x = x_of(b=4, seed=10)  # [S, B, H]
    xb = jnp.swapaxes(x, 0, 1)
    want = np.swapaxes(dense(col, row, x), 0, 1)
    out = nnx.jit(mlp)(col, row, xb)
    assert out.shape == (4, 16, 24) and tuple(out.sharding.spec)[:2] == ("dp", "tp")
    assert testing.relative_error(out, want) < 1e-5
    decode = nnx.jit(lambda c, r, x: mlp(c, r, x, sp=False))(col, row, xb)
    assert testing.relative_error(decode, want) < 1e-5

    def grads(col, row, x):
        loss = lambda c, r: jnp.sum(jnp.sin(mlp(c, r, x)))  # noqa: E731
        return jax.tree.leaves(nnx.to_pure_dict(nnx.state(
            nnx.jit(nnx.grad(loss, argnums=(0, 1)))(col, row))))

    for a, b in zip(grads(col, row, xb), grads(*pair(mesh_of(1), "xla"), x)):
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-5
    graph, state = nnx.split((col, row))

    def body(state, x):
        return mlp(*nnx.merge(graph, state), x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(nnx.get_partition_spec(state),
                                                         P("dp", "tp")),
                              out_specs=P("dp", "tp")))
    assert testing.relative_error(f(state, xb), want) < 1e-5
    with pytest.raises(ValueError, match=r"expected x \[B, S, \.\.\., 16\], got \(16,"):
        col(jnp.ones((16, 16)))
    with pytest.raises(ValueError, match=r"sequence_dim must be 0 \(\[S, B, \.\.\.\]\) or 1"):
        ColumnParallelLinear(16, 8, mesh=mesh, sequence_dim=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_fsdp_parameters_split_over_the_data_parallel_axis_too(impl):
    # FSDP x TP on a (dp, tp) mesh: kernels stored split over "dp" as well (1/8
    # a device), gathered per call; outputs and gradients as on one device, in
    # global view and inside a user's shard_map over both axes.
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    col, row = pair(mesh, impl, batch_axis="dp", fsdp_axis="dp")
    assert nnx.get_partition_spec(nnx.state(col))["kernel"].get_value() == P("dp", "tp", None)
    assert nnx.get_partition_spec(nnx.state(row))["kernel"].get_value() == P("tp", "dp")
    assert col.kernel[...].sharding.shard_shape((16, 32, 2)) == (8, 8, 2)
    assert row.kernel[...].sharding.shard_shape((32, 24)) == (8, 12)
    x = x_of(b=4, seed=9)
    out = nnx.jit(mlp)(col, row, x)
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5

    def grads(col, row):
        loss = lambda c, r: jnp.sum(jnp.sin(mlp(c, r, x)))  # noqa: E731
        return nnx.state(nnx.jit(nnx.grad(loss, argnums=(0, 1)))(col, row))

    want = jax.tree.leaves(nnx.to_pure_dict(grads(*pair(mesh_of(1), "xla"))))
    got = grads(col, row)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(got)), want):
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-5
    # The kernels' gradients come back split like the kernels (reduce-scattered).
    assert got[0]["kernel"][...].sharding.shard_shape((16, 32, 2)) == (8, 8, 2)

    graph, state = nnx.split((col, row))
    specs = nnx.get_partition_spec(state)

    def body(state, x):  # local shards: 1/8 of each kernel, gathered over "dp" per call
        c, r = nnx.merge(graph, state)
        return mlp(c, r, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P("tp", "dp")),
                              out_specs=P("tp", "dp")))
    assert testing.relative_error(f(state, x), dense(col, row, x)) < 1e-5


@pytest.mark.parametrize("impl", ["ring", "fused"])
def test_tensor_parallel_over_a_tuple_of_axes(impl):
    # axis_name=("x", "y"): one tensor-parallel axis of 8 over a 2 x 4 mesh.
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    col, row = pair(mesh, impl, axis_name=("x", "y"))
    assert col.kernel[...].sharding.shard_shape((16, 32, 2)) == (16, 4, 2)
    x = x_of(seed=6)
    out = nnx.jit(mlp)(col, row, x)
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_a_mesh_with_explicit_axes(impl):
    # jax.make_mesh's default: shard_map wants its inputs laid out as in_specs
    # already, so the layers reshard them (jax_flux.nn.place).
    mesh = jax.make_mesh((8,), ("tp",))
    col, row = pair(mesh, impl)
    x = x_of(seed=7)
    out = nnx.jit(mlp)(col, row, x)
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5
    with jax.set_mesh(mesh):
        out = nnx.jit(mlp)(col, row, x)
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5
