"""Drives custom_calls.rank_emulation over the fake libcuda and checks every launch it makes.

    JAX_FLUX_LIBCUDA=.../libcuda_fake.so TRITON_INTERPRET=0 python -m tests.fake_cuda.emulation_check

Kernels are compiled for real (Triton, sm_90) and loaded into the fake, which
records launches instead of running them. Checked: one launch per rank, on
that rank's stream, with the grid, block and shared memory of the compiled
kernel, and the runtime parameters in the kernel's order (this rank's
buffers, the shared pointer table, null scratch pointers); the table and
context contents; outputs poisoned (no kernel ran). Prints "OK" at the end.
"""

import ctypes
import os
import sys

import ml_dtypes
import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "0")

from custom_calls import cuda_driver  # noqa: E402
from custom_calls.rank_emulation import OneGpuWorld  # noqa: E402

WORLD = 8


def launches(lib, first: int, nparams: int) -> list[dict]:
    out = []
    for i in range(first, lib.fakeCudaLaunchCount()):
        buf = (ctypes.c_uint64 * (5 + nparams))()
        assert lib.fakeCudaLaunch(i, buf) == nparams
        out.append({"function": buf[0], "stream": buf[1], "grid": buf[2], "block": buf[3],
                    "shared": buf[4], "params": list(buf[5:])})
    return out


def check_table(world: OneGpuWorld, table_ptr: int) -> None:
    table = world.download(table_ptr, (2 * WORLD, 2), np.uint32).astype(np.uint64)
    addr = [int(lo | (hi << 32)) for lo, hi in table]
    assert addr[:WORLD] == world._ws, "pointer table: workspaces"
    records = addr[WORLD:]
    assert len(set(records)) == WORLD and not set(records) & set(world._ws), "error records"
    for r in records:
        assert not world.download(r, (8,), np.int32).any(), "error records start zeroed"


