"""Rematerialisation: jax_flux.remat's names and policy, for every impl.

A sequence-parallel block of two sublayers (AG-GEMM -> gelu -> GEMM-RS,
residual, RMS norm, AG-GEMM -> gelu -> GEMM-RS) under ``jax.checkpoint``:
how many collective matmuls the gradient runs, and that its values do not
change. Without remat the gradient runs each op twice (forward, and as the
other op's backward); a full remat recomputes both AG-GEMMs and the first
GEMM-RS (the norm after it needs its output); saving the tagged values
recomputes none.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import remat, testing
from tests.helpers import count_equations as _count
from tests.helpers import mesh_of

# Primitives of one collective matmul, by impl: the kernel launch, or the collective.
_COUNTED = {"fused": ("jax_flux_triton_call",), "xla": ("all_gather", "reduce_scatter")}


def _block_grad(mesh, impl, policy_name):
    def sublayer(h, w1, w2):
        y = jax.nn.gelu(jax_flux.all_gather_matmul(h, w1, "tp", impl=impl))
        return h + jax_flux.matmul_reduce_scatter(y, w2, "tp", impl=impl)

    def block(h, w1, w2, w3, w4):
        h = sublayer(h, w1, w2)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return sublayer(h, w3, w4)

    use, policy = remat.policy(policy_name)
    if use:
        block = jax.checkpoint(block, policy=policy)
    col, row = P(None, "tp"), P("tp", None)
    f = jax.shard_map(block, mesh=mesh, in_specs=(P("tp"), col, row, col, row),
                      out_specs=P("tp"))
    return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3, 4))


def _operands(h=16, f=24, m=32):
    rng = np.random.default_rng(7)
    shapes = [(m, h), (h, f), (f, h), (h, f), (f, h)]
    return [jnp.asarray(rng.standard_normal(s) / (np.sqrt(s[0]) if i else 1), jnp.float32)
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("policy_name,expected", [("none", 8), ("full", 11),
                                                  ("collective_matmuls", 8)])
@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_saving_the_tagged_values_recomputes_no_collective(impl, policy_name, expected):
    mesh = mesh_of(8)
    jaxpr = jax.make_jaxpr(_block_grad(mesh, impl, policy_name))(*_operands()).jaxpr
    assert _count(jaxpr, _COUNTED[impl]) == expected


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_rematerialised_gradient_equals_the_plain_one(impl):
    mesh = mesh_of(8)
    ops = _operands()
    want = jax.jit(_block_grad(mesh, "xla", "none"))(*ops)
    for policy_name in ("full", "collective_matmuls"):
        got = jax.jit(_block_grad(mesh, impl, policy_name))(*ops)
        for a, b in zip(want, got):
            assert testing.relative_error(b, np.asarray(a, np.float64)) < 1e-5, policy_name


def test_policy_names():
    assert remat.policy("none") == (False, None)
    assert remat.policy("full") == (True, None)
    assert remat.policy("collective_matmuls") == (True, remat.save_collective_matmuls)
    with pytest.raises(ValueError, match="remat policy must be one of"):
        remat.policy("dots")


def test_ring_tags_the_same_values():
    # The ring's values are built from ppermutes; its saved gradient runs none again.
    mesh = mesh_of(8)
    jaxprs = {name: jax.make_jaxpr(_block_grad(mesh, "ring", name))(*_operands()).jaxpr
              for name in remat.POLICIES}
    count = partial(_count, names=("ppermute",))
    assert count(jaxprs["collective_matmuls"]) == count(jaxprs["none"]) < count(jaxprs["full"])


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_the_gathered_x_output_is_saved_too(impl):
    # return_gathered's two outputs carry the policy's names: saving them, the
    # backward runs no collective matmul again (fused: the forward's kernel and
    # dx's; xla: the all-gather and the two reduce-scatters, of dy and of the
    # gathered x's cotangent), and the gradient is the plain one.
    mesh = mesh_of(8)

    def block(x, w1, w2):
        y, xg = jax_flux.all_gather_matmul(x, w1, "tp", impl=impl, return_gathered=True)
        return jax.nn.gelu(y) + xg @ w2

    def grad(policy_name):
        use, policy = remat.policy(policy_name)
        f = jax.checkpoint(block, policy=policy) if use else block
        f = jax.shard_map(f, mesh=mesh, in_specs=(P("tp"), P(None, "tp"), P(None, "tp")),
                          out_specs=P(None, "tp"))
        return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))

    ops = _operands()[:2] + [_operands()[1]]  # x [32, 16], w1 and w2 [16, 24]
    counts = {name: _count(jax.make_jaxpr(grad(name))(*ops).jaxpr, _COUNTED[impl])
              for name in remat.POLICIES}
    assert counts["collective_matmuls"] == counts["none"] == (2 if impl == "fused" else 3)
    assert counts["full"] > counts["none"], counts
    want = jax.jit(grad("none"))(*ops)
    got = jax.jit(grad("collective_matmuls"))(*ops)
    for a, b in zip(want, got):
        assert testing.relative_error(b, np.asarray(a, np.float64)) < 1e-5
