"""jax_flux model zoo: a Llama-style decoder built from jax_flux.nn tensor-parallel layers."""

from models.config import PRESETS, LlamaConfig
from models.llama import KVCache, Llama

__all__ = ["KVCache", "Llama", "LlamaConfig", "PRESETS"]
