"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked on this CPU-only host.

The interpreter runs the kernels' logic; this checks what only the compiler
sees (branch types, atomics, constexpr globals) and what the GPU will run: the
K loop's instructions, and the memory ordering the signals rest on. It runs in
a subprocess because this process has Triton in interpreter mode.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "tests.compile_for_gpu", "90"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 32 and all(" ok: " in line for line in lines), r.stdout
    # Every kernel's GEMM operands are pipelined into shared memory (cp.async,
    # 3 stages of 128x64 + 64x128 tiles) and its wide accesses vectorized: a
    # workspace pointer Triton cannot prove aligned used to lose both for
    # 16-bit types (32 KiB of shared memory, no cp.async, no v4).
    loops, mixed, wide = {}, {}, {}
    for line in lines:
        fields = dict(f.split("=") for f in line.split() if "=" in f)
        kernel, dtype = line.split()[1:3]
        assert "loop" in fields, "no SASS features (Triton's cuobjdump/nvdisasm missing?): " + line
        # The protocol as the hardware runs it: every acquire and release is
        # system-scoped (nothing narrower synchronises with a peer GPU), ptxas
        # drops the SM's L1 after each acquire (CCTL.IVALL: the weak loads that
        # follow see what peers wrote) and fences each release (MEMBAR.SYS),
        # and no data store lies between the barrier before a release and its
        # fence (a release is thread 0's; the barrier orders the other threads'
        # stores before it). The GEMM signals nothing.
        acquire, release = int(fields["acquire"]), int(fields["release"])
        assert (acquire > 0 and release > 0) == (not kernel.startswith("matmul")), line
        assert int(fields["narrow_scope"]) == int(fields["unfenced_releases"]) == 0, line
        assert int(fields["l1_invalidations"]) == acquire, line
        assert int(fields["sys_fences"]) == release, line
        if kernel == "matmul_b":
            # float8 with a row-major b: Hopper's FP8 MMAs take b K-major, so b
            # goes through registers into shared memory every K step, outside
            # cp.async: half the copies pipelined, a loop ~3x as long. Why the
            # float8 ops want w^T (w_transposed=True).
            slow = {k: int(fields[k]) for k in ("loop", "loop_ldgsts", "loop_mma")}
            continue
        if kernel.endswith(("_ieee", "_tf32x3")):
            wide[kernel] = {k: int(fields[k]) for k in ("loop", "loop_mma", "loop_ffma",
                                                        "loop_local", "stack", "warps")}
            continue
        if "*" in dtype:
            # Mixed operands (bfloat16 x, float8 w): w staged at one byte an
            # element (3 stages: 8 copies of x, 4 of w a step, less shared
            # memory than bfloat16 w), widened in registers for the same 8
            # bfloat16 MMAs; nothing spills.
            mixed[kernel] = {k: int(fields[k]) for k in ("loop", "loop_mma", "loop_ldgsts",
                                                         "loop_local")}
            shared = int(line.split(" bytes shared")[0].rsplit(" ", 1)[1])
            assert shared < 3 * (128 * 64 + 64 * 128) * 2, line
            continue
        shared = int(line.split(" bytes shared")[0].rsplit(" ", 1)[1])
        itemsize = 4 if "float32" in line else 2
        # (float8: K tiles of 128, the same bytes as 16-bit types' 64.)
        assert shared == 3 * (128 * 64 + 64 * 128) * itemsize, line
        assert int(fields["cp.async"]) > 0 and int(fields["v4"]) > 0, line
        # Communicating kernels time their waits by the GPU's clock; the GEMM has none.
        assert (int(fields["timer"]) > 0) == (not kernel.startswith("matmul")), line
        # The assembled K loop (SASS): every kernel issues the same tensor-core
        # MMAs and cp.async copies per iteration, and nothing spills in it.
        assert int(fields["loop_local"]) == 0, line
        # 8 warps (GEMM-RS with a float32 result): two warpgroups share the MMAs.
        warpgroups = int(fields["warps"]) // 4
        assert int(fields["loop_mma"]) * warpgroups == (16 if itemsize == 4 else 8), line
        if warpgroups == 1:
            loops[kernel, dtype] = {k: int(fields[k]) for k in ("loop", "loop_mma",
                                                                "loop_ldgsts")}
    # A persistent grid beyond what co-resides is refused (custom_calls.compiler):
    # two bf16 GEMM-RS programs fit an SM, one float32 (192 KiB of shared memory).
    assert ("residency on sm_90 ok: programs an SM {('gemm_rs0', 'bfloat16'): 2, "
            "('gemm_rs', 'float32'): 1}") in r.stdout, r.stdout + r.stderr[-4000:]
    # The fused kernels' K loop is the plain GEMM's (what the clock compares
    # against XLA's dot): the same MMAs and copies, and no more instructions
    # than it plus a tenth (the signalling stays outside the loop). Kernels
    # reading w transposed (*_wT, the backward pass's) compare with the plain
    # GEMM reading b transposed (matmul_bT).
    fast = loops["matmul_bT", "float8_e4m3fn"]
    assert slow["loop_mma"] == fast["loop_mma"] and 2 * slow["loop_ldgsts"] == fast["loop_ldgsts"]
    assert slow["loop"] > 2 * fast["loop"], (slow, fast)
    # The widening costs instructions (the bfloat16 K loop is ~144: matmul_mix
    # ~268), not MMAs or copies; the fused kernels' loops stay within the plain
    # mixed GEMM's plus a tenth.
    assert set(mixed) == {"matmul_mix", "ag_mix", "rs_mix"}, mixed
    for kernel, loop in mixed.items():
        assert (loop["loop_mma"], loop["loop_ldgsts"], loop["loop_local"]) == (8, 12, 0), mixed
        assert loop["loop"] <= 1.1 * mixed["matmul_mix"]["loop"], mixed
    # float32 beyond one tf32 pass, in the heuristic's configs (8 warps; K tiles
    # of 32 for exact float32): nothing spills in the K loop (tf32x3's GEMM-RS:
    # 16 bytes of stack outside it on Triton 3.6, none on 3.9; 4 warps: 552 to
    # 992 bytes, ~200 local accesses a step). Exact float32 runs on the CUDA
    # cores, its K loop almost all FFMA, with no stack at all; tf32x3 issues
    # three times the tf32 MMAs (two warpgroups share them).
    assert set(wide) == {"ag_ieee", "rs_ieee", "ag_tf32x3", "rs_tf32x3"}, wide
    for kernel, loop in wide.items():
        assert loop["loop_local"] == 0 and loop["stack"] <= 16 and loop["warps"] == 8, (kernel,
                                                                                        loop)
        if kernel.endswith("_ieee"):
            assert loop["stack"] == 0, (kernel, loop)
            assert loop["loop_mma"] == 0 and loop["loop_ffma"] >= 0.8 * loop["loop"], (kernel, loop)
        else:
            assert loop["loop_mma"] * 2 == 3 * 16, (kernel, loop)
    for (kernel, dtype), loop in loops.items():
        gemm_loop = loops["matmul_bT" if kernel.endswith("T") else "matmul", dtype]
        assert loop["loop_mma"] == gemm_loop["loop_mma"], (kernel, dtype, loops)
        assert loop["loop_ldgsts"] == gemm_loop["loop_ldgsts"], (kernel, dtype, loops)
        assert loop["loop"] <= 1.1 * gemm_loop["loop"], (kernel, dtype, loops)


