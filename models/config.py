"""Model hyper-parameters and presets.

``tiny`` is for tests and the CPU demo; the others carry the shapes of real
models for benchmarks (never allocated in tests).
"""

from __future__ import annotations

import dataclasses

from jax_flux import remat


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style decoder.

    Attributes:
      vocab: vocabulary size (divisible by the tensor-parallel size when the
        head is untied; padded vocabularies are the usual fix).
      hidden: model width H.
      layers: decoder blocks.
      heads: query heads; kv_heads: key/value heads (grouped-query attention,
        heads divisible by kv_heads; kv_heads divisible by the tp size, which
        splits whole groups).
      ffn: MLP width F.
      mlp: "swiglu" (Llama) or "gelu" (GPT-3: one up projection).
      max_seq: longest sequence the KV cache holds.
      rope_theta: rotary base; norm_eps: RMSNorm epsilon.
      tie_embeddings: the output head reuses the embedding table.
      dtype: compute dtype; param_dtype: parameter dtype.
      kernels_transposed: store the parallel layers' kernels transposed
        (``[out, in]``: PyTorch's and Megatron's layout; ``jax_flux.nn``'s
        ``kernel_transposed``), read in place by the ops: what Hopper's float8
        MMAs want (float8 training, and ``quantize_float8`` for decode).
      scan_layers: keep the blocks' parameters stacked along a leading layer
        dim and run them with one ``scan`` (as MaxText does): the program
        holds one block, so compile time no longer grows with depth. A
        different parameter layout from the unscanned model (same values
        when converted, see ``models.llama.copy_parameters``).
      remat: rematerialise each block in the backward pass (``jax_flux.
        remat.POLICIES``): "none"; "full", save only the block's input;
        "collective_matmuls", save the jax_flux ops' results and gathered
        inputs, recompute the rest, so the backward pass communicates no
        more than without remat.
      matmul_precision: of every matmul of the model (the parallel layers'
        and attention's), as ``lax.dot_general``'s ``precision`` (MaxText's
        ``matmul_precision``): None (``jax_default_matmul_precision``),
        "default", "high" or "highest"; it matters for float32 on GPUs
        (tensorfloat32 unless "highest").
    """

    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 8
    kv_heads: int = 8
    ffn: int = 128
    mlp: str = "swiglu"
    max_seq: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    kernels_transposed: bool = False
    scan_layers: bool = False
    remat: str = "none"
    matmul_precision: str | None = None

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        remat.policy(self.remat)  # raises a ValueError naming the choices
        if self.matmul_precision not in (None, "default", "high", "highest"):
            raise ValueError(f"matmul_precision must be None, 'default', 'high' or 'highest', "
                             f"got {self.matmul_precision!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def check_tp(self, tp: int) -> None:
        """Raises a ValueError naming what does not split over ``tp`` ranks."""
        problems = []
        if self.kv_heads % tp:
            problems.append(f"kv_heads {self.kv_heads} (heads {self.heads})")
        if self.ffn % tp:
            problems.append(f"ffn {self.ffn}")
        if not self.tie_embeddings and self.vocab % tp:
            problems.append(f"vocab {self.vocab}")
        if problems:
            raise ValueError(f"tensor parallelism over {tp} ranks needs these divisible by {tp}: "
                             + ", ".join(problems))

    def num_params(self) -> int:
        h, f, hd = self.hidden, self.ffn, self.head_dim
        attn = h * (self.heads + 2 * self.kv_heads) * hd + self.heads * hd * h
        mlp = h * f * (2 if self.mlp == "swiglu" else 1) + f * h
        head = 0 if self.tie_embeddings else self.vocab * h
        return self.vocab * h + self.layers * (attn + mlp + 2 * h) + h + head


PRESETS = {
    "tiny": LlamaConfig(),
    "llama2-7b": LlamaConfig(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32,
                             ffn=11008, max_seq=4096, dtype="bfloat16"),
    "llama2-70b": LlamaConfig(vocab=32000, hidden=8192, layers=80, heads=64, kv_heads=8,
                              ffn=28672, max_seq=4096, dtype="bfloat16"),
    # GPT-3 175B's shapes (Flux's benchmark model) in this decoder: GELU MLP,
    # vocabulary padded from 50257 to a multiple of 128.
    "gpt3-175b": LlamaConfig(vocab=50304, hidden=12288, layers=96, heads=96, kv_heads=96,
                             ffn=49152, mlp="gelu", max_seq=2048, tie_embeddings=True,
                             dtype="bfloat16"),
}
