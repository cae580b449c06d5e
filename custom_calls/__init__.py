"""Triton kernels and their XLA bindings (CUDA: jax-triton; CPU: Triton's interpreter).

Importing this package first decides, from the environment alone, whether
Triton kernels are compiled (a GPU jaxlib is installed) or interpreted (a
CPU-only host); see ``custom_calls._mode``. It never imports jax_flux or flax.
"""

from custom_calls import _mode

_mode.arrange_interpreter()

from custom_calls.binding import interpreter_ready, triton_call  # noqa: E402

__all__ = ["interpreter_ready", "triton_call"]
