"""What a compiled kernel shows: PTX and SASS features, and how many programs fit an SM.

Used by the compile checks (``tests/compile_for_gpu.py``) and the static
kernel report (``benchmarks/compiled.py``) to look at the compiled kernels,
not only the clock: on a CPU-only host, with the CUDA tools Triton's wheel
ships (ptxas, cuobjdump, nvdisasm).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections import Counter


def ptx_features(ptx: str) -> dict:
    """Counts of what a well-compiled kernel shows in its PTX.

    Loads Triton could prove aligned become cp.async (pipelined into shared
    memory) and wide vector accesses (a workspace pointer it cannot see through
    shows up as none); Hopper MMAs are wgmma; the communicating kernels time
    their waits by the GPU's global timer. ``narrow_copies``: cp.async copies
    of fewer than 16 bytes (an operand Triton must transpose on the way into
    shared memory, or one it cannot prove aligned).
    """
    return {
        "cp.async": ptx.count("cp.async.cg.shared.global") + ptx.count("cp.async.ca.shared.global"),
        "narrow_copies": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*0x[48]\s*[,;]",
                                        ptx)),
        "v4": sum(ptx.count(f"{op}.v4") for op in ("st.global", "ld.global")),
        "wgmma": ptx.count("wgmma.mma_async"),
        "timer": ptx.count("%globaltimer"),
        **ptx_ordering(ptx),
    }


# A memory operation or fence of PTX with its qualifiers (``ld.global.sys.acquire.b32``);
# not part of a longer name (``wgmma.fence.sync.aligned`` is no fence of memory).
_PTX_MEMORY_OP = re.compile(r"(?<![\w.])((?:ld|st|atom|red|fence)(?:\.[a-z0-9_]+)+)")


def ptx_ordering(ptx: str) -> dict:
    """The memory-ordering operations of a kernel's PTX, which the fused kernels'
    protocol rests on: ``acquire`` (acquire or acq_rel loads and atomics: a wait
    for a signal), ``release`` (release or acq_rel: a signal after the data it
    publishes) and ``narrow_scope``, those of them scoped below ``.sys``. In
    PTX's memory model only system-scoped ones synchronise with a thread of
    another GPU (a peer writing over NVLink); the default scope is ``.gpu``.
    """
    acquire = release = narrow = 0
    for m in _PTX_MEMORY_OP.finditer(ptx):
        q = set(m.group(1).split("."))
        if not q & {"acquire", "release", "acq_rel", "sc"}:
            continue
        acquire += bool(q & {"acquire", "acq_rel", "sc"})
        release += bool(q & {"release", "acq_rel", "sc"})
        narrow += "sys" not in q
    return {"acquire": acquire, "release": release, "narrow_scope": narrow}


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool shipped in Triton's wheel (cuobjdump, nvdisasm), or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def _opcode_with_modifiers(instruction: str) -> str:
    """``@!P0 LDGSTS.E.BYPASS.128 [R1], ...`` -> ``LDGSTS.E.BYPASS.128``."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def _opcode(instruction: str) -> str:
    """``@!P0 LDGSTS.E.BYPASS.128 [R1], ...`` -> ``LDGSTS``."""
    return _opcode_with_modifiers(instruction).split(".")[0]


# Tensor-core MMAs in SASS: Hopper's warpgroup MMAs for 16-bit (HGMMA) and
# float8 (QGMMA) operands, and the warp-level HMMA.
MMA_OPCODES = ("HGMMA", "QGMMA", "HMMA")


# One instruction of nvdisasm's listing: ``/*0130*/  @!P3 LDG.E.STRONG.SYS R6, [R188.64] ;``.
_SASS_INSTRUCTION = re.compile(r"^/\*[0-9a-f]+\*/\s+(.*?)\s*;")


def hot_loop(sass: str) -> list[str]:
    """The opcodes of the innermost loop around the first tensor-core MMA (or,
    in a kernel without one, exact float32's, the first FFMA).

    The loop is the span from the nearest label before that MMA to the first
    branch back to it. In every GEMM here that is the software-pipelined K
    loop, where the time goes.
    """
    body = []  # ("label", name) or ("op", opcode, text)
    for line in sass.splitlines():
        line = line.strip()
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            body.append(("label", label.group(1)))
            continue
        op = _SASS_INSTRUCTION.match(line)
        if op:
            body.append(("op", _opcode(op.group(1)), op.group(1)))
    mma = next((i for i, e in enumerate(body) if e[0] == "op" and e[1] in MMA_OPCODES), None)
    if mma is None:
        mma = next((i for i, e in enumerate(body) if e[0] == "op" and e[1] == "FFMA"), None)
    if mma is None:
        return []
    for start in range(mma, -1, -1):
        if body[start][0] != "label":
            continue
        back = re.compile(r"\bBRA\b.*" + re.escape(body[start][1]) + r"(?!\w)")
        for end in range(mma, len(body)):
            if body[end][0] == "op" and back.search(body[end][2]):
                return [e[1] for e in body[start:end + 1] if e[0] == "op"]
    return []


def _run_on_cubin(command: list[str], cubin: bytes) -> str:
    """stdout of ``command + [a file holding cubin]``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run(command + [path], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, static shared memory bytes, as
    ``cuobjdump -res-usage`` reads them from the cubin; empty without the tool."""
    cuobjdump = cuda_tool("cuobjdump")
    if cuobjdump is None:
        return {}
    usage = _run_on_cubin([cuobjdump, "-res-usage"], cubin)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    static_shared = re.search(r"SHARED:(\d+)", usage)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "stack": int(stack.group(1)) if stack else -1,
        "static_shared": int(static_shared.group(1)) if static_shared else 0,
    }


