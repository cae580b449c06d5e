"""Model benchmark: one tensor-parallel transformer block, and a training step, per impl.

    python -m benchmarks.model --preset llama2-7b --layers 2        # on GPUs
    python -m benchmarks.model --quick                              # CPU smoke run
    python -m benchmarks.model --preset llama2-7b --layers 4 --scan-layers --remat full
    python -m benchmarks.model --preset llama2-70b --layers 2 --float8-weights  # + w8 decode

For each impl: forward+backward time of one decoder block on [S, B, H]
activations (sequence parallel), the time and tokens/s of one AdamW
training step of the model (--layers overrides the preset's depth so big
shapes fit), and of one decode step, replicated and token parallel (with
``--float8-weights`` also with the blocks' kernels in float8,
``jax_flux.quantize.quantize_float8``: weight-only float8 decode). Same process,
same parameters; the loss of every impl is checked against xla's before
anything is timed.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import harness  # noqa: E402
from jax_flux import remat  # noqa: E402
from jax_flux.quantize import quantize_float8  # noqa: E402
from models import PRESETS, Llama  # noqa: E402
from models.data import progressions  # noqa: E402
from models.blocks import Block, KVCache  # noqa: E402
from models.llama import cross_entropy  # noqa: E402


def block_step(cfg, mesh, impl, seq, batch, reps):
    block = Block(cfg, mesh, "tp", impl, nnx.Rngs(0), batch_axis="dp")
    x = jax.device_put(
        jnp.asarray(np.random.default_rng(0).standard_normal((seq, batch, cfg.hidden)), cfg.dtype),
        NamedSharding(mesh, P("tp", "dp")))
    positions = jnp.arange(seq)

    @nnx.jit
    def step(block, x):
        def loss(block, x):
            return jnp.mean(block(x, positions)[0].astype(jnp.float32) ** 2)
        return nnx.value_and_grad(loss, argnums=(0, 1))(block, x)

    (value, _) = step(block, x)
    return float(value), harness.time_fn(step, (block, x), reps=reps)


def train_step(cfg, mesh, impl, seq, batch, reps, fsdp=False):
    model = Llama(cfg, mesh=mesh, batch_axis="dp", impl=impl, fsdp=fsdp, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    tokens = jnp.asarray(progressions(np.random.default_rng(0), batch, seq + 1, cfg.vocab))

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(
            lambda m: cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]))(model)
        optimizer.update(model, grads)
        return loss

    first = float(step(model, optimizer, tokens))  # loss before any update: comparable
    return first, harness.time_fn(step, (model, optimizer, tokens), warmup=1, reps=reps)


def decode_step(cfg, mesh, impl, batch, token_parallel, reps, float8=False):
    """One decode step of ``batch`` sequences (an empty cache: the step's GEMMs and
    communication do not depend on how full it is; attention reads all of it);
    with ``float8`` the blocks' kernels are float8 (weight-only)."""
    model = Llama(cfg, mesh=mesh, batch_axis="dp", impl=impl, rngs=nnx.Rngs(0))
    if float8:
        quantize_float8(model.blocks)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (batch, 1)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab, (batch, 1)), jnp.int32)
    cache = KVCache.empty(cfg, batch, mesh, "tp", "dp")

    @nnx.jit
    def step(model, tokens, cache):
        logits, _ = model.decode_step(tokens, cache, token_parallel=token_parallel)
        return cross_entropy(logits, targets)

    first = float(step(model, tokens, cache))
    return first, harness.time_fn(step, (model, tokens, cache), reps=reps)


