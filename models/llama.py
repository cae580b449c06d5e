"""A Llama-style decoder with tensor + sequence parallelism through jax_flux.nn.

Written in global view: call it under ``jax.jit`` with parameters sharded on
``mesh`` (they are created sharded); each parallel layer runs its jax_flux op
in a shard_map of its own. Activations between blocks are ``[S, B, H]``
(sequence first), sharded along S over the tensor-parallel axis during
training and prefill (sequence parallelism), and along B over ``batch_axis``
(data parallelism) if given; replicated over the tensor-parallel axis during
decode, or split by token (``decode_step(token_parallel=True)``).

The blocks (``models.blocks``) run in a Python loop, or in one ``scan`` over
stacked parameters (``cfg.scan_layers``), each optionally rematerialised
(``cfg.remat``). The embedding is vocab-parallel (vocab / tp rows a rank, the
lookup's sum reduce-scattered into the sequence-parallel layout); with
``fsdp`` every parameter but the norms is split over the batch axis too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_flux import remat
from jax_flux.nn import (ColumnParallelLinear, _ParallelLinear, axis_size, column_parallel,
                         place, relayout)
from models.blocks import (Block, KVCache, RMSNorm, _axes_size, _axis_names,
                           _layer_options, rows_to_tokens, tokens_to_rows)
from models.config import LlamaConfig


class Llama(nnx.Module):
    """The decoder. ``model(tokens)`` -> logits; ``prefill`` / ``decode_step`` with a KVCache.

    Args:
      cfg: hyper-parameters.
      mesh: device mesh with a tensor-parallel axis ``axis_name`` (size 1 for
        a single device).
      batch_axis: mesh axis (or tuple of axes) the batch is split over (data
        parallelism; parameters are replicated along it and their gradients
        summed over it), or None.
      fsdp: store the parameters split over ``batch_axis`` as well (FSDP /
        ZeRO-3, MaxText's "fsdp" axis): every parallel layer's kernel along
        its other dim (``jax_flux.nn``'s ``fsdp_axis``) and the embedding
        along hidden; each is gathered when used and its gradient comes back
        reduce-scattered. Norm scales stay replicated.
      impl: jax_flux impl of every parallel layer ("xla", "ring", "fused",
        "auto").
      rngs: ``nnx.Rngs`` for initialisation (same seed, same parameters, on
        any mesh).

    Raises:
      ValueError: at construction, when heads, kv heads, ffn or vocab do not
        split over the axis, or ``batch_axis`` is not a mesh axis; at call,
        when the batch does not split over ``batch_axis``.
    """

    def __init__(self, cfg: LlamaConfig, *, mesh: Mesh, axis_name: str = "tp",
                 batch_axis=None, impl: str = "auto", fsdp: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mesh = mesh
        self.axis_name = axis_name
        self.batch_axis = batch_axis
        self.impl = impl
        self.tp = axis_size(mesh, axis_name)
        batch_axes = _axis_names(batch_axis)
        if set(_axis_names(axis_name)) & set(batch_axes) or not (set(batch_axes) <=
                                                                set(mesh.axis_names)):
            raise ValueError(f"batch_axis {batch_axis!r} must name mesh axes other than the "
                             f"tensor-parallel axis {axis_name!r}; the mesh has "
                             f"{mesh.axis_names}")
        self.dp = _axes_size(mesh, batch_axis)
        if fsdp and not batch_axis:
            raise ValueError("fsdp=True splits the parameters over batch_axis: give one")
        self.fsdp_axis = batch_axis if fsdp else None
        if fsdp and cfg.hidden % self.dp:
            raise ValueError(f"fsdp=True: hidden {cfg.hidden} is not divisible by the size "
                             f"{self.dp} of batch_axis {batch_axis!r}")
        cfg.check_tp(self.tp)
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        # Vocab-parallel (Megatron's VocabParallelEmbedding): each rank holds
        # vocab / tp rows (and with fsdp, hidden / dp of them).
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab, cfg.hidden), pdt),
                               out_sharding=(axis_name, self.fsdp_axis), mesh=mesh)
        layer_args = (cfg, mesh, axis_name, impl, rngs, batch_axis, self.fsdp_axis)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(*layer_args)
        else:
            self.blocks = nnx.List([Block(*layer_args) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, mesh, pdt)
        # Logits in float32 straight from the head's GEMM (float32 accumulation,
        # no rounding to a 16-bit compute dtype before the softmax).
        self.head = None if cfg.tie_embeddings else ColumnParallelLinear(
            cfg.hidden, cfg.vocab, preferred_element_type=jnp.float32,
            **_layer_options(cfg, mesh, axis_name, impl, rngs, batch_axis, self.fsdp_axis))


    def _embedding(self):
        """The embedding table [vocab, H] split over vocab only (with fsdp,
        gathered over the fsdp axis, its gradient reduce-scattered back: pinned
        as stored first, as jax_flux.nn does)."""
        table = self.embed[...]
        if self.fsdp_axis is not None:
            table = place(table, self.mesh, P(self.axis_name, self.fsdp_axis))
        return place(table, self.mesh, P(self.axis_name, None))

    def _lookup(self, tokens, sp):
        """Embeddings [S, B, H] of tokens [B, S], vocab-parallel as Megatron does it:
        each rank looks up the ids in its vocab rows (zeros elsewhere), and the
        sum over ranks is reduce-scattered along S (sequence parallel) or
        all-reduced (replicated decode activations)."""
        ax, bx = self.axis_name, self.batch_axis

        def lookup(ids, table):  # ids [B/dp, S], table [vocab/tp, H]
            rows = table.shape[0]
            local = ids - lax.axis_index(ax) * rows
            mine = (local >= 0) & (local < rows)
            e = jnp.where(mine[..., None], table[jnp.clip(local, 0, rows - 1)], 0)
            e = jnp.swapaxes(e, 0, 1)  # [S, B/dp, H]
            if sp:
                return lax.psum_scatter(e, ax, scatter_dimension=0, tiled=True)
            return lax.psum(e, ax)

        specs = (P(bx, None), P(ax, None))
        table = self._embedding().astype(self.cfg.dtype)
        return jax.shard_map(lookup, mesh=self.mesh, in_specs=specs,
                             out_specs=P(ax if sp else None, bx, None))(
            *(place(a, self.mesh, s) for a, s in zip((tokens, table), specs)))

    def _logits(self, h, sp):
        """[S, B, vocab] float32 (split over vocab) of the final hidden states h [S, B, H]."""
        if self.head is not None:
            logits = self.head(h, sequence_parallel=sp)
        else:
            # The table [vocab, H] is the head's kernel transposed: read in place
            # (no transposed copy of the embedding a step).
            table = self._embedding().astype(h.dtype)
            fn = lambda h, k: column_parallel(h, k, None, axis_name=self.axis_name,  # noqa: E731
                                              sequence_parallel=sp, impl=self.impl,
                                              preferred_element_type=jnp.float32,
                                              kernel_transposed=True,
                                              precision=self.cfg.matmul_precision)
            ax, bx = self.axis_name, self.batch_axis
            specs = (P(ax if sp else None, bx, None), P(ax, None))
            logits = jax.shard_map(fn, mesh=self.mesh, in_specs=specs,
                                   out_specs=P(None, bx, ax))(
                *(place(a, self.mesh, s) for a, s in zip((h, table), specs)))
        return logits

    def _run(self, tokens, positions, cache, start, sp, token_parallel=False):
        if sp and tokens.shape[1] % self.tp:
            raise ValueError(f"sequence length {tokens.shape[1]} must be divisible by the "
                             f"tensor-parallel size {self.tp} (sequence parallelism)")
        if tokens.shape[0] % self.dp:
            raise ValueError(f"batch {tokens.shape[0]} must be divisible by the size "
                             f"{self.dp} of batch_axis {self.batch_axis!r}")
        if token_parallel and (tokens.shape[1] != 1 or tokens.shape[0] % (self.dp * self.tp)):
            raise ValueError(f"a token-parallel decode step takes tokens [B, 1] with B divisible "
                             f"by {self.dp * self.tp} (batch_axis x tensor-parallel size), got "
                             f"{tuple(tokens.shape)}")
        h = self._lookup(tokens, sp)  # [S, B, H], laid out as the blocks want
        if token_parallel:
            h = tokens_to_rows(h, self.dp)
        h = place(h, self.mesh, P(self.axis_name if sp or token_parallel else None,
                                  self.batch_axis, None))

        def apply(block, h, kv):
            return block(h, positions, kv, start, sequence_parallel=sp,
                         token_parallel=token_parallel)

        use_remat, policy = remat.policy(self.cfg.remat)
        if use_remat:
            apply = nnx.remat(apply, policy=policy)
        if self.cfg.scan_layers:
            # One block in the program; parameters and cache slices are scanned
            # along their leading (layer) dim, h is the carry.
            kv = None if cache is None else (cache.k, cache.v)
            h, kv = nnx.scan(apply, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
                self.blocks, h, kv)
        else:
            layer_kv = []
            for i, block in enumerate(self.blocks):
                h, kv = apply(block, h, None if cache is None else (cache.k[i], cache.v[i]))
                layer_kv.append(kv)
            kv = None if cache is None else tuple(map(jnp.stack, zip(*layer_kv)))
        logits = self._logits(self.norm(h), sp or token_parallel)
        if token_parallel:
            logits = rows_to_tokens(logits)
        logits = jnp.swapaxes(logits, 0, 1)  # [B, S, vocab]
        if cache is None:
            return logits, None
        return logits, KVCache(k=kv[0], v=kv[1], length=start + tokens.shape[1])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [B, S, vocab] (float32) of tokens [B, S] (S divisible by the tp size)."""
        return self._run(tokens, jnp.arange(tokens.shape[1]), None, None, True)[0]

    def prefill(self, tokens: jax.Array, cache: KVCache):
        """Runs the prompt sequence-parallel (AG-GEMM / GEMM-RS), filling the cache."""
        return self._run(tokens, jnp.arange(tokens.shape[1]), cache, 0, True)

    def decode_step(self, tokens: jax.Array, cache: KVCache, *, token_parallel: bool = False):
        """One token per sequence, tokens [B, 1].

        By default the activations are replicated over the tensor-parallel
        axis: local column-parallel matmuls, all-reduce after the row-parallel
        ones. With ``token_parallel`` (B divisible by dp x tp) the B tokens
        are split over that axis instead and run through AG-GEMM / GEMM-RS,
        as Flux does for decode: the reduce-scatter + all-gather pair replaces
        the all-reduce, and norms and residuals run on B / tp tokens a rank.
        """
        positions = cache.length + jnp.arange(tokens.shape[1])
        return self._run(tokens, positions, cache, cache.length, False, token_parallel)


def _stacked_blocks(cfg: LlamaConfig, mesh: Mesh, axis_name: str, impl: str,
                    rngs: nnx.Rngs, batch_axis, fsdp_axis=None) -> Block:
    """One Block whose parameters have a leading, unsharded dim of cfg.layers."""

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs):
        return Block(cfg, mesh, axis_name, impl, rngs, batch_axis, fsdp_axis)

    return make(rngs)


def copy_parameters(src: Llama, dst: Llama) -> None:
    """Copies ``src``'s parameters into ``dst``, placed as ``dst``'s are.

    The two may differ in ``scan_layers`` (the blocks' parameters are then
    stacked or unstacked along the layer dim), in ``kernels_transposed`` (the
    parallel layers' kernels are transposed), in mesh and in impl; not in
    shapes. Use it to move a checkpoint between these layouts.

    Raises:
      ValueError: when the models' parameter shapes differ.
    """
    params = nnx.to_pure_dict(nnx.state(src, nnx.Param))
    blocks, layers = params["blocks"], src.cfg.layers
    if src.cfg.scan_layers and not dst.cfg.scan_layers:
        params["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(layers)}
    elif dst.cfg.scan_layers and not src.cfg.scan_layers:
        params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a),
                                        *[blocks[i] for i in range(layers)])
    if src.cfg.kernels_transposed != dst.cfg.kernels_transposed:
        for path, layer in nnx.iter_graph(dst):
            if isinstance(layer, _ParallelLinear):
                node = functools.reduce(lambda d, key: d[key], path, params)
                node["kernel"] = relayout(node["kernel"], layer, src.cfg.kernels_transposed)
    target = nnx.state(dst, nnx.Param)
    placed = nnx.to_pure_dict(target)
    if jax.tree.map(jnp.shape, params) != jax.tree.map(jnp.shape, placed):
        raise ValueError(f"copy_parameters: the models' parameters differ in shape "
                         f"({src.cfg} vs {dst.cfg})")
    placed = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), params, placed)
    nnx.replace_by_pure_dict(target, placed)
    nnx.update(dst, target)


def cross_entropy(logits, targets):
    """Mean next-token cross entropy in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # A one-hot product, not a gather: the vocabulary axis may be sharded (a
    # gather along it has no unambiguous sharding on a mesh with explicit axes).
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1], dtype=logp.dtype),
                             axis=-1))