def sass_features(cubin: bytes) -> dict:
    """What the assembled kernel shows: registers and stack bytes per thread
    (stack: spills or local arrays), static shared memory (bytes; Triton's
    pipeline buffers are dynamic, ``metadata.shared``), and its hot K loop (``hot_loop``):
    instructions, tensor-core MMAs, FFMAs, cp.async copies (LDGSTS), local-memory
    accesses (spills inside the loop), and which loop that is: "K" (no
    global stores in it), or "tile" where ptxas unrolled a short K loop and
    the loop around the first MMA is the persistent loop over output tiles
    (its epilogue stores are in it; its numbers are per tile, not per K
    step). Empty without Triton's CUDA tools."""
    usage = resource_usage(cubin)
    nvdisasm = cuda_tool("nvdisasm")
    if not usage or nvdisasm is None:
        return {}
    sass = _run_on_cubin([nvdisasm, "-c"], cubin)
    loop = Counter(hot_loop(sass))
    return {
        **usage,
        "loop": sum(loop.values()),
        "loop_mma": sum(loop[op] for op in MMA_OPCODES),
        "loop_ffma": loop["FFMA"],
        "loop_ldgsts": loop["LDGSTS"],
        "loop_local": loop["LDL"] + loop["STL"],
        "loop_kind": "tile" if loop["STG"] + loop["ATOMG"] + loop["RED"] else "K",
        **sass_ordering(sass),
    }


def _instructions(sass: str) -> list[str]:
    """The instructions of nvdisasm's listing, in address order, predicate included."""
    return [m.group(1) for m in (_SASS_INSTRUCTION.match(line.strip())
                                 for line in sass.splitlines()) if m]


def sass_ordering(sass: str) -> dict:
    """How the assembled kernel orders memory, as the hardware will run it.

    ``l1_invalidations``: ``CCTL.IVALL``, which ptxas puts after each acquire
    (the SM's L1 dropped, so the weak loads that follow see what peers wrote);
    ``sys_fences``: ``MEMBAR.*.SYS``, which it puts before each release;
    ``unfenced_releases``: those fences with a weak global store between the
    last ``BAR.SYNC`` before them (address order) and the fence, or with no
    barrier before them at all. A release is one thread's (Triton runs a scalar
    atomic on thread 0); the barrier is what orders the other threads' stores
    of the data before it, so a store after it is published by nothing.
    """
    instructions = _instructions(sass)
    unfenced = 0
    fences = [i for i, text in enumerate(instructions)
              if re.match(r"MEMBAR\.\w+\.SYS$", _opcode_with_modifiers(text))]
    for i in fences:
        for text in reversed(instructions[:i]):
            op = _opcode_with_modifiers(text)
            if op.startswith("BAR.SYNC"):
                break
            if op.split(".")[0] in ("STG", "ST", "RED") and "STRONG" not in op.split("."):
                unfenced += 1
                break
        else:
            unfenced += 1
    return {
        "l1_invalidations": sum(_opcode_with_modifiers(t) == "CCTL.IVALL" for t in instructions),
        "sys_fences": len(fences),
        "unfenced_releases": unfenced,
    }


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many programs co-reside (CUDA occupancy rules)."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    shared_bytes: int = 228 * 1024
    shared_reserved: int = 1024  # per program, taken by the CUDA runtime
    warps: int = 64
    programs: int = 32


HOPPER = SmLimits()


def programs_per_sm(regs: int, shared_bytes: int, num_warps: int,
                    limits: SmLimits = HOPPER) -> dict:
    """Programs of this kernel that fit one SM at once (``fit``), the limit that
    binds first (``bound_by``) and what each limit alone allows (``fit_by_*``).

    ``shared_bytes``: dynamic plus static shared memory of one program.
    """
    unit = limits.register_unit
    regs_per_warp = -(-max(regs, 1) * 32 // unit) * unit
    bounds = {
        "registers": limits.registers // (regs_per_warp * num_warps),
        "shared": limits.shared_bytes // (shared_bytes + limits.shared_reserved),
        "warps": limits.warps // num_warps,
        "programs": limits.programs,
    }
    fit = min(bounds.values())
    return {"fit": fit, "bound_by": min(bounds, key=bounds.get),
            **{f"fit_by_{k}": v for k, v in bounds.items()}}


# Per-SM limits by compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): 64 K registers in 256-register warp
# units and 1 KiB reserved per program on all of them.
_LIMITS = {
    80: SmLimits(shared_bytes=164 * 1024, warps=64, programs=32),
    86: SmLimits(shared_bytes=100 * 1024, warps=48, programs=16),
    87: SmLimits(shared_bytes=164 * 1024, warps=48, programs=16),
    89: SmLimits(shared_bytes=100 * 1024, warps=48, programs=24),
    90: HOPPER,
    100: HOPPER,
    103: HOPPER,
    120: SmLimits(shared_bytes=100 * 1024, warps=48, programs=32),
}
# An unlisted GPU is assumed to be as small as the smallest listed, field by field.
_SMALLEST = SmLimits(shared_bytes=min(v.shared_bytes for v in _LIMITS.values()),
                     warps=min(v.warps for v in _LIMITS.values()),
                     programs=min(v.programs for v in _LIMITS.values()))


def sm_limits(capability: int) -> tuple[SmLimits, bool]:
    """(per-SM limits of compute capability ``capability`` (90 for sm_90), whether
    it is listed; an unlisted one gets the smallest listed limits)."""
    return (_LIMITS[capability], True) if capability in _LIMITS else (_SMALLEST, False)