COLUMNS = ["what", "impl", "median_ms", "spread_pct", "tokens_per_s", "loss", "loss_vs_xla",
           "status"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--impls", default="xla,ring,fused")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size: a (dp, tp) mesh over the devices, the batch split "
                        "over dp")
    p.add_argument("--fsdp", action="store_true",
                   help="also time the train step with parameters split over --dp (FSDP)")
    p.add_argument("--scan-layers", action="store_true",
                   help="train step: the blocks in one scan over stacked parameters")
    p.add_argument("--remat", default="none", choices=remat.POLICIES,
                   help="train step: rematerialise each block with this policy")
    p.add_argument("--decode-batch", type=int, default=None,
                   help="sequences of the decode step (default 64; --quick: the device count)")
    p.add_argument("--float8-weights", action="store_true",
                   help="also time decode steps with the blocks' kernels in float8")
    p.add_argument("--kernels-transposed", action="store_true",
                   help="store the parallel layers' kernels transposed ([out, in])")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 rep (CPU smoke run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    preset = "tiny" if a.quick else a.preset
    cfg = PRESETS[preset]
    cfg = dataclasses.replace(cfg, layers=a.layers or cfg.layers, scan_layers=a.scan_layers,
                              remat=a.remat, kernels_transposed=a.kernels_transposed)
    seq = a.seq or (16 if a.quick else 2048)
    batch = a.batch or (2 if a.quick else 1) * a.dp
    reps = 1 if a.quick else a.reps
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    devices = gpus or jax.devices("cpu")[:8]
    if len(devices) % a.dp or batch % a.dp:
        p.error(f"--dp {a.dp} must divide the {len(devices)} devices and the batch {batch}")
    mesh = Mesh(np.asarray(devices).reshape(a.dp, -1), ("dp", "tp"))
    env = harness.environment(devices)
    rows, ref = [], {}
    decode_batch = a.decode_batch or (len(devices) if a.quick else 64)
    if decode_batch % a.dp:
        p.error(f"--decode-batch {decode_batch} must be divisible by --dp {a.dp}")
    benches = [("block fwd+bwd", seq * batch, lambda impl: block_step(
                    cfg, mesh, impl, seq, batch, reps)),
               ("train step", seq * batch, lambda impl: train_step(
                    cfg, mesh, impl, seq, batch, reps)),
               *([("train step, fsdp", seq * batch, lambda impl: train_step(
                    cfg, mesh, impl, seq, batch, reps, fsdp=True))] if a.fsdp else []),
               ("decode step", decode_batch, lambda impl: decode_step(
                    cfg, mesh, impl, decode_batch, False, reps))]
    if decode_batch % len(devices) == 0:
        benches.append(("decode step, token parallel", decode_batch, lambda impl: decode_step(
            cfg, mesh, impl, decode_batch, True, reps)))
    if a.float8_weights:
        for tp_decode in ([False, True] if decode_batch % len(devices) == 0 else [False]):
            what = "decode step, " + ("token parallel, " if tp_decode else "") + "float8 weights"
            benches.append((what, decode_batch, lambda impl, tp_decode=tp_decode: decode_step(
                cfg, mesh, impl, decode_batch, tp_decode, reps, float8=True)))
    for impl in [i for i in a.impls.split(",") if i]:
        for what, tokens, fn in benches:
            row = {"what": what, "impl": impl}
            loss, t = fn(impl)
            # Decode rows compare with xla's replicated decode (the same logits;
            # float8 weights: xla's replicated decode with them). The fsdp train
            # step computes the same loss as the plain one.
            key = what.replace(", fsdp", "")
            if what.startswith("decode"):
                key = "decode step" + (", float8 weights" if "float8" in what else "")
            ref.setdefault(key, loss)
            rel = abs(loss - ref[key]) / max(abs(ref[key]), 1e-30)
            rows.append(dict(row, median_ms=t.median_ms, spread_pct=t.spread_pct,
                             tokens_per_s=tokens / (t.median_ms * 1e-3), loss=loss,
                             loss_vs_xla=rel, status="ok" if rel < 2e-2 else "LOSS DIFFERS"))
            print(harness.format_row(rows[-1], COLUMNS))
    variant = ("" if a.dp == 1 else f"_dp{a.dp}") + ("_scan" if cfg.scan_layers else "") + (
        "" if cfg.remat == "none" else f"_remat-{cfg.remat}") + (
        "_wT" if cfg.kernels_transposed else "")
    base = os.path.join(a.out, f"model_{preset}_L{cfg.layers}{variant}_{env['platform']}"
                               f"{len(devices)}")
    notes = [f"Model {preset} with {cfg.layers} layers, seq {seq}, batch {batch}, "
             f"{cfg.dtype}; {a.dp} data-parallel group(s) x tensor parallel over "
             f"{len(devices) // a.dp} devices; kernels_transposed={cfg.kernels_transposed}; "
             f"train step with "
             f"scan_layers={cfg.scan_layers}, remat={cfg.remat!r}. Decode: one step of "
             f"{decode_batch} sequences on an empty cache, activations replicated (local "
             f"matmuls + all-reduce) or, token parallel, split over the ranks (AG-GEMM / "
             f"GEMM-RS); its loss is the cross entropy against random targets, compared with "
             f"xla's replicated step."]
    harness.write_report(base, f"jax_flux model benchmark: {preset}", env, rows, COLUMNS, notes,
                         bool(gpus))
    print(f"wrote {base}.csv/.md")
    return 1 if any(r.get("status") == "LOSS DIFFERS" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
