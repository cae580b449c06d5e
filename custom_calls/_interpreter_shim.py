"""Make Triton's interpreter safe to run kernels from several threads at once.

XLA's CPU client runs the per-device programs of a ``shard_map`` on separate
threads, so the 8 emulated ranks launch their interpreted kernels
concurrently, and the communicating kernels spin-wait on each other. Triton's
interpreter, as shipped, is single-threaded in two ways:

* ``interpreter_builder.grid_idx`` / ``grid_dim`` (what ``tl.program_id`` and
  ``tl.num_programs`` read) live on one module-global builder;
* every launch patches ``triton.language`` with interpreter builtins on entry
  and restores the originals on exit, under the feet of a kernel still
  running in another thread ("`_semantic` argument must be provided");
* kernels are rewritten from their source into a shared cache on first use,
  and two threads parsing at once break CPython's parser.

Fidelity fixes ride along: float32 -> bfloat16 casts round to nearest
even (the interpreter truncates; GPUs round); the int32 overflow sanitizer, a
debugging aid compiled kernels lack, is off (it costs ~40%); and the GPU's
global timer (``triton.language.extra.cuda.globaltimer``, one line of inline
PTX, which the interpreter cannot run) reads the host's monotonic clock in
nanoseconds, so a bounded wait is bounded by the same seconds here as on a
GPU (a poll count instead ran about 23x longer than it said with 8 ranks on
2 cores: 93 s for a 4 s timeout), after a short sleep, so a spinning wait
leaves the host's cores to the programs it waits for, as a GPU's SMs do.

``install()`` makes the two builder fields thread-local and applies the
language patch once, never restoring it (the process is in interpreter mode
for good). It also shortens the GIL switch interval of the process, so a
program polling a signal lets the other ranks' threads run. It is idempotent and checked on the Triton versions below; any
other version is refused with a clear error rather than patched blindly.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import types

import ml_dtypes
import numpy as np

# Versions whose interpreter internals this shim was read against and tested on.
CHECKED_TRITON = ("3.6", "3.9")

# GIL switch interval while kernels are interpreted (Python's default: 5 ms).
SWITCH_INTERVAL_S = 1e-3
# Each read of the global timer first sleeps this long. Only a spinning wait
# reads it (signals.wait_epoch), and on a GPU a program spinning on its SM
# takes nothing from the programs it waits for; here the programs share the
# host's cores and the GIL, and a waiter that sleeps between polls hands them
# to the programs doing the work (an 8-rank AG-GEMM with its programs
# concurrent, on 2 cores: 33-43 s -> 12-19 s).
POLL_PAUSE_S = 1e-4

_lock = threading.Lock()
_installed = False


class _ThreadLocalField:
    """A data descriptor storing one attribute per thread."""

    def __init__(self, name: str):
        self._name = name
        self._local = threading.local()

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(self._local, self._name, None)

    def __set__(self, obj, value):
        setattr(self._local, self._name, value)


# What ``globaltimer`` asks of the builder (Triton 3.6 and 3.9 alike).
_GLOBALTIMER_ASM = "mov.u64 $0, %globaltimer;"


class _AsmResults:
    """Stands in for the op an inline-asm builder call returns."""

    def __init__(self, handles):
        self._handles = handles

    def get_result(self, i):
        return self._handles[i]


class _NoRestoreScope:
    """Stands in for the interpreter's patch scope: patches stay, restoring is a no-op."""

    def set_attr(self, obj, name: str, value) -> None:
        setattr(obj, name, value)

    def restore(self) -> None:
        pass


