"""Decide, before Triton is imported, whether kernels run compiled or interpreted.

A ``@triton.jit`` function is bound to the compiled or the interpreted runtime
when it is decorated, according to ``TRITON_INTERPRET``. On a host without a
GPU build of jaxlib, jax_flux runs its kernels through Triton's interpreter,
so that env var must be set before ``triton`` is first imported. Nothing here
initialises a JAX backend (that would break a later
``jax.distributed.initialize``): the decision reads only the environment and
which JAX plugins are installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Modules through which jaxlib gains a GPU backend (CUDA 12/13, ROCm).
_GPU_PLUGIN_MODULES = (
    "jax_plugins.xla_cuda13",
    "jax_plugins.xla_cuda12",
    "jax_plugins.xla_rocm7",
    "jax_plugins.xla_rocm6",
    "jax_cuda13_plugin",
    "jax_cuda12_plugin",
    "jax_rocm7_plugin",
    "jax_rocm6_plugin",
)

_TRUE = ("1", "true", "yes", "on")


def _module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_backend_possible() -> bool:
    """True when JAX could bring up a GPU backend in this process.

    False when ``JAX_PLATFORMS`` names only non-GPU platforms, or when no GPU
    plugin of jaxlib is installed.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        names = {p.strip() for p in platforms.split(",") if p.strip()}
        if not names & {"cuda", "gpu", "rocm"}:
            return False
    return any(_module_installed(m) for m in _GPU_PLUGIN_MODULES)


def arrange_interpreter() -> None:
    """On a CPU-only host, ask for Triton's interpreter if Triton isn't loaded yet.

    An explicit ``TRITON_INTERPRET`` from the user is left as it is. If Triton
    was already imported, nothing can be changed here; the CPU lowering then
    reports what to do (see ``interpreting``).
    """
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    if not gpu_backend_possible():
        os.environ["TRITON_INTERPRET"] = "1"


def interpreting() -> bool:
    """Whether ``@triton.jit`` currently yields interpreted kernels."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE
