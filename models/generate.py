"""Greedy generation with a KV cache: sequence-parallel prefill, then replicated decode.

    python -m models.generate --preset tiny --tp 8 --impl fused
    python -m models.generate --impl fused --batch 8 --token-parallel-decode
    python -m models.generate --impl fused --train-steps 100 --float8-weights --kernels-transposed

Prefill runs the prompt through AG-GEMM / GEMM-RS (sequence parallel); each
decode step runs one token per sequence with replicated activations (local
column-parallel matmuls, all-reduce after the row-parallel ones), or with
--token-parallel-decode the batch's tokens split over the ranks, through
AG-GEMM / GEMM-RS again (as Flux does for decode). Prints the
tokens/s of each phase and the generated tokens. Weights are random unless
--train-steps trains them first (on the synthetic progressions, which the
model then continues).
"""

from __future__ import annotations

import argparse
import sys
import time

from models._devices import emulate_cpu_devices

emulate_cpu_devices(8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_flux import errors  # noqa: E402
from jax_flux.quantize import quantize_float8  # noqa: E402
from models.config import PRESETS  # noqa: E402
from models.data import progressions  # noqa: E402
from models.llama import KVCache, copy_parameters  # noqa: E402
from models.train import build, train  # noqa: E402


@nnx.jit
def _prefill(model, tokens, cache):
    logits, cache = model.prefill(tokens, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@nnx.jit(static_argnames="token_parallel")
def _decode(model, token, cache, token_parallel=False):
    logits, cache = model.decode_step(token[:, None], cache, token_parallel=token_parallel)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def generate(model, prompt, new_tokens: int, log=print, token_parallel: bool = False):
    """Greedy continuation of prompt [B, S]: returns int32 [B, new_tokens].

    ``token_parallel``: decode steps split the B tokens over the tensor-parallel
    axis and run AG-GEMM / GEMM-RS (``Llama.decode_step``); B divisible by
    dp x tp.
    """
    batch, length = prompt.shape
    if length + new_tokens > model.cfg.max_seq:
        raise ValueError(f"prompt {length} + {new_tokens} new tokens exceed max_seq "
                         f"{model.cfg.max_seq}")
    cache = KVCache.empty(model.cfg, batch, model.mesh, model.axis_name, model.batch_axis)
    t0 = time.perf_counter()
    token, cache = _prefill(model, prompt, cache)
    token.block_until_ready()
    t_prefill = time.perf_counter() - t0
    out = [token]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token, cache = _decode(model, token, cache, token_parallel=token_parallel)
        out.append(token)
    out = jnp.stack(out, axis=1)
    out.block_until_ready()
    t_decode = time.perf_counter() - t0
    errors.check()  # a fused call gave up on a peer (with JAX_FLUX_ON_PEER_TIMEOUT=log)
    log(f"prefill: {batch * length} tokens in {t_prefill:.3f} s "
        f"({batch * length / t_prefill:.1f} tokens/s, first call includes compilation)")
    if new_tokens > 1:
        log(f"decode:  {batch * (new_tokens - 1)} tokens in {t_decode:.3f} s "
            f"({batch * (new_tokens - 1) / t_decode:.1f} tokens/s, first step compiles)")
    return np.asarray(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size (the batch is split; dp * tp devices)")
    p.add_argument("--impl", default="auto", choices=["auto", "xla", "ring", "fused"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16, help="divisible by --tp")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=0,
                   help="train on synthetic data first (with --impl xla for speed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the blocks' parameters and run them in one scan")
    p.add_argument("--token-parallel-decode", action="store_true",
                   help="decode with the batch's tokens split over --tp (AG-GEMM / GEMM-RS "
                        "instead of all-reduce; --batch divisible by --tp)")
    p.add_argument("--kernels-transposed", action="store_true",
                   help="store the parallel layers' kernels transposed ([out, in])")
    p.add_argument("--float8-weights", action="store_true",
                   help="decode with the blocks' kernels in float8, a scale per output feature "
                        "(jax_flux.quantize.quantize_float8; after --train-steps)")
    p.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                   help="of every matmul (LlamaConfig.matmul_precision)")
    a = p.parse_args(argv)
    if a.batch % a.dp:
        p.error(f"--batch {a.batch} must be divisible by --dp {a.dp}")
    model = build(a.preset, a.tp, a.impl, None, a.seed, a.dp, scan_layers=a.scan_layers,
                  kernels_transposed=a.kernels_transposed, matmul_precision=a.matmul_precision)
    if a.train_steps:
        trained, _ = train(a.preset, a.tp, a.train_steps, "xla", seed=a.seed,
                           log=lambda s: None, dp=a.dp)
        copy_parameters(trained, model)
    if a.float8_weights:
        quantize_float8(model.blocks)
    prompt = progressions(np.random.default_rng(a.seed + 7), a.batch, a.prompt_len,
                          model.cfg.vocab)
    out = generate(model, jnp.asarray(prompt), a.new_tokens,
                   token_parallel=a.token_parallel_decode)
    for b in range(a.batch):
        print(f"prompt {prompt[b].tolist()}\n  ->   {out[b].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
