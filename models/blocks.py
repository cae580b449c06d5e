"""The decoder's pieces: one transformer block and what it is built from.

Per block: RMSNorm -> attention (QKV column-parallel: AG-GEMM; whole
grouped-query groups per rank; rotary embeddings; causal softmax in float32;
output row-parallel: GEMM-RS) -> residual; RMSNorm -> MLP (SwiGLU gate/up
column-parallel, down row-parallel) -> residual. Also the KV cache, and the
layout helpers of data parallelism and token-parallel decode. ``models.llama``
stacks the blocks into the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_flux._axes import axis_names
from jax_flux.nn import ColumnParallelLinear, RowParallelLinear, axis_size
from models.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, [layers, B, max_seq, kv_heads, head_dim], and
    how many positions are filled."""

    k: jax.Array
    v: jax.Array
    length: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, mesh: Mesh, axis_name: str = "tp",
              batch_axis=None):
        """Zeros, kv heads split over ``axis_name``, batch over ``batch_axis``."""
        shape = (cfg.layers, batch, cfg.max_seq, cfg.kv_heads, cfg.head_dim)
        sharding = NamedSharding(mesh, P(None, batch_axis, None, axis_name, None))
        zeros = jax.device_put(jnp.zeros(shape, cfg.dtype), sharding)
        return cls(k=zeros, v=zeros, length=jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, mesh: Mesh, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,), mesh=mesh)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotates the two halves of the last dim of x [S, B, ..., hd] by position."""
    hd = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2 / hd)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [S, hd/2]
    angles = angles.reshape(angles.shape[0], *(1,) * (x.ndim - 2), hd // 2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _layer_options(cfg: LlamaConfig, mesh: Mesh, axis_name: str, impl: str, rngs: nnx.Rngs,
                   batch_axis, fsdp_axis=None) -> dict:
    """Keyword arguments every parallel linear layer of the model gets."""
    return dict(mesh=mesh, axis_name=axis_name, impl=impl, batch_axis=batch_axis,
                fsdp_axis=fsdp_axis, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_transposed=cfg.kernels_transposed, precision=cfg.matmul_precision,
                rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention; each rank owns kv_heads / tp whole groups."""

    def __init__(self, cfg: LlamaConfig, mesh: Mesh, axis_name: str, impl: str, rngs: nnx.Rngs,
                 batch_axis=None, fsdp_axis=None):
        self.cfg = cfg
        self.group = cfg.heads // cfg.kv_heads  # query heads per kv head
        self.dp = _axes_size(mesh, batch_axis)
        common = _layer_options(cfg, mesh, axis_name, impl, rngs, batch_axis, fsdp_axis)
        # Per group: its query heads, then k, then v.
        self.qkv = ColumnParallelLinear(cfg.hidden, (cfg.kv_heads, self.group + 2, cfg.head_dim),
                                        **common)
        self.out = RowParallelLinear((cfg.heads, cfg.head_dim), cfg.hidden, **common)

    def __call__(self, x, positions, cache_kv=None, start=None, *, sequence_parallel=True,
                 token_parallel=False):
        """x [S, B, H]; with ``token_parallel`` a decode step's tokens as rows
        (``tokens_to_rows``), whose projections run sequence-parallel."""
        cfg, r = self.cfg, self.group
        sp = sequence_parallel or token_parallel
        qkv = self.qkv(x, sequence_parallel=sp)  # [S, B, G, r + 2, hd]
        if token_parallel:
            qkv = rows_to_tokens(qkv)
        q = rotary(qkv[..., :r, :], positions, cfg.rope_theta)
        k = rotary(qkv[..., r, :], positions, cfg.rope_theta)  # [S, B, G, hd]
        v = qkv[..., r + 1, :]
        keys, values = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)  # [B, S, G, hd]
        key_pos = positions
        if cache_kv is not None:
            ck, cv = cache_kv
            keys = jax.lax.dynamic_update_slice_in_dim(ck, keys.astype(ck.dtype), start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cv, values.astype(cv.dtype), start,
                                                         axis=1)
            cache_kv = (keys, values)
            key_pos = jnp.arange(keys.shape[1])
        scores = jnp.einsum("sbgrd,btgd->bgrst", q.astype(jnp.float32), keys.astype(jnp.float32),
                            precision=cfg.matmul_precision) / jnp.sqrt(cfg.head_dim).astype(
                                jnp.float32)
        visible = key_pos[None, :] <= positions[:, None]  # causal (and unfilled cache hidden)
        scores = jnp.where(visible, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        attn = jnp.einsum("bgrst,btgd->sbgrd", probs, values.astype(jnp.float32),
                          precision=cfg.matmul_precision)
        attn = attn.astype(x.dtype).reshape(*attn.shape[:2], -1, cfg.head_dim)  # [S, B, heads, hd]
        if token_parallel:
            attn = tokens_to_rows(attn, self.dp)
        return self.out(attn, sequence_parallel=sp), cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, mesh: Mesh, axis_name: str, impl: str, rngs: nnx.Rngs,
                 batch_axis=None, fsdp_axis=None):
        self.kind = cfg.mlp
        common = _layer_options(cfg, mesh, axis_name, impl, rngs, batch_axis, fsdp_axis)
        # SwiGLU: gate and up side by side per ffn unit, so each rank gets both halves.
        up_shape = (cfg.ffn, 2) if cfg.mlp == "swiglu" else (cfg.ffn,)
        self.up = ColumnParallelLinear(cfg.hidden, up_shape, **common)
        self.down = RowParallelLinear(cfg.ffn, cfg.hidden, **common)

    def __call__(self, x, *, sequence_parallel=True):
        h = self.up(x, sequence_parallel=sequence_parallel)
        if self.kind == "swiglu":
            h = jax.nn.silu(h[..., 0]) * h[..., 1]
        else:
            h = jax.nn.gelu(h)
        return self.down(h, sequence_parallel=sequence_parallel)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, mesh: Mesh, axis_name: str, impl: str, rngs: nnx.Rngs,
                 batch_axis=None, fsdp_axis=None):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, mesh, pdt)
        self.attn = Attention(cfg, mesh, axis_name, impl, rngs, batch_axis, fsdp_axis)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, mesh, pdt)
        self.mlp = MLP(cfg, mesh, axis_name, impl, rngs, batch_axis, fsdp_axis)

    def __call__(self, x, positions, cache_kv=None, start=None, *, sequence_parallel=True,
                 token_parallel=False):
        a, cache_kv = self.attn(self.attn_norm(x), positions, cache_kv, start,
                                sequence_parallel=sequence_parallel,
                                token_parallel=token_parallel)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x), sequence_parallel=sequence_parallel or token_parallel)
        return x, cache_kv


def _axis_names(axes) -> tuple:
    """A mesh axis, a tuple (or list) of them or None, as a tuple of names."""
    return () if axes is None else axis_names(tuple(axes) if isinstance(axes, list) else axes)


def _axes_size(mesh: Mesh, axes) -> int:
    """Devices along mesh axis (or tuple of axes) ``axes``; 1 for None."""
    return 1 if axes is None else axis_size(mesh, _axis_names(axes))


def tokens_to_rows(h, dp: int):
    """A decode step's activations [1, B, ...] as rows [B / dp, dp, ...].

    The sequence-parallel layers split dim 0 over the tensor-parallel axis and
    dim 1 over the batch axis: so each dp group's B / dp tokens (a contiguous
    block of the batch) become the rows its tp ranks share.
    """
    return h[0].reshape(dp, -1, *h.shape[2:]).swapaxes(0, 1)


def rows_to_tokens(rows):
    """The inverse of ``tokens_to_rows``: [B / dp, dp, ...] -> [1, B, ...]."""
    # Merge first, then add the leading dim: JAX infers the merged dim's sharding
    # on explicit axes (dp major), not that of a reshape doing both at once.
    return rows.swapaxes(0, 1).reshape(-1, *rows.shape[2:])[None]