def main() -> int:
    lib = cuda_driver.lib()
    lib.fakeCudaLaunchCount.restype = ctypes.c_int
    world = OneGpuWorld(WORLD)
    assert world.programs_per_rank == 132 // WORLD
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    m, k, n = 32, 64, 48

    # AG-GEMM: 7 runtime parameters + Triton's 2 scratch pointers.
    lib.fakeCudaSetParamCount(9)
    first = lib.fakeCudaLaunchCount()
    xs = [rng.standard_normal((m, k)).astype(bf16) for _ in range(WORLD)]
    ws = [rng.standard_normal((k, n)).astype(bf16) for _ in range(WORLD)]
    cfg = dict(block_m=32, block_n=64, block_k=32, chunk_rows=16, comm_programs=2, copy_rows=16,
               copy_cols=64, num_warps=4, num_stages=3)
    ys, xgs, ms = world.ag_gemm(xs, ws, cfg=cfg, grid=16, timeout_ms=1234, precision="ieee",
                                return_gathered=True)
    got = launches(lib, first, 9)
    assert len(got) == WORLD, len(got)
    assert len({g["function"] for g in got}) == 1 and ms == 1.0
    for r, g in enumerate(got):
        assert g["stream"] == world.streams[r] and g["grid"] == 16 and g["block"] == 128, g
        buf = world._buffers
        names = ["x", "w", "ctx", None, "y", "status", "xg"]
        for i, name in enumerate(names):
            if name is not None:
                key = next(key for key in buf if key[0] == r and key[1] == name)
                assert g["params"][i] == buf[key], (r, name)
        assert g["params"][7:] == [0, 0], "scratch pointers"
        assert world.download(g["params"][0], (m, k), bf16).tobytes() == xs[r].tobytes()
        ctx = world.download(g["params"][2], (2,), np.int32)
        assert ctx.tolist() == [r, 1234], ctx
    assert len({g["params"][3] for g in got}) == 1, "one pointer table for all ranks"
    check_table(world, got[0]["params"][3])
    assert all(np.isnan(y.astype(np.float32)).all() for y in ys), "outputs poisoned"
    assert all(np.isnan(x.astype(np.float32)).all() for x in xgs)

    # float8 operands, w given transposed, bfloat16 results (and partials).
    f8 = ml_dtypes.float8_e4m3fn
    xs8 = [rng.standard_normal((m, k)).astype(f8) for _ in range(WORLD)]
    wts8 = [rng.standard_normal((n, k)).astype(f8) for _ in range(WORLD)]
    first = lib.fakeCudaLaunchCount()
    ys, _, _ = world.ag_gemm(xs8, wts8, cfg=dict(cfg, block_k=64), grid=16, timeout_ms=5,
                             precision="ieee", out_dtype=bf16, w_transposed=True)
    got = launches(lib, first, 9)
    assert len(got) == WORLD and all(y.dtype == bf16 and y.shape == (WORLD * m, n) for y in ys)
    assert world.download(got[2]["params"][1], (n, k), f8).tobytes() == wts8[2].tobytes()
    lib.fakeCudaSetParamCount(8)
    first = lib.fakeCudaLaunchCount()
    zs, _ = world.gemm_rs(xs8, wts8,
                          cfg=dict(block_m=16, block_n=64, block_k=64, reduce_programs=0,
                                   num_warps=4, num_stages=3),
                          grid=8, timeout_ms=5, precision="ieee", out_dtype=bf16,
                          w_transposed=True)
    assert len(launches(lib, first, 8)) == WORLD
    assert all(z.dtype == bf16 and z.shape == (m // WORLD, n) for z in zs)

    # Mixed operands: bfloat16 x against a float8 w (its own pointer type).
    xs16 = [x.astype(bf16) for x in xs8]
    first = lib.fakeCudaLaunchCount()
    zs, _ = world.gemm_rs(xs16, wts8,
                          cfg=dict(block_m=16, block_n=64, block_k=64, reduce_programs=0,
                                   num_warps=4, num_stages=3),
                          grid=8, timeout_ms=5, precision="ieee", w_transposed=True)
    got = launches(lib, first, 8)
    assert len(got) == WORLD and all(z.dtype == bf16 for z in zs)
    assert world.download(got[5]["params"][1], (n, k), f8).tobytes() == wts8[5].tobytes()
    lib.fakeCudaSetParamCount(5)
    first = lib.fakeCudaLaunchCount()
    cs, _ = world.matmul(xs16, wts8, block_m=16, block_n=32, block_k=32, num_warps=4,
                         num_stages=3, precision="ieee", b_transposed=True)
    assert len(launches(lib, first, 5)) == WORLD and all(c.dtype == bf16 for c in cs)

    # GEMM-RS: 6 + 2 parameters; a second workspace size reuses the buffers.
    lib.fakeCudaSetParamCount(8)
    first = lib.fakeCudaLaunchCount()
    xs = [rng.standard_normal((WORLD * 4, k)).astype(bf16) for _ in range(WORLD)]
    rs_cfg = dict(block_m=16, block_n=64, block_k=32, reduce_programs=2, num_warps=4,
                  num_stages=3)
    zs, _ = world.gemm_rs(xs, ws, cfg=rs_cfg, grid=8, timeout_ms=99, precision="ieee")
    got = launches(lib, first, 8)
    assert len(got) == WORLD and all(g["grid"] == 8 for g in got)
    assert all(g["params"][6:] == [0, 0] for g in got)
    check_table(world, got[0]["params"][3])
    assert all(z.shape == (4, n) for z in zs)

    # The no-communication baseline: 3 + 2 parameters, one program per tile.
    lib.fakeCudaSetParamCount(5)
    first = lib.fakeCudaLaunchCount()
    world.matmul(xs, ws, block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=3,
                 precision="ieee")
    got = launches(lib, first, 5)
    assert len(got) == WORLD and all(g["grid"] == (WORLD * 4 // 16) * -(-n // 32) for g in got)

    # Ranks told to skip never launch.
    lib.fakeCudaSetParamCount(9)
    first = lib.fakeCudaLaunchCount()
    skipping = OneGpuWorld(WORLD, skip_ranks={3})
    skipping.ag_gemm([x[:m] for x in xs], ws, cfg=cfg, grid=16, timeout_ms=1, precision="ieee")
    got = launches(lib, first, 9)
    assert [skipping.streams.index(g["stream"]) for g in got] == [0, 1, 2, 4, 5, 6, 7]

    # A persistent grid that cannot co-reside is refused before any launch.
    try:
        world.ag_gemm([x[:m] for x in xs], ws, cfg=cfg, grid=17, timeout_ms=1,
                      precision="ieee")
    except ValueError as e:
        assert "exceeds 16 programs per rank" in str(e), e
    else:
        raise AssertionError("grid 17 with 16 programs per rank was launched")
    # benchmarks.emulated's per-point driver, on tiny shapes (numbers meaningless here).
    from benchmarks import emulated

    lib.fakeCudaSetParamCount(0)  # mixed kernels: record no parameters
    for op in ("all_gather_matmul", "matmul_reduce_scatter"):
        for variant in emulated.VARIANTS[op]:
            row = emulated.run(op, WORLD * 8, 64, 64, 1, world, variant)
            assert set(row) == set(emulated.COLUMNS) and row["fused_ms"] == 1.0, row
            assert row["variant"] == variant, row
        row = emulated.run(op, WORLD * 8, 128, 64, 1, world, None, "float8_e4m3fn")
        assert row["dtype"] == "float8_e4m3fn" and row["fused_ms"] == 1.0, row
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
