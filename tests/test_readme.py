"""The README's code examples run and are right."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def test_quickstart_has_exactly_two_lines():
    blocks = re.findall(r"## Quickstart.*?```bash\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 2


def test_mlp_example_matches_dense_mlp():
    scope = {}
    exec(python_blocks()[1], scope)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((32, 128)) / 6, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((128, 32)) / 11, jnp.float32)
    out = scope["mlp"](x, w1, w2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.nn.gelu(x @ w1) @ w2),
                               rtol=1e-4, atol=1e-4)
