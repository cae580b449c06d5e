"""A shard_map harness for checking the ops, shared by tests, the demo and benchmarks.

Global view used throughout: X [M, K] and W [K, N].

* AG-GEMM (column parallel): X sharded by rows, W by columns; each rank
  computes all_gather(x) @ w = X @ W[:, its columns].
* GEMM-RS (row parallel): X sharded by columns, W by rows; each rank gets its
  rows of sum over ranks of x @ w = X @ W.

Both therefore equal X @ W, which the host computes in float64. With
``w_transposed`` the harness passes W as W^T [N, K] (sharded to match; the
ops' ``w_transposed=True``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_flux._precision import kernel_input_precision
from jax_flux.ops import all_gather_matmul, matmul_reduce_scatter

# Relative Frobenius error allowed against the float64 host reference, by the
# dtype of what is compared (float8: gradients of float8 operands, rounded to
# 3 or 2 mantissa bits).
TOLERANCE = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float16): 2e-3,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float8_e4m3fn): 8e-2,
    jnp.dtype(jnp.float8_e5m2): 1.6e-1,
}

# float32 operands multiplied in tensorfloat32 (10 mantissa bits), as XLA's dot
# and the fused kernels do on a GPU at precision DEFAULT or HIGH.
TF32_TOLERANCE = 1e-3


def tolerance(dtype, mma=None, *, precision=None, platform: str = "cpu") -> float:
    """The relative error allowed for a result compared in ``dtype``
    (``TOLERANCE``'s), or ``TF32_TOLERANCE`` where its float32 MMAs (``mma``,
    default ``dtype``) run tensorfloat32: on a GPU (``platform``), at a
    ``precision`` (the ops', None: ``jax_default_matmul_precision``) other
    than HIGHEST. CPU devices multiply float32 exactly at any precision. A
    precision only XLA runs (a preset of bfloat16 passes, a custom algorithm)
    gets bfloat16's."""
    tol = TOLERANCE[jnp.dtype(dtype)]
    mma = jnp.dtype(mma or dtype)
    if mma != jnp.float32:
        return tol
    try:
        run = kernel_input_precision("tolerance", precision, mma)
    except ValueError:  # a preset or algorithm only XLA runs (bfloat16 passes, say)
        return max(tol, TOLERANCE[jnp.dtype(jnp.bfloat16)])
    if platform in ("gpu", "cuda") and run == "tf32":
        tol = max(tol, TF32_TOLERANCE)
    return tol


OPS = {"all_gather_matmul": all_gather_matmul, "matmul_reduce_scatter": matmul_reduce_scatter}

# (in_specs, out_spec) of each op's global view.
_SPECS = {
    "all_gather_matmul": ((P("tp", None), P(None, "tp")), P(None, "tp")),
    "matmul_reduce_scatter": ((P(None, "tp"), P("tp", None)), P("tp", None)),
}


def _specs(op_name: str, w_transposed: bool):
    (sx, sw), out = _SPECS[op_name]
    return (sx, P(*reversed(tuple(sw))) if w_transposed else sw), out


def mesh(devices=None, axis_name: str = "tp") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis_name,))


def random_operands(m: int, k: int, n: int, dtype, seed: int = 0, w_dtype=None):
    """X [m, k] and W [k, n] from N(0, 1) (scaled for stable sums), as host float64 and jnp;
    W in ``w_dtype`` if given (default ``dtype``)."""
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal((m, k))
    w64 = rng.standard_normal((k, n)) / np.sqrt(k)
    x, w = jnp.asarray(x64, dtype), jnp.asarray(w64, w_dtype or dtype)
    # The reference sees exactly the rounded values the op sees.
    return x, w, np.asarray(x, np.float64), np.asarray(w, np.float64)


@functools.lru_cache(maxsize=None)
def sharded(op_name: str, mesh_: Mesh, impl: str = "auto", config=None, grad: bool = False, *,
            preferred_element_type=None, w_transposed: bool = False, precision=None):
    """Jitted global-view function of one op over ``mesh_``'s axis "tp" (the op's
    keyword arguments as given).

    With ``grad``, it returns (out, dX, dW) for the loss sum(out * G) where G
    is the third argument (a cotangent of out's global shape). With
    ``w_transposed`` its second argument is W^T, placed by
    ``place(..., w_transposed=True)`` (and dW comes back as dW^T).
    """
    in_specs, out_spec = _specs(op_name, w_transposed)
    op = OPS[op_name]

    def body(x, w):
        return op(x, w, "tp", impl=impl, config=config,
                  preferred_element_type=preferred_element_type, w_transposed=w_transposed,
                  precision=precision)

    fn = jax.shard_map(body, mesh=mesh_, in_specs=in_specs, out_specs=out_spec)
    if not grad:
        return jax.jit(fn)

    def with_grad(x, w, g):
        out, vjp = jax.vjp(fn, x, w)
        dx, dw = vjp(g)
        return out, dx, dw

    return jax.jit(with_grad)


def place(op_name: str, mesh_: Mesh, x, w, *, w_transposed: bool = False):
    """Puts X and W on the mesh in the op's input layout (W as W^T with
    ``w_transposed``, for ``sharded(..., w_transposed=True)``)."""
    (sx, sw), _ = _specs(op_name, w_transposed)
    w = jnp.asarray(w).T if w_transposed else w
    return jax.device_put(x, NamedSharding(mesh_, sx)), jax.device_put(w, NamedSharding(mesh_, sw))


def relative_error(out, ref64: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64 (Frobenius); NaN anywhere gives inf."""
    out64 = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out64)):
        return float("inf")
    return float(np.linalg.norm(out64 - ref64) / np.linalg.norm(ref64))