def test_the_memory_ordering_readers_on_written_code():
    # What the compile check above counts, on code written for it: no compiler.
    from custom_calls.assembly import ptx_ordering, sass_ordering

    ptx = """
        @%p1 ld.global.sys.acquire.b32 %r1, [%rd1];
        @%p1 atom.global.acquire.gpu.add.u32 %r2, [%rd1], 0;
        ld.global.acquire.b32 %r3, [%rd1];
        @%p1 atom.global.sys.acq_rel.add.u32 %r4, [%rd2], 1;
        @%p1 atom.global.sys.release.exch.b32 %r5, [%rd3], %r6;
        atom.global.relaxed.gpu.cas.b32 %r7, [%rd4], 0, 5;
        wgmma.fence.sync.aligned;
    """
    # Two narrower than .sys: the explicit .gpu and the default scope (.gpu).
    assert ptx_ordering(ptx) == {"acquire": 4, "release": 2, "narrow_scope": 2}

    def listing(*instructions):
        return "\n".join(f"        /*{16 * i:04x}*/  {text} ;"
                         for i, text in enumerate(instructions))

    published = listing("STG.E.128 desc[UR4][R2.64], R4", "BAR.SYNC.DEFER_BLOCKING 0x0",
                        "@!PT LDS RZ, [RZ]", "MEMBAR.ALL.SYS", "ERRBAR",
                        "ATOMG.E.EXCH.STRONG.SYS PT, RZ, desc[UR4][R6.64], R8",
                        "LDG.E.STRONG.SYS R9, desc[UR4][R6.64]", "CCTL.IVALL")
    assert sass_ordering(published) == {"l1_invalidations": 1, "sys_fences": 1,
                                        "unfenced_releases": 0}
    # A strong store (another signal) may lie between; a weak one may not, nor
    # may a fence have no barrier before it.
    strong = listing("BAR.SYNC.DEFER_BLOCKING 0x0", "ATOMG.E.EXCH.STRONG.SYS PT, RZ, [R4.64], RZ",
                     "MEMBAR.ALL.SYS")
    weak = listing("BAR.SYNC.DEFER_BLOCKING 0x0", "@!P0 STG.E.128 desc[UR4][R2.64], R4",
                   "MEMBAR.ALL.SYS")
    alone = listing("STG.E desc[UR4][R2.64], R4", "@P0 MEMBAR.ALL.SYS")
    assert [sass_ordering(s)["unfenced_releases"] for s in (strong, weak, alone)] == [0, 1, 1]
