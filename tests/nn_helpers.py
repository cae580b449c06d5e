"""The column-then-row MLP the layer tests run, and its float64 dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_flux.nn import ColumnParallelLinear, RowParallelLinear


def pair(mesh, impl, use_bias=True, **kw):
    col = ColumnParallelLinear(16, (32, 2), mesh=mesh, use_bias=use_bias, impl=impl,
                               rngs=nnx.Rngs(0), **kw)
    row = RowParallelLinear(32, 24, mesh=mesh, use_bias=use_bias, impl=impl, rngs=nnx.Rngs(1),
                            **kw)
    if use_bias:  # nonzero biases, so they are checked too (placed as the parameters are)
        col.bias[...] = jax.device_put(jnp.linspace(-1, 1, 64).reshape(32, 2),
                                       col.bias[...].sharding)
        row.bias[...] = jax.device_put(jnp.linspace(1, 2, 24), row.bias[...].sharding)
    return col, row


def mlp(col, row, x, sp=True):
    h = col(x, sequence_parallel=sp)
    return row(jax.nn.silu(h[..., 0]) * h[..., 1], sequence_parallel=sp)


def dense(col, row, x):
    def f64(p):
        return 0.0 if p is None else np.asarray(p[...], np.float64)

    x = np.asarray(x, np.float64)
    h = np.einsum("sbi,ifo->sbfo", x, f64(col.kernel)) + f64(col.bias)
    g = h[..., 0] / (1 + np.exp(-h[..., 0])) * h[..., 1]
    return g @ f64(row.kernel) + f64(row.bias)


def x_of(s=16, b=2, h=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((s, b, h)), jnp.float32)
