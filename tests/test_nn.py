"""jax_flux.nn: the tensor-parallel layers in global view and inside a user's shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_flux import testing
from jax_flux.nn import ColumnParallelLinear, RowParallelLinear
from models import Llama, LlamaConfig
from tests.helpers import mesh_of
from tests.nn_helpers import dense, mlp, pair, x_of


def test_parameters_carry_their_sharding():
    col, row = pair(mesh_of(8), "xla")
    specs = nnx.get_partition_spec(nnx.state(col))
    assert specs["kernel"].get_value() == P(None, "tp", None)
    assert specs["bias"].get_value() == P("tp", None)
    specs = nnx.get_partition_spec(nnx.state(row))
    assert specs["kernel"].get_value() == P("tp", None)
    assert specs["bias"].get_value() == P(None)
    # Created sharded on the mesh: each device holds its slice only.
    assert col.kernel[...].sharding.shard_shape((16, 32, 2)) == (16, 4, 2)


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
def test_global_view_under_jit(impl):
    col, row = pair(mesh_of(8), impl)
    x = x_of()
    out = nnx.jit(mlp)(col, row, x)
    assert out.shape == (16, 2, 24)
    # Sequence-sharded output, in true sequence order.
    assert out.sharding.spec[0] == "tp"
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_kernels_stored_transposed(impl):
    # kernel_transposed=True: the column kernel [*out, in], the row kernel
    # [out, *in] (PyTorch's layout), holding the plain layout's values
    # transposed, read in place by the ops. The same outputs (sequence parallel
    # and decode) and gradients (transposed), with FSDP on a (dp, tp) mesh, in
    # global view and inside a user's shard_map.
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    kw = dict(batch_axis="dp", fsdp_axis="dp")
    col, row = pair(mesh, impl, **kw)
    colt, rowt = pair(mesh, impl, kernel_transposed=True, **kw)
    np.testing.assert_array_equal(colt.kernel[...], jnp.transpose(col.kernel[...], (1, 2, 0)))
    np.testing.assert_array_equal(rowt.kernel[...], row.kernel[...].T)
    assert nnx.get_partition_spec(nnx.state(colt))["kernel"].get_value() == P("tp", None, "dp")
    assert nnx.get_partition_spec(nnx.state(rowt))["kernel"].get_value() == P("dp", "tp")
    x = x_of(b=4, seed=10)
    for sp in (True, False):
        want = np.asarray(nnx.jit(lambda c, r, x: mlp(c, r, x, sp))(col, row, x), np.float64)
        got = nnx.jit(lambda c, r, x: mlp(c, r, x, sp))(colt, rowt, x)
        assert testing.relative_error(got, want) < 1e-6, sp

    def grads(col, row):
        loss = lambda c, r: jnp.sum(jnp.sin(mlp(c, r, x)))  # noqa: E731
        return nnx.state(nnx.jit(nnx.grad(loss, argnums=(0, 1)))(col, row))

    want, got = grads(col, row), grads(colt, rowt)
    pairs = ((got[0]["kernel"][...], jnp.transpose(want[0]["kernel"][...], (1, 2, 0))),
             (got[1]["kernel"][...], want[1]["kernel"][...].T),
             (got[0]["bias"][...], want[0]["bias"][...]))
    for a, b in pairs:
        assert testing.relative_error(a, np.asarray(b, np.float64)) < 1e-5
    assert got[1]["kernel"][...].sharding.spec == P("dp", "tp")  # stored as the kernel
    graph, state = nnx.split((colt, rowt))

    def body(state, x):
        c, r = nnx.merge(graph, state)
        return mlp(c, r, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(nnx.get_partition_spec(state),
                                                         P("tp", "dp")),
                              out_specs=P("tp", "dp")))
    assert testing.relative_error(f(state, x), dense(col, row, x)) < 1e-5
    with pytest.raises(ValueError, match="kernel_transposed must be a bool"):
        pair(mesh, impl, kernel_transposed="yes")


def test_replicated_decode_path():
    col, row = pair(mesh_of(8), "xla")
    x = x_of(s=1, seed=3)  # one position: cannot be split over 8 ranks
    out = nnx.jit(lambda c, r, x: mlp(c, r, x, sp=False))(col, row, x)
    assert testing.relative_error(out, dense(col, row, x)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_inside_a_users_shard_map_on_local_shards(impl):
    mesh = mesh_of(8)
    col, row = pair(mesh, impl)
    graph, state = nnx.split((col, row))
    specs = nnx.get_partition_spec(state)

    def body(state, x):  # local shards of the parameters and of the sequence
        c, r = nnx.merge(graph, state)
        return mlp(c, r, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P("tp")), out_specs=P("tp")))
    x = x_of(seed=5)
    assert testing.relative_error(f(state, x), dense(col, row, x)) < 1e-5


def test_bfloat16_compute_with_float32_params():
    mesh = mesh_of(8)
    col = ColumnParallelLinear(16, (32, 2), mesh=mesh, dtype=jnp.bfloat16, impl="ring",
                               rngs=nnx.Rngs(0))
    row = RowParallelLinear(32, 24, mesh=mesh, dtype=jnp.bfloat16, impl="ring", rngs=nnx.Rngs(1))
    assert col.kernel[...].dtype == jnp.float32
    x = x_of()
    out = nnx.jit(mlp)(col, row, x)
    assert out.dtype == jnp.bfloat16
    col64 = ColumnParallelLinear(16, (32, 2), mesh=mesh, rngs=nnx.Rngs(0))
    assert testing.relative_error(out, dense(col64, row, x)) < 3e-2


def test_bad_sizes_raise_at_construction():
    mesh = mesh_of(8)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear: output features \(12,\).*size 8"):
        ColumnParallelLinear(16, 12, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"RowParallelLinear: input features \(20, 4\).*size 8"):
        RowParallelLinear((20, 4), 16, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not the tensor-parallel axis 'model'"):
        ColumnParallelLinear(16, 16, mesh=mesh, axis_name="model", rngs=nnx.Rngs(0))
    from jax.sharding import Mesh

    dp_tp = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))
    with pytest.raises(ValueError, match=r"kernel \(15, 16\) dim 0 \(15\) is split over "
                                         r"fsdp_axis 'dp', not divisible by its size 2"):
        ColumnParallelLinear(15, 16, mesh=dp_tp, fsdp_axis="dp", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel \(16, 15\) dim 1"):
        RowParallelLinear(16, 15, mesh=dp_tp, fsdp_axis="dp", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fsdp_axis 'tp' overlaps the tensor-parallel axis"):
        ColumnParallelLinear(16, 16, mesh=dp_tp, fsdp_axis="tp", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fsdp_axis 'data' is not an axis of the mesh"):
        ColumnParallelLinear(16, 16, mesh=dp_tp, fsdp_axis="data", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"needs these divisible by 8: kv_heads 4 \(heads 8\)"):
        Llama(LlamaConfig(heads=8, kv_heads=4), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden 60 is not divisible by heads 8"):
        LlamaConfig(hidden=60)
    with pytest.raises(ValueError, match="heads 8 is not divisible by kv_heads 3"):
        LlamaConfig(kv_heads=3)


def test_wrong_input_width_is_a_clear_error():
    col, _ = pair(mesh_of(8), "xla")
    with pytest.raises(ValueError, match=r"expected x \[S, ..., 16\], got \(16, 2, 8\)"):
        col(jnp.ones((16, 2, 8)))


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_float32_results_from_bfloat16_compute(impl):
    # preferred_element_type, as nnx.Linear has it: bf16 operands, f32 results
    # (no bf16 rounding of the output), both paths: sequence parallel and decode.
    mesh = mesh_of(8)
    kw = dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32, impl=impl)
    col = ColumnParallelLinear(16, 32, mesh=mesh, rngs=nnx.Rngs(0), **kw)
    row = RowParallelLinear(32, 24, mesh=mesh, rngs=nnx.Rngs(1), **kw)
    x = x_of().astype(jnp.bfloat16)

    def f64(a):
        return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)

    for sp in (True, False):
        h = nnx.jit(lambda c, x: c(x, sequence_parallel=sp))(col, x)
        assert h.dtype == jnp.float32
        want = np.einsum("sbi,io->sbo", f64(x), f64(col.kernel[...]))
        assert testing.relative_error(h, want) < 2e-5
        h16 = h.astype(jnp.bfloat16)
        z = nnx.jit(lambda r, h: r(h, sequence_parallel=sp))(row, h16)
        assert z.dtype == jnp.float32
        assert testing.relative_error(z, f64(h16) @ f64(row.kernel[...])) < 2e-5


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_float8_weights_with_bfloat16_compute(impl):
    # Weight-only float8: kernels stored in e4m3 (drawn in float32, rounded;
    # biases float32), bfloat16 activations; the kernels reach the ops as
    # float8, both paths (sequence parallel and decode), against the host
    # product of the values as stored.
    mesh = mesh_of(8)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float8_e4m3fn, impl=impl, use_bias=True)
    col = ColumnParallelLinear(16, 32, mesh=mesh, rngs=nnx.Rngs(0), **kw)
    row = RowParallelLinear(32, 24, mesh=mesh, rngs=nnx.Rngs(1), **kw)
    assert col.kernel[...].dtype == jnp.float8_e4m3fn and col.bias[...].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(col.kernel[...], np.float32)))
    x = x_of().astype(jnp.bfloat16)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    if impl == "fused":  # no convert of the kernel (XLA's CPU dot widens it itself)
        assert "xf8E4M3FN>) -> tensor" not in nnx.jit(lambda c, x: c(x)).lower(col, x).as_text()
    for sp in (True, False):
        h = nnx.jit(lambda c, x: c(x, sequence_parallel=sp))(col, x)
        assert h.dtype == jnp.bfloat16
        want = np.einsum("sbi,io->sbo", f64(x), f64(col.kernel[...])) + f64(col.bias[...])
        assert testing.relative_error(h, want) < 2e-2
        z = nnx.jit(lambda r, h: r(h, sequence_parallel=sp))(row, h)
        assert testing.relative_error(z, f64(h) @ f64(row.kernel[...]) + f64(row.bias[...])) < 2e-2
    with pytest.raises(ValueError, match="param_dtype float8_e4m3fn needs dtype"):
        ColumnParallelLinear(16, 32, mesh=mesh, param_dtype=jnp.float8_e4m3fn, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl,transposed", [("xla", False), ("fused", False), ("fused", True)],
                         ids=["xla", "fused", "fused-kernel_transposed"])
def test_quantize_float8_with_a_scale_per_output_feature(impl, transposed):
    # A trained layer made weight-only float8: the kernel stored in e4m3 with
    # a float32 scale per output feature (placed as the bias), the result
    # (x @ kernel8) * scale + bias; against the host product of the values as
    # stored, and within float8's rounding of the layer before. Kernels
    # stored transposed too (what float8 wants, README).
    from jax_flux.quantize import quantize_float8

    mesh = mesh_of(8)
    col, row = pair(mesh, impl, dtype=jnp.bfloat16, kernel_transposed=transposed)
    x = x_of().astype(jnp.bfloat16)
    ranges = jnp.linspace(0.01, 3, 64).reshape(32, 2)  # column ranges
    col.kernel[...] = col.kernel[...] * (ranges[..., None] if transposed else ranges)
    before_col = np.asarray(nnx.jit(lambda c, x: c(x))(col, x), np.float64)
    for layer in (col, row):
        assert quantize_float8(layer) == 1
        assert layer.kernel[...].dtype == jnp.float8_e4m3fn
        assert layer.kernel_scale[...].sharding.spec == P(*layer.bias_sharding())
    assert col.kernel_scale[...].shape == (32, 2) and row.kernel_scale[...].shape == (24,)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    # Every column's largest magnitude is float8's largest.
    assert np.allclose(np.abs(_plain(col)).max(axis=0), 448)
    for sp in (True, False):
        h = nnx.jit(lambda c, x: c(x, sequence_parallel=sp))(col, x)
        want = (np.einsum("sbi,ifo->sbfo", f64(x), _plain(col)) *
                f64(col.kernel_scale[...]) + f64(col.bias[...]))
        assert h.dtype == jnp.bfloat16 and testing.relative_error(h, want) < 1e-2
        assert testing.relative_error(h, before_col) < 5e-2
    out = nnx.jit(mlp)(col, row, x)  # through both quantized layers
    assert out.dtype == jnp.bfloat16
    assert testing.relative_error(out, _dense_scaled(col, row, x)) < 2e-2
    with pytest.raises(ValueError, match="ColumnParallelLinear at .: kernel is already "
                                         "float8_e4m3fn"):
        quantize_float8(col)
    with pytest.raises(ValueError, match="no ColumnParallelLinear or RowParallelLinear in Rngs"):
        quantize_float8(nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype must be float8_e4m3fn or float8_e5m2"):
        quantize_float8(pair(mesh, impl)[0], jnp.bfloat16)


def _plain(layer):
    """The layer's kernel on the host (float64) in the plain [*in, *out] layout."""
    kernel = np.asarray(layer.kernel[...], np.float64)
    return np.transpose(kernel, np.argsort(layer._order()))


def _dense_scaled(col, row, x):
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h = (np.einsum("sbi,ifo->sbfo", f64(x), _plain(col)) * f64(col.kernel_scale[...]) +
         f64(col.bias[...]))
    h = np.asarray(jnp.asarray(h, jnp.bfloat16), np.float64)
    g = np.asarray(jnp.asarray(h[..., 0] / (1 + np.exp(-h[..., 0])) * h[..., 1], jnp.bfloat16),
                   np.float64)
    return (g @ _plain(row)) * f64(row.kernel_scale[...]) + f64(row.bias[...])
