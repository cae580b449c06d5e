"""Compiling a kernel for a GPU target with ``triton.compile`` (no GPU needed), and
how many of its programs can be resident at once.

Users: the one-GPU rank emulation (``rank_emulation``, which loads what this
compiles), the compile checks (``tests/compile_for_gpu.py``), the static
kernel report (``benchmarks/compiled.py``) and the residency check of a
persistent grid, which ``binding`` runs when a communicating kernel is
lowered for a GPU (``check_resident``).

Needs Triton in compiled mode (``TRITON_INTERPRET`` unset or 0).
"""

from __future__ import annotations

import dataclasses
import functools

from custom_calls import assembly

# Triton's element type of each supported dtype (as pointer signatures spell it).
TRITON_TYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
FLOAT8_TYPE = {"float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}
_OTHER_TYPES = {**FLOAT8_TYPE, "float64": "fp64", "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
                "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "i1"}


def pointer_type(dtype) -> str:
    """Triton's signature type of a pointer to ``dtype`` elements (``*bf16``)."""
    name = getattr(dtype, "name", str(dtype))
    return "*" + {**TRITON_TYPE, **_OTHER_TYPES}[name]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A kernel compiled for one target, with what a raw driver launch needs."""

    name: str
    cubin: bytes
    ptx: str
    shared: int
    num_warps: int
    params: tuple[str, ...]  # Triton type of each runtime parameter, in order
    global_scratch: int  # bytes of global scratch memory a program needs (0: none)
    # Triton appends two pointer parameters (global and profile scratch) to
    # every kernel; the launch passes null for both.
    TRAILING_SCRATCH_PARAMS = 2


def compile_kernel(kernel, cc: int, pointers: tuple, constexprs: tuple, num_warps: int,
                   num_stages: int) -> Compiled:
    """Compiles ``kernel`` for sm_``cc``: pointer parameters typed by ``pointers``
    ((name, "*bf16"), ...) and 16-byte aligned, other runtime parameters i32,
    ``constexprs`` baked in (as jax-triton compiles them).
    Needs Triton in compiled mode, not a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs_d, pointers_d = dict(constexprs), dict(pointers)
    signature = {name: "constexpr" if name in constexprs_d else pointers_d.get(name, "i32")
                 for name in kernel.arg_names}
    # Pointers 16-byte aligned, as jax-triton assumes for XLA's buffers (and
    # cuMemAlloc gives): what lets Triton vectorize and pipeline the loads.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in pointers_d}
    with triton.knobs.cache.scope():
        # jax-triton empties TRITON_CACHE_DIR when imported (it compiles through
        # its own pipeline); triton.compile needs one: Triton's default, then.
        if not triton.knobs.cache.dir:
            triton.knobs.cache.dir = triton.knobs.cache.get_triton_dir("cache")
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs_d, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": num_warps, "num_stages": num_stages})
    return Compiled(name=compiled.metadata.name, cubin=compiled.asm["cubin"],
                    ptx=compiled.asm["ptx"], shared=compiled.metadata.shared,
                    num_warps=num_warps,
                    global_scratch=getattr(compiled.metadata, "global_scratch_size", 0) or 0,
                    params=tuple(t for t in signature.values() if t != "constexpr"))


def ptx_param_count(ptx: str, name: str) -> int:
    """Parameters of ``.entry name`` in PTX text (to check the launch ABI)."""
    start = ptx.index(f".entry {name}(")
    return ptx[start:ptx.index(")", start)].count(".param ")


@functools.lru_cache(maxsize=128)
def programs_per_sm(kernel, capability: int, pointers: tuple, constexprs: tuple, num_warps: int,
                    num_stages: int) -> dict:
    """How many programs of ``kernel`` (compiled as ``compile_kernel`` would) fit one
    SM of compute capability ``capability``: ``assembly.programs_per_sm``'s answer
    plus ``regs``, ``shared`` (bytes a program) and ``limits_known``. Registers
    are read from the cubin with Triton's cuobjdump; without it, 255 (the most a
    thread can have) is assumed and ``regs_assumed`` is True."""
    c = compile_kernel(kernel, capability, pointers, constexprs, num_warps, num_stages)
    usage = assembly.resource_usage(c.cubin)
    assumed = usage.get("regs", -1) <= 0
    regs = 255 if assumed else usage["regs"]
    shared = c.shared + usage.get("static_shared", 0)
    limits, known = assembly.sm_limits(capability)
    fit = assembly.programs_per_sm(regs, shared, num_warps, limits)
    return dict(fit, regs=regs, regs_assumed=assumed, shared=shared, limits_known=known)


def check_resident(kernel, grid: int, *, sms: int, capability: int, pointers: tuple,
                   constexprs: tuple, num_warps: int, num_stages: int) -> None:
    """Raises ValueError if ``grid`` programs of ``kernel`` cannot all be resident at
    once on ``sms`` SMs of compute capability ``capability``.

    The fused kernels are persistent: their grids are sized to run in one
    wave, their programs spin-waiting on peers' signals. They hand out work
    that peers wait for by ticket (``signals.take_ticket``), so a grid that
    does not all fit still finishes (its last programs start as the first
    end), but it is not what a config asking for it means, so it is refused.
    A kernel that launches at all fits one program an SM, so ``grid <= sms``
    is accepted without compiling anything.

    Registers are those of Triton's own ptxas. jax-triton hands XLA the PTX
    and XLA's assembler (jaxlib's CUDA) makes the cubin that runs, which may
    allocate a few registers differently: near a limit, a grid accepted here
    may still not co-reside, and then runs in two waves.
    """
    if grid <= sms:
        return
    info = programs_per_sm(kernel, capability, pointers, constexprs, num_warps, num_stages)
    if grid <= sms * info["fit"]:
        return
    regs = f"{info['regs']} registers a thread" + (" (assumed: no cuobjdump)"
                                                    if info["regs_assumed"] else "")
    limits = "" if info["limits_known"] else (
        f" (sm_{capability} is not in jax_flux's table of SM limits; the smallest listed "
        f"were assumed)")
    raise ValueError(
        f"{kernel.__name__}: a persistent grid of {grid} programs cannot all be resident on "
        f"this GPU: {sms} SMs x {info['fit']} program(s) an SM = {sms * info['fit']} "
        f"({num_warps} warps, {regs}, {info['shared']} bytes of shared memory a program; "
        f"bound by {info['bound_by']}{limits}). A persistent grid is meant to run in one "
        f"wave: lower the config's programs_per_sm or num_programs, or num_warps / "
        f"num_stages / the block sizes")
