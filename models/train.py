"""Train the decoder on synthetic tokens with optax AdamW, tensor + sequence parallel.

    python -m models.train --preset tiny --tp 8 --steps 20 --impl fused
    python -m models.train --preset tiny --scan-layers --remat collective_matmuls
    python -m models.train --preset tiny --dp 2 --tp 4 --impl fused

Runs on the first --dp x --tp GPUs, or on emulated CPU devices when there are none
(the fused kernels then run through Triton's interpreter: slow, but the real
protocol). Prints step, loss and tokens/s per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from models._devices import emulate_cpu_devices

emulate_cpu_devices(8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jax_flux import errors, remat  # noqa: E402
from models._devices import pick_devices  # noqa: E402
from models.config import PRESETS  # noqa: E402
from models.data import progressions  # noqa: E402
from models.llama import Llama, cross_entropy  # noqa: E402


def build(preset: str, tp: int, impl: str, dtype: str | None = None, seed: int = 0, dp: int = 1,
          fsdp: bool = False, **overrides):
    """The preset's model on a (dp, tp) mesh of the first dp * tp devices, the batch
    split over "dp" (with ``fsdp``, the parameters too); ``dtype`` and
    ``overrides`` (LlamaConfig fields: scan_layers, remat, ...) replace the
    preset's values."""
    changes = dict(overrides, **({"dtype": dtype} if dtype else {}))
    cfg = dataclasses.replace(PRESETS[preset], **changes)
    devices = pick_devices(dp * tp, "--dp x --tp" if dp > 1 else "--tp")
    mesh = Mesh(np.asarray(devices).reshape(dp, tp), ("dp", "tp"))
    return Llama(cfg, mesh=mesh, batch_axis="dp", impl=impl, fsdp=fsdp, rngs=nnx.Rngs(seed))


def loss_fn(model, tokens):
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


@nnx.jit
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


def train(preset="tiny", tp=8, steps=20, impl="auto", batch=4, seq=32, lr=3e-3, dtype=None,
          seed=0, checkpoint_dir=None, restore=False, log=print, dp=1, **overrides):
    """Trains and returns (model, losses); ``dp`` and ``overrides`` as in ``build``."""
    model = build(preset, tp, impl, dtype, seed, dp, **overrides)
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.01), wrt=nnx.Param)
    if restore:
        _restore(model, optimizer, checkpoint_dir)
    rng = np.random.default_rng(seed + 1)
    losses = []
    for step in range(1, steps + 1):
        tokens = jnp.asarray(progressions(rng, batch, seq + 1, model.cfg.vocab))
        t0 = time.perf_counter()
        loss = float(train_step(model, optimizer, tokens))
        dt = time.perf_counter() - t0
        errors.check()  # a fused call of this step gave up on a peer (JAX_FLUX_ON_PEER_TIMEOUT=log)
        losses.append(loss)
        log(f"step {step:4d}  loss {loss:.4f}  tokens/s {batch * seq / dt:10.1f}")
    if checkpoint_dir:
        _save(model, optimizer, checkpoint_dir)
    return model, losses


def _save(model, optimizer, path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, {"model": nnx.state(model), "opt": nnx.state(optimizer)}, force=True)


def _restore(model, optimizer, path):
    import orbax.checkpoint as ocp

    target = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, target)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["opt"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size (the batch is split; dp * tp devices)")
    p.add_argument("--fsdp", action="store_true",
                   help="store the parameters (and optimizer state) split over --dp too")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--impl", default="auto", choices=["auto", "xla", "ring", "fused"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32, help="sequence length (divisible by --tp)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the blocks' parameters and run them in one scan")
    p.add_argument("--remat", default="none", choices=remat.POLICIES,
                   help="rematerialise each block; collective_matmuls saves the jax_flux ops' "
                        "results (no communication recomputed)")
    p.add_argument("--checkpoint-dir", default=None, help="save model+optimizer here at the end")
    p.add_argument("--restore", action="store_true", help="start from --checkpoint-dir")
    p.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                   help="of every matmul (LlamaConfig.matmul_precision; float32 on GPUs: "
                        "tensorfloat32 unless highest)")
    a = p.parse_args(argv)
    if a.restore and not a.checkpoint_dir:
        p.error("--restore needs --checkpoint-dir")
    _, losses = train(a.preset, a.tp, a.steps, a.impl, a.batch, a.seq, a.lr, a.dtype, a.seed,
                      a.checkpoint_dir, a.restore, dp=a.dp, fsdp=a.fsdp,
                      scan_layers=a.scan_layers, remat=a.remat,
                      matmul_precision=a.matmul_precision)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
