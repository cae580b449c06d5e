"""Make Triton's interpreter safe to run kernels from several threads at once.

XLA's CPU client runs the per-device programs of a ``shard_map`` on separate
threads, so the 8 emulated ranks launch their interpreted kernels
concurrently, and the communicating kernels spin-wait on each other. Triton's
interpreter, as shipped, is single-threaded in two ways:

* ``interpreter_builder.grid_idx`` / ``grid_dim`` (what ``tl.program_id`` and
  ``tl.num_programs`` read) live on one module-global builder;
* every launch patches ``triton.language`` with interpreter builtins on entry
  and restores the originals on exit, under the feet of a kernel still
  running in another thread ("`_semantic` argument must be provided").

``install()`` makes the two builder fields thread-local and applies the
language patch once, never restoring it (the process is in interpreter mode
for good). It is idempotent and checked on the Triton versions below; any
other version is refused with a clear error rather than patched blindly.
"""

from __future__ import annotations

import threading
import types

# Versions whose interpreter internals this shim was read against and tested on.
CHECKED_TRITON = ("3.9",)

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


class _NoRestoreScope:
    """Stands in for the interpreter's patch scope: restoring is a no-op."""

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
        for attr in ("_patch_lang", "interpreter_builder", "GridExecutor"):
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
                    patched.add(1)
            return _NoRestoreScope()

        interp._patch_lang = patch_lang_once
        _installed = True
