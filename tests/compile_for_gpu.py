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

# Compiled mode, explicitly: importing custom_calls on a CPU-only host would
# otherwise switch Triton to its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0")

from custom_calls import ag_gemm, gemm, gemm_rs  # noqa: E402
from custom_calls.rank_emulation import Compiled, compile_kernel, ptx_param_count  # noqa: E402

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def ptx_features(ptx: str) -> dict:
    """Counts of what a well-compiled kernel shows in its PTX.

    Loads Triton could prove aligned become cp.async (pipelined into shared
    memory) and wide vector accesses (a workspace pointer it cannot see through
    shows up as none); Hopper MMAs are wgmma; the communicating kernels time
    their waits by the GPU's global timer.
    """
    return {
        "cp.async": ptx.count("cp.async.cg.shared.global") + ptx.count("cp.async.ca.shared.global"),
        "v4": sum(ptx.count(f"{op}.v4") for op in ("st.global", "ld.global")),
        "wgmma": ptx.count("wgmma.mma_async"),
        "timer": ptx.count("%globaltimer"),
    }


def cases():
    for dtype, t in _DTYPES.items():
        precision = "tf32" if dtype == "float32" else "ieee"
        yield ("matmul", gemm.matmul_kernel,
               {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": f"*{t}"},
               dict(M=4096, N=4096, K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                    UPCAST=False,
                    INPUT_PRECISION=precision), dtype)
        yield ("ag_gemm", ag_gemm.ag_gemm_kernel,
               {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
                "y_ptr": f"*{t}", "status_ptr": "*i32", "xg_ptr": f"*{t}"},
               dict(M_LOCAL=512, N=6144, K=12288, WORLD=8, SIG_OFF=128, DATA_OFF=1 << 20,
                    CHUNK_ROWS=128, COMM_PROGRAMS=2,
                    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, COPY_ROWS=32, COPY_COLS=128,
                    RETURN_GATHERED=True, UPCAST=False, INPUT_PRECISION=precision,
                    REMOTE_CACHE=".cg", ROTATE=True, TIMED=True), dtype)
        yield ("gemm_rs", gemm_rs.gemm_rs_kernel,
               {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "ctx_ptr": "*i32", "table_ptr": "*u32",
                "z_ptr": f"*{t}", "status_ptr": "*i32"},
               dict(M_OWN=512, N=12288, K=6144, WORLD=8, SIG_OFF=128, DATA_OFF=1 << 20,
                    REDUCE_PROGRAMS=8, BLOCK_M=128,
                    BLOCK_N=128, BLOCK_K=64, UPCAST=False, INPUT_PRECISION=precision,
                    REMOTE_CACHE=".cg", ROTATE=True, TIMED=True), dtype)


def main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: this compiles for a GPU", file=sys.stderr)
        return 2
    arch = int(argv[0]) if argv else 90
    for name, kernel, pointers, constexprs, dtype in cases():
        c = compile_kernel(kernel, arch, tuple(pointers.items()), tuple(sorted(constexprs.items())),
                           num_warps=4, num_stages=3)
        # The one-GPU rank emulation launches through the driver: runtime
        # parameters in order, then Triton's scratch pointers.
        params = ptx_param_count(c.ptx, c.name)
        if params != len(c.params) + Compiled.TRAILING_SCRATCH_PARAMS:
            print(f"sm_{arch} {name}: {params} PTX parameters, expected {len(c.params)} + "
                  f"{Compiled.TRAILING_SCRATCH_PARAMS}", file=sys.stderr)
            return 1
        f = ptx_features(c.ptx)
        print(f"sm_{arch} {name:<8} {dtype:<9} ok: {len(c.ptx)} bytes of PTX, "
              f"{len(c.cubin)} bytes of cubin, {params} parameters, {c.shared} bytes shared, "
              f"cp.async={f['cp.async']} v4={f['v4']} timer={f['timer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
