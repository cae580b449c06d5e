"""impl='ring' lowers to collective_permute only, forward and backward."""

import jax.numpy as jnp
import pytest

from jax_flux import testing
from tests.helpers import cotangent, mesh_of

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


def lowered_text(op, impl, grad):
    mesh = mesh_of(8)
    x, w, _, _ = testing.random_operands(32, 16, 16, jnp.float32)
    xs, ws = testing.place(op, mesh, x, w)
    fn = testing.sharded(op, mesh, impl, grad=grad)
    args = (xs, ws, cotangent((32, 16), jnp.float32)[0]) if grad else (xs, ws)
    return fn.lower(*args).as_text()


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "with_grad"])
@pytest.mark.parametrize("op", list(testing.OPS))
def test_ring_uses_only_collective_permute(op, grad):
    text = lowered_text(op, "ring", grad)
    assert "stablehlo.collective_permute" in text
    for name in COLLECTIVES:
        assert f"stablehlo.{name}" not in text, name


@pytest.mark.parametrize("op", list(testing.OPS))
def test_xla_impl_uses_the_collective(op):
    # The harness itself is sound: the xla impl does show its collective.
    text = lowered_text(op, "xla", False)
    expected = "all_gather" if op == "all_gather_matmul" else "reduce_scatter"
    assert f"stablehlo.{expected}" in text
