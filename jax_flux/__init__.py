"""jax_flux: Flux-style fused GEMM + collective ops for tensor parallelism in JAX.

The ops run inside ``jax.shard_map`` like ``lax`` collectives:

* ``all_gather_matmul(x, w, axis_name)``     = all_gather(x, tiled) @ w
* ``matmul_reduce_scatter(x, w, axis_name)`` = psum_scatter(x @ w, dim 0, tiled)
"""

import custom_calls as _custom_calls  # noqa: F401  (arranges Triton's mode before triton loads)
from custom_calls.binding import PeerTimeoutError
from jax_flux import errors, remat, workspace
from jax_flux._validate import IMPLS, SUPPORTED_DTYPES
from jax_flux.config import AllGatherMatmulConfig, MatmulReduceScatterConfig
from jax_flux.ops import all_gather_matmul, matmul_reduce_scatter

__version__ = "0.1.0"

__all__ = ["IMPLS", "SUPPORTED_DTYPES", "AllGatherMatmulConfig", "MatmulReduceScatterConfig",
           "PeerTimeoutError", "all_gather_matmul", "errors", "matmul_reduce_scatter", "remat",
           "workspace"]
