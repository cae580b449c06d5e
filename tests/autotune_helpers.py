"""Helpers of the tests of impl="auto": tuning records to read, fresh functions that read
them, which impls a lowered program holds."""

import jax
import jax.numpy as jnp

from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, autotune, testing


def fresh_auto(op, mesh, grad=False):
    # testing.sharded memoises its jitted functions, and auto is resolved when
    # a call is traced: a new function each time sees the current records.
    return testing.sharded.__wrapped__(op, mesh, "auto", grad=grad)


def impls_in(text: str) -> set:
    """Which impls a lowered program holds: the kernel (a host callback on CPU
    devices), the lax collectives, the ring's permutes."""
    return {impl for impl, op in (("fused", "cpu_callback"), ("xla", "all_gather"),
                                  ("xla", "reduce_scatter"), ("ring", "collective_permute"))
            if op in text}


def record_times(op, m_local, k, n, *, fused=None, xla=None, ring=None, w_transposed=False):
    kind = jax.devices()[0].device_kind
    cfg = (AllGatherMatmulConfig if op == autotune.AG else MatmulReduceScatterConfig)(
        block_m=16, block_n=16, block_k=16)
    autotune.record(op, autotune.key(op, kind, m_local, k, n, jnp.float32, 8,
                                     w_transposed=w_transposed),
                    cfg if fused else None, fused,
                    baselines_ms={k_: v for k_, v in (("xla", xla), ("ring", ring)) if v})
