"""The README's code examples run and are right."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def test_float8_mlp_example_matches_the_host():
    scope = {}
    exec(python_blocks()[1] + python_blocks()[2], scope)
    f8 = jnp.float8_e4m3fn
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 32)), f8)
    w1t = jnp.asarray(rng.standard_normal((128, 32)) / 6, f8)
    w2t = jnp.asarray(rng.standard_normal((32, 128)) / 11, f8)
    out = scope["mlp_fp8"](x, w1t, w2t)
    assert out.dtype == jnp.bfloat16
    x64, w1, w2 = (np.asarray(a, np.float64) for a in (x, w1t.T, w2t.T))
    h = np.asarray(jax.nn.gelu(jnp.asarray(x64 @ w1, jnp.bfloat16)).astype(f8), np.float64)
    ref = h @ w2
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 3e-2, err


def test_weight_only_float8_mlp_example_matches_the_host():
    scope = {}
    exec(python_blocks()[1] + python_blocks()[3], scope)
    f8, bf16 = jnp.float8_e4m3fn, jnp.bfloat16
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((64, 32)), bf16)
    w1t = jnp.asarray(rng.standard_normal((128, 32)) / 6, f8)
    w2t = jnp.asarray(rng.standard_normal((32, 128)) / 11, f8)
    out = scope["mlp_w8"](x, w1t, w2t)
    assert out.dtype == bf16
    x64, w1, w2 = (np.asarray(a, np.float64) for a in (x, w1t.T, w2t.T))
    h = np.asarray(jax.nn.gelu(jnp.asarray(x64 @ w1, bf16)), np.float64)
    ref = h @ w2
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


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
