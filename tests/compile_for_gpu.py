"""Compiles every jax_flux Triton kernel for a CUDA target, without a GPU.

Run as a script in a process where Triton is in compiled mode (no
TRITON_INTERPRET): ``python -m tests.compile_for_gpu [sm]``. Triton lowers each
kernel to PTX and assembles it with its bundled ptxas, which catches what the
interpreter cannot: type errors between branches, unsupported atomics,
non-constexpr globals, pointer casts. Prints one line per kernel (with what
its PTX and SASS show: cp.async, vector accesses, registers, spills, the K
loop, programs that fit an SM) and exits non-zero on the first failure.
"""

import os
import sys

# Compiled mode, explicitly: importing custom_calls on a CPU-only host would
# otherwise switch Triton to its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0")

from custom_calls import ag_gemm, compiler, gemm, gemm_rs  # noqa: E402
from custom_calls.assembly import programs_per_sm, ptx_features, sass_features  # noqa: E402
from custom_calls.compiler import (FLOAT8_TYPE, TRITON_TYPE, Compiled,  # noqa: E402
                                   check_resident, compile_kernel, ptx_param_count)


def _ag(precision: str, pull: bool, w_trans: bool = False, block_k: int = 64,
        rows: int = 512) -> dict:
    return dict(M_LOCAL=512, N=6144, K=12288, WORLD=8, SIG_OFF=128, DATA_OFF=1 << 20,
                CHUNK_ROWS=128, COMM_PROGRAMS=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k,
                GROUP_M=8,
                COPY_ROWS=32, COPY_COLS=256, RETURN_GATHERED=True, UPCAST=False,
                INPUT_PRECISION=precision, REMOTE_CACHE=".cg", ROTATE=True, PULL=pull,
                W_TRANS=w_trans, ROWS=rows)


def _rs(precision: str, reducers: int, w_trans: bool = False, block_k: int = 64,
        rows: int = 512) -> dict:
    return dict(M_OWN=512, N=12288, K=6144, WORLD=8, SIG_OFF=128, DATA_OFF=1 << 20,
                REDUCE_PROGRAMS=reducers, BLOCK_M=128, GROUP_M=8, BLOCK_N=128, BLOCK_K=block_k,
                UPCAST=False, INPUT_PRECISION=precision, REMOTE_CACHE=".cg", ROTATE=True,
                W_TRANS=w_trans, ROWS=rows)


