"""What this host gives jax_flux's fused kernels, checked before a run.

    python -m jax_flux.doctor [--json]

Each check says ``ok``, ``warn`` (it runs, but not as it should: an untested
version, lazy module loading, no tuning records for this GPU, so
``impl="auto"`` runs xla), ``fail`` (the fused path will not run here, e.g.
GPUs linked without NVLink's native atomics, or a setting is invalid and the
first fused call would raise) or ``skip`` (not asked on this platform). The
exit code is 1 if any check fails. Nothing here launches a kernel or
allocates a workspace; ``python -m jax_flux.demo`` then runs both ops with
every impl against a float64 reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import os
import sys
from typing import Callable

import jax

from jax_flux import _tuning_records, errors

# What the suite runs on (pyproject.toml's pins): jax [0.10.2, 0.13), Triton [3.6, 3.10).
_JAX_TESTED = ((0, 10, 2), (0, 13))
_TRITON_TESTED = ((3, 6), (3, 10))
# The compute capability the kernels are compile-checked for (tests/compile_for_gpu.py).
_CHECKED_CAPABILITY = "9.0"


@dataclasses.dataclass(frozen=True)
class Check:
    """One finding: ``status`` is "ok", "warn", "fail" or "skip"."""

    name: str
    status: str
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parts(version: str) -> tuple[int, ...]:
    out = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _gpus() -> list:
    return [d for d in jax.local_devices() if d.platform == "gpu"]


def versions() -> Check:
    """jax, jaxlib, Triton (and jax-triton, flax) against the tested ranges."""
    found = {name: _version(name) for name in ("jax", "jaxlib", "triton", "jax-triton", "flax")}
    text = (", ".join(f"{k} {v}" for k, v in found.items() if v) +
            f"; Python {sys.version.split()[0]}")
    off = []
    for name, (low, high) in (("jax", _JAX_TESTED), ("triton", _TRITON_TESTED)):
        v = found[name]
        if v is None:
            return Check("versions", "fail", f"{name} is not installed ({text})")
        if not low <= _parts(v) < high:
            off.append(f"{name} {v} is outside the tested "
                       f"[{'.'.join(map(str, low))}, {'.'.join(map(str, high))})")
    return Check("versions", "warn" if off else "ok", "; ".join(off + [text]))


def devices() -> Check:
    """The local devices; on GPUs, their compute capability."""
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in local})
    text = (f"{len(local)} local {local[0].platform} device(s) ({', '.join(kinds)}), "
            f"{jax.device_count()} in all over {jax.process_count()} process(es)")
    gpus = _gpus()
    if not gpus:
        return Check("devices", "ok", text + ": the fused kernels run through Triton's "
                     "interpreter (for testing; no speed)")
    caps = sorted({getattr(d, "compute_capability", "?") for d in gpus})
    text += f", compute capability {', '.join(caps)}"
    if caps != [_CHECKED_CAPABILITY]:
        return Check("devices", "warn", text + f": the kernels are compile-checked for "
                     f"{_CHECKED_CAPABILITY} (Hopper) only")
    return Check("devices", "ok", text)


def triton_mode() -> Check:
    """Compiled kernels on GPUs, the interpreter on CPU devices."""
    from custom_calls import interpreter_ready

    interpreting = interpreter_ready()
    if _gpus():
        if interpreting:
            return Check("triton mode", "fail", "TRITON_INTERPRET is set: Triton's "
                         "interpreter cannot launch on GPUs; unset it")
        try:
            import jax_triton
        except ImportError as e:
            return Check("triton mode", "fail", f"jax-triton does not import ({e}): it launches "
                         f"the kernels on GPUs; pip install 'jax-triton==0.3.1' (Triton 3.6), "
                         f"or the gpu extra: pip install '.[gpu]'")
        return Check("triton mode", "ok", f"compiled, launched by jax-triton "
                     f"{getattr(jax_triton, '__version__', '?')}")
    if not interpreting:
        return Check("triton mode", "fail", "Triton was imported in compiled mode before "
                     "jax_flux: CPU devices need its interpreter (import jax_flux first, or "
                     "set TRITON_INTERPRET=1)")
    from custom_calls import _program_threads

    try:
        concurrent = _program_threads.active() is not None
    except ValueError as e:
        return Check("triton mode", "fail", str(e))
    return Check("triton mode", "ok", "interpreted (TRITON_INTERPRET=1), a launch's programs "
                 + ("concurrently" if concurrent else "one after another"))


def module_loading() -> Check:
    """CUDA's lazy module loading can deadlock kernels that spin-wait on each other."""
    if not _gpus():
        return Check("module loading", "skip", "no GPU")
    mode = os.environ.get("CUDA_MODULE_LOADING", "")
    if mode.upper() != "EAGER":
        return Check("module loading", "warn", f"CUDA_MODULE_LOADING={mode or '(unset: lazy)'}: "
                     f"a module loaded while another rank's kernel spins can deadlock both; "
                     f"export CUDA_MODULE_LOADING=EAGER")
    return Check("module loading", "ok", "CUDA_MODULE_LOADING=EAGER")