def install() -> None:
    """Patch the interpreter for concurrent launches (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        import triton
        from triton.runtime import interpreter as interp

        major_minor = ".".join(triton.__version__.split(".")[:2])
        if major_minor not in CHECKED_TRITON:
            raise RuntimeError(
                f"jax_flux's interpreter shim was checked on Triton {CHECKED_TRITON}, "
                f"found {triton.__version__}; install one of those for CPU runs")
        for attr in ("_patch_lang", "_patch_attr", "interpreter_builder", "GridExecutor"):
            if not hasattr(interp, attr):
                raise RuntimeError(f"triton.runtime.interpreter lacks {attr!r}; "
                                   f"the interpreter shim does not fit Triton {triton.__version__}")

        builder_cls = type(interp.interpreter_builder)
        for field in ("grid_idx", "grid_dim"):
            # A class-level data descriptor wins over the instance attribute.
            interp.interpreter_builder.__dict__.pop(field, None)
            setattr(builder_cls, field, _ThreadLocalField(field))

        original_patch_lang = interp._patch_lang
        patched: set[int] = set()
        patch_lock = threading.Lock()

        import triton.language as tl

        # The patch acts on the modules triton.language and triton.language.core,
        # shared by every kernel, whatever names a kernel's module imports them
        # under; present both once.
        both_modules = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})

        def patch_lang_once(fn):
            with patch_lock:
                if not patched:
                    original_patch_lang(both_modules)
                    # Triton 3.6 converts a scalar to an index with int() of a
                    # shape-(1,) array, an error from NumPy 2.5 on (3.9 squeezes).
                    tl.tensor.__index__ = lambda self: int(self.handle.data.squeeze())
                    patched.add(1)
            return _NoRestoreScope()

        interp._patch_lang = patch_lang_once

        # Triton's interpreter checks every int32 add/mul for overflow by
        # redoing it in int64 (a debugging aid the compiled kernels don't
        # have); it costs about 40% of a kernel's run time here. The kernels
        # do large-offset arithmetic in int64 by construction.
        builder = interp.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)

        # Kernels and the device functions they call are rewritten (ast.parse)
        # on first use into a shared cache; two threads doing that at once
        # break CPython's parser ("AST constructor recursion depth mismatch").
        rewrite_lock = threading.Lock()
        original_rewrite = interp.InterpretedFunction.rewrite

        def rewrite_once(self):
            cached = interp.InterpretedFunction.rewritten_fn.get(self.fn)
            if cached is not None:
                return cached
            with rewrite_lock:
                return original_rewrite(self)

        interp.InterpretedFunction.rewrite = rewrite_once

        # The interpreter converts float32 to bfloat16 by truncation; GPUs (and
        # XLA) round to nearest even, which halves the error. Do the same.
        original_cast = builder_cls.cast_impl

        def cast_rounding(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                rounded = np.asarray(src.data, np.float32).astype(ml_dtypes.bfloat16)
                return interp.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
            return original_cast(self, src, dst_type)

        builder_cls.cast_impl = cast_rounding

        # globaltimer() is inline PTX; here it is the host's monotonic clock
        # (nanoseconds, as %globaltimer). Any other inline asm stays refused.
        original_asm = builder_cls.create_inline_asm

        def inline_asm(self, asm, constraints, values, type, is_pure, pack):
            if asm == _GLOBALTIMER_ASM and not values:
                time.sleep(POLL_PAUSE_S)  # a spinning wait: let the others run
                now = np.array([time.monotonic_ns()], np.int64)
                return _AsmResults([interp.TensorHandle(now, tl.int64)])
            return original_asm(self, asm, constraints, values, type, is_pure, pack)

        builder_cls.create_inline_asm = inline_asm
        # A builtin outside triton.language gets its _semantic only once patched
        # like the language's own. Kernels call it as an attribute of this
        # module (``cuda.globaltimer()``), which is what the patch replaces.
        from triton.language.extra import cuda

        interp._patch_attr(cuda, "globaltimer", cuda.globaltimer, interp.interpreter_builder,
                           _NoRestoreScope())

        # A program spinning on a signal holds the GIL for a whole switch
        # interval per turn (5 ms by default), starving the ranks whose
        # progress it waits for. Hand the GIL over more often.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        _installed = True