def cases():
    """(name, kernel, pointer types, constexprs, dtype[, num_warps: default 4])."""
    for dtype, t in TRITON_TYPE.items():
        precision = "tf32" if dtype == "float32" else "ieee"
        yield ("matmul", gemm.matmul_kernel, gemm.pointer_types(t),
               dict(M=4096, N=4096, K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                    UPCAST=False, INPUT_PRECISION=precision, B_TRANS=False), dtype)
        # PULL: the peers' staged shards copied in (16-bit only, to keep it short).
        for name, pull in (("ag_gemm", False), ("ag_pull", True)):
            if pull and dtype != "bfloat16":
                continue
            yield (name, ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t), _ag(precision, pull),
                   dtype)
        # REDUCE_PROGRAMS=0: the own tiles' epilogue reduces (16-bit only, to keep it short).
        for name, reducers in (("gemm_rs", 8), ("gemm_rs0", 0)):
            if reducers == 0 and dtype != "bfloat16":
                continue
            yield (name, gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t),
                   _rs(precision, reducers), dtype)
        if dtype == "bfloat16":
            # A float32 result (preferred_element_type). GEMM-RS's epilogue then
            # sums float32 partials into the float32 tile: with 4 warps that
            # spills into the K loop, so its default takes 8.
            yield ("ag_f32out", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t, "fp32"),
                   _ag(precision, False), dtype)
            yield ("rs0_f32out", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t, "fp32"),
                   _rs(precision, 0), dtype, 8)
            # jax.vmap with a shared w: a batch of 8 problems of 64 rows a rank
            # folded into one launch (rows interleaved in y, resp. x).
            yield ("ag_vmap", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t),
                   _ag(precision, False, rows=64), dtype)
            yield ("rs_vmap", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t),
                   _rs(precision, 0, rows=64), dtype)
        if dtype in ("bfloat16", "float32"):
            # The backward pass's kernels: w read in place as w^T [N, K] (K
            # contiguous, the operand layout tf32 MMAs want anyway), and the
            # plain GEMM reading b that way, which their K loops compare with.
            yield ("matmul_bT", gemm.matmul_kernel, gemm.pointer_types(t),
                   dict(M=4096, N=4096, K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                        UPCAST=False, INPUT_PRECISION=precision, B_TRANS=True), dtype)
            yield ("ag_wT", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t),
                   _ag(precision, False, True), dtype)
            yield ("rs_wT", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t),
                   _rs(precision, 0 if dtype == "bfloat16" else 8, True), dtype)
    # float32 at the ops' precision HIGHEST ("ieee": float32 FMAs, no tensor
    # cores) and TF32_TF32_F32_X3 ("tf32x3": three tf32 MMAs), with the
    # heuristic's configs for them (jax_flux.config.WIDE_F32): 8 warps, and K
    # tiles of 32 for ieee.
    for name, kernel, pointers, config in (
            ("ag_ieee", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types("fp32"),
             _ag("ieee", False, block_k=32)),
            ("rs_ieee", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types("fp32"),
             _rs("ieee", 0, block_k=32)),
            ("ag_tf32x3", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types("fp32"),
             _ag("tf32x3", False)),
            ("rs_tf32x3", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types("fp32"),
             _rs("tf32x3", 0))):
        yield name, kernel, pointers, config, "float32", 8
    # float8_e4m3fn operands, bfloat16 results (partials), K tiles of 128: Hopper's
    # FP8 MMAs take w K-major, so w^T (w_transposed) is the pipelined layout; a
    # row-major w is transposed through registers every K step (matmul_fp8_b).
    t = FLOAT8_TYPE["float8_e4m3fn"]
    gemm_fp8 = dict(M=4096, N=4096, K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
                    UPCAST=False, INPUT_PRECISION="ieee")
    yield ("matmul_bT", gemm.matmul_kernel, dict(gemm.pointer_types(t), c_ptr="*bf16"),
           dict(gemm_fp8, B_TRANS=True), "float8_e4m3fn")
    yield ("matmul_b", gemm.matmul_kernel, dict(gemm.pointer_types(t), c_ptr="*bf16"),
           dict(gemm_fp8, B_TRANS=False), "float8_e4m3fn")
    yield ("ag_wT", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types(t, "bf16"),
           _ag("ieee", False, True, 128), "float8_e4m3fn")
    yield ("rs_wT", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types(t, "bf16"),
           _rs("ieee", 0, True, 128), "float8_e4m3fn")

    # Mixed operands: bfloat16 x against a float8_e4m3fn w (weight-only float8,
    # and the backward pass's bfloat16 cotangent against a float8 weight). w's
    # tiles are staged at one byte an element, then widened to bfloat16 in
    # registers for the bfloat16 MMAs.
    mixed = "bfloat16*float8_e4m3fn"
    yield ("matmul_mix", gemm.matmul_kernel, gemm.pointer_types("bf16", t),
           dict(gemm_fp8, BLOCK_K=64, B_TRANS=False), mixed)
    yield ("ag_mix", ag_gemm.ag_gemm_kernel, ag_gemm.pointer_types("bf16", None, t),
           _ag("ieee", False), mixed)
    yield ("rs_mix", gemm_rs.gemm_rs_kernel, gemm_rs.pointer_types("bf16", None, t),
           _rs("ieee", 0), mixed)


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: this compiles for a GPU", file=sys.stderr)
        return 2
    arch = int(argv[0]) if argv else 90
    for name, kernel, pointers, constexprs, dtype, *warps in cases():
        c = compile_kernel(kernel, arch, tuple(pointers.items()), tuple(sorted(constexprs.items())),
                           num_warps=warps[0] if warps else 4, num_stages=3)
        # The one-GPU rank emulation launches through the driver: runtime
        # parameters in order, then Triton's scratch pointers.
        params = ptx_param_count(c.ptx, c.name)
        if params != len(c.params) + Compiled.TRAILING_SCRATCH_PARAMS:
            print(f"sm_{arch} {name}: {params} PTX parameters, expected {len(c.params)} + "
                  f"{Compiled.TRAILING_SCRATCH_PARAMS}", file=sys.stderr)
            return 1
        # jax-triton 0.3.1 builds jaxlib's TritonKernel without a global scratch
        # size (jaxlib 0.11 takes one), and the rank emulation passes null
        # scratch pointers: a kernel that needs scratch (device-side TMA
        # descriptors, say) would get none at run time.
        if c.global_scratch:
            print(f"sm_{arch} {name}: needs {c.global_scratch} bytes of Triton global scratch "
                  f"a program; neither jax-triton 0.3.1 nor the rank emulation provides any",
                  file=sys.stderr)
            return 1
        f = ptx_features(c.ptx)
        sass = sass_features(c.cubin)
        if sass:
            sass["fit"] = programs_per_sm(sass["regs"], c.shared + sass["static_shared"],
                                          c.num_warps)["fit"]
        s = " ".join(f"{k}={v}" for k, v in sass.items())
        print(f"sm_{arch} {name:<10} {dtype:<9} ok: {len(c.ptx)} bytes of PTX, "
              f"{len(c.cubin)} bytes of cubin, {params} parameters, {c.shared} bytes shared, "
              f"cp.async={f['cp.async']} v4={f['v4']} timer={f['timer']} acquire={f['acquire']} "
              f"release={f['release']} narrow_scope={f['narrow_scope']} warps={c.num_warps} "
              f"{s}".rstrip())
    return check_residency(arch)


def check_residency(arch: int) -> int:
    """``compiler.check_resident`` on two compiled kernels (both cached above): two
    bf16 GEMM-RS programs of 4 warps fit an SM of sm_90, one float32 (its 3 stages
    take 192 KiB of shared memory); a grid of one more is refused."""
    fits = {}
    for name, kernel, pointers, constexprs, dtype, *_ in cases():
        if (name, dtype) not in (("gemm_rs0", "bfloat16"), ("gemm_rs", "float32")):
            continue
        args = dict(sms=132, capability=arch, pointers=tuple(pointers.items()),
                    constexprs=tuple(sorted(constexprs.items())), num_warps=4, num_stages=3)
        fit = compiler.programs_per_sm(kernel, arch, args["pointers"], args["constexprs"],
                                       args["num_warps"], args["num_stages"])["fit"]
        check_resident(kernel, 132 * fit, **args)
        try:
            check_resident(kernel, 132 * fit + 1, **args)
        except ValueError as e:
            if f"132 SMs x {fit} program(s)" not in str(e):
                print(f"sm_{arch} residency: unexpected message: {e}", file=sys.stderr)
                return 1
        else:
            print(f"sm_{arch} residency: {132 * fit + 1} programs of {name} {dtype} accepted",
                  file=sys.stderr)
            return 1
        fits[name, dtype] = fit
    print(f"residency on sm_{arch} ok: programs an SM {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