def peer_links(ordinals) -> Check:
    """Peer access between every pair of ``ordinals`` (the GPUs of a fused axis in
    this process), and whether the links have native atomics (NVLink does, PCIe
    P2P does not): impl="fused" refuses links without them, over which the
    kernels' atomics on peer memory would not be atomic
    (``jax_flux._cuda_workspace.check_links``)."""
    from custom_calls import cuda_driver

    ordinals = sorted(set(ordinals))
    if len(ordinals) < 2:
        return Check("peer links", "skip", "no GPU" if not ordinals else
                     "one GPU in this process: no peers here (links to other processes' "
                     "GPUs are checked when a fused program is lowered, through NVML "
                     "where this process cannot see them)")
    try:
        no_access, no_atomics = cuda_driver.weak_links(ordinals)
    except cuda_driver.CudaError as e:
        return Check("peer links", "fail", str(e))
    pairs = len(ordinals) * (len(ordinals) - 1)
    if no_access:
        return Check("peer links", "fail", f"no peer access {no_access} (from, to): "
                     f"impl='fused' needs every GPU pair of a fused axis connected")
    if no_atomics:
        return Check("peer links", "fail", f"links without native atomics {no_atomics} "
                     f"(PCIe, not NVLink): impl='fused' refuses them (its atomics on a "
                     f"peer's memory would not be atomic over them); use xla or ring")
    return Check("peer links", "ok", f"{pairs} directed links among GPUs {ordinals}: peer "
                 f"access with native atomics (NVLink class)")


def memory() -> Check:
    """The workspace is allocated outside XLA's pool: XLA must leave room for it."""
    if not _gpus():
        return Check("memory", "skip", "no GPU")
    prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("0", "false")
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    allocator = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "")
    try:
        share = float(fraction)
    except ValueError:
        return Check("memory", "fail",
                     f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction!r} is not a number")
    if prealloc and allocator != "platform" and share > 0.9:
        return Check("memory", "warn", f"XLA preallocates {share:.0%} of each GPU: the "
                     f"workspace (jax_flux.workspace.info() once lowered) may not fit beside it")
    pool = f"XLA preallocates {share:.0%} of each GPU" if prealloc else "XLA allocates on demand"
    return Check("memory", "ok", pool + "; the workspace comes from the rest")


def failure_reporting() -> Check:
    """The settings that say how a peer that never arrives is reported."""
    try:
        mode = errors.status_check(interpreting=not _gpus())
        action = errors._action()
        interval = errors._interval_s()
    except ValueError as e:
        return Check("failure reporting", "fail", str(e))
    text = f"status check {mode}"
    if mode == "async":
        text += f", watchdog every {interval:g} s, then {action}"
    return Check("failure reporting", "ok", text)


def matmul_precision() -> Check:
    """``jax_default_matmul_precision``: what float32 matmuls run where the ops'
    ``precision`` is None, every impl alike (``jax_flux._precision``)."""
    from jax_flux._precision import kernel_input_precision

    value = jax.config.jax_default_matmul_precision
    try:
        run = kernel_input_precision("jax_default_matmul_precision", value, "float32")
    except ValueError as e:
        # A preset the fused kernels do not run (XLA may): impl='fused' refuses it.
        return Check("matmul precision", "warn", f"jax_default_matmul_precision={value!r}: {e}")
    what = {"tf32": "tensorfloat32 (10-bit mantissas)", "tf32x3": "three tensorfloat32 passes",
            "ieee": "exact float32 (CUDA cores, no tensor cores)"}[run]
    return Check("matmul precision", "ok",
                 f"jax_default_matmul_precision={value!r}: float32 matmuls on GPUs run {what}, "
                 f"in XLA's dot and the fused kernels alike (CPU devices: exact float32)")


def tuning() -> Check:
    """Tuning records for this device kind: without them ``impl="auto"`` runs xla."""
    from jax_flux._fused import device_kind

    kind = device_kind()
    counts = {}
    for label, path in (("your cache", _tuning_records.cache_path()),
                        ("shipped", _tuning_records.SHIPPED)):
        try:
            entries = _tuning_records._read(path)
        except (OSError, ValueError) as e:
            return Check("tuning", "fail", f"{path} does not read as JSON ({e}): every "
                         f"impl='auto' and untuned impl='fused' call would raise; fix or remove it")
        counts[label] = sum(k.startswith(kind + "|") for k in entries)
    text = f"{kind!r}: {counts['your cache']} record(s) in {_tuning_records.cache_path()}, " \
           f"{counts['shipped']} shipped"
    if not any(counts.values()):
        if not _gpus():
            return Check("tuning", "ok", text + ": impl='auto' runs xla (CPU devices are for "
                         "testing the kernels, not for speed)")
        return Check("tuning", "warn", text + ": impl='auto' runs xla for every problem "
                     "(python -m benchmarks.tune on these GPUs records where fused is faster)")
    return Check("tuning", "ok", text)


def local_peer_links() -> Check:
    """``peer_links`` among this process's GPUs."""
    return peer_links([d.local_hardware_id for d in _gpus()])


CHECKS: tuple[Callable[[], Check], ...] = (versions, devices, triton_mode, module_loading,
                                           local_peer_links, memory, failure_reporting,
                                           matmul_precision, tuning)


def run() -> list[Check]:
    """Every check, in order; a check that raises is a failure naming the error."""
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001: a broken check is a finding, not a crash
            name = fn.__name__.replace("_", " ")
            out.append(Check(name, "fail", f"{type(e).__name__}: {e}"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON list of the checks")
    args = p.parse_args(argv)
    checks = run()
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=1))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status:<5} {c.name:<{width}}  {c.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
