"""Compiles every jax_flux Triton kernel for a CUDA target, without a GPU.

Run as a script in a process where Triton is in compiled mode (no
TRITON_INTERPRET): ``python -m tests.compile_for_gpu [sm]``. Triton lowers each
kernel to PTX and assembles it with its bundled ptxas, which catches what the
interpreter cannot: type errors between branches, unsupported atomics,
non-constexpr globals, pointer casts. Prints one line per kernel and exits
non-zero on the first failure.
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from custom_calls import ag_gemm, gemm, gemm_rs

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _signature(kernel, pointer_types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        else:
            sig[name] = "i32"
    return sig


def cases():
    for dtype, t in _DTYPES.items():
        precision = "tf32" if dtype == "float32" else "ieee"
        yield ("matmul", gemm.matmul_kernel,
               {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": f"*{t}"},
               dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, UPCAST=False,
                    INPUT_PRECISION=precision), dtype)
        yield ("ag_gemm", ag_gemm.ag_gemm_kernel,
               {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
                "y_ptr": f"*{t}", "status_ptr": "*i32", "xg_ptr": f"*{t}"},
               dict(WORLD=8, SIG_OFF=128, DATA_OFF=512, CHUNK_ROWS=128, COMM_PROGRAMS=2,
                    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, COPY_ROWS=32, COPY_COLS=128,
                    RETURN_GATHERED=True, UPCAST=False, INPUT_PRECISION=precision,
                    REMOTE_CACHE=".cg", ROTATE=True), dtype)
        yield ("gemm_rs", gemm_rs.gemm_rs_kernel,
               {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
                "z_ptr": f"*{t}", "status_ptr": "*i32"},
               dict(WORLD=8, SIG_OFF=128, DATA_OFF=512, REDUCE_PROGRAMS=8, BLOCK_M=128,
                    BLOCK_N=128, BLOCK_K=64, UPCAST=False, INPUT_PRECISION=precision,
                    REMOTE_CACHE=".cg", ROTATE=True), dtype)


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: this compiles for a GPU", file=sys.stderr)
        return 2
    arch = int(argv[0]) if argv else 90
    target = GPUTarget("cuda", arch, 32)
    for name, kernel, pointers, constexprs, dtype in cases():
        src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs),
                        constexprs=constexprs)
        compiled = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
        print(f"sm_{arch} {name:<8} {dtype:<9} ok: {len(compiled.asm['ptx'])} bytes of PTX, "
              f"{len(compiled.asm['cubin'])} bytes of cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
