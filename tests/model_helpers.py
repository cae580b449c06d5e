"""What the model tests share: the tiny preset, token batches, one AdamW step, the
one-device reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import PRESETS, Llama
from models.data import progressions
from models.llama import cross_entropy
from tests.helpers import mesh_of

CFG = PRESETS["tiny"]


def _tokens(batch=2, length=17, seed=0):
    return jnp.asarray(progressions(np.random.default_rng(seed), batch, length, CFG.vocab))


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _step(model, tokens):
    """Logits, parameter gradients and parameters after one AdamW step (on the host)."""
    logits, grads, _ = _adamw_step(model, tokens)
    return _host(logits), _host(nnx.state(grads)), _host(nnx.state(model, nnx.Param))


def _adamw_step(model, tokens):
    """One AdamW step of ``model``: (logits, gradients, the optimizer), on the devices."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def run(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:]), logits

        (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return logits, grads

    logits, grads = run(model, optimizer, tokens)
    return logits, grads, optimizer


def single_device_step():
    """The one-device model's logits, gradients and parameters after one AdamW
    step on ``_tokens()`` (the ``single_device`` fixture, tests/conftest.py)."""
    model = Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(0))
    return _step(model, _tokens())


def _stacked(state):
    """A loop model's (host) state in the scanned layout."""
    tree = nnx.to_pure_dict(state)
    blocks = tree.pop("blocks")
    tree["blocks"] = jax.tree.map(lambda *a: np.stack(a), *[blocks[i] for i in sorted(blocks)])
    return tree
