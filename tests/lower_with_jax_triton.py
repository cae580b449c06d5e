"""Lowers the fused ops for CUDA through the real jax-triton, on a host without a GPU.

    python -m tests.lower_with_jax_triton        # exit 0: ok, 77: jax-triton not importable

Needs jax-triton and a CUDA plugin of jaxlib installed (the plugin only has
to import; no GPU, no cuDNN). jax-triton compiles each kernel with Triton for
an H100 (compute capability 90, given here since there is no device to ask)
and emits the custom call XLA would launch; this prints, per op and dtype,
what that call carries: the kernel, its PTX target, whether the GEMM operands
are pipelined (cp.async) and the MMAs are Hopper's (wgmma), and checks that the
program holds no XLA collective and, in ``async`` mode, no status check.
The workspace comes from tests/fake_cuda (needs gcc and cuda.h).

Run in a process of its own: Triton must be in compiled mode.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings
import zlib

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TRITON_INTERPRET"] = "0"
# The sync check's host callback cannot be lowered for CUDA from a CPU backend.
os.environ["JAX_FLUX_STATUS_CHECK"] = "async"
os.environ["JAX_FLUX_ON_PEER_TIMEOUT"] = "log"

SKIP = 77


def _backend_configs(text: str) -> list[bytes]:
    """The decompressed kernel calls of the program's jax-triton custom calls: a
    ``triton_kernel_call``'s backend_config (jax-triton 0.3), a
    ``triton_kernel_call_ffi``'s ``opaque`` attribute (0.4)."""
    calls = re.findall(r'@triton_kernel_call\(.*?backend_config = "((?:[^"\\]|\\.)*)"', text)
    calls += re.findall(r'@triton_kernel_call_ffi\(.*?opaque = "((?:[^"\\]|\\.)*)"', text)
    return [_decompress(c) for c in calls]


def _decompress(escaped: str) -> bytes:
    raw, i = bytearray(), 0
    while i < len(escaped):  # MLIR string escapes: \\, \", \XX (hex)
        if escaped[i] == "\\":
            if escaped[i + 1] in '\\"':
                raw.append(ord(escaped[i + 1]))
                i += 2
            else:
                raw.append(int(escaped[i + 1:i + 3], 16))
                i += 3
        else:
            raw.append(ord(escaped[i]))
            i += 1
    return zlib.decompress(bytes(raw))


def _kernel(config: bytes) -> tuple[str, str, dict]:
    """(entry name, PTX target, PTX features) of one call's kernel."""
    from custom_calls.assembly import ptx_features

    text = config.decode("latin1")
    ptx = text[text.index(".version"):]
    return (re.findall(r"\.entry (\w+)", ptx)[0], re.findall(r"\.target (\S+)", ptx)[0],
            ptx_features(ptx))


def main() -> int:
    try:
        import jax_triton  # noqa: F401
        from jax_triton import triton_lib
    except Exception as e:  # not installed, or no CUDA plugin of jaxlib
        print(f"jax-triton not importable here: {e}")
        return SKIP
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from tests.helpers import build_fake_libcuda

    lib_dir = tempfile.mkdtemp(prefix="jax_flux_fake_cuda_")
    atexit.register(shutil.rmtree, lib_dir, ignore_errors=True)
    os.environ["JAX_FLUX_LIBCUDA"] = build_fake_libcuda(pathlib.Path(lib_dir))
    # No device to ask: compile for an H100.
    triton_lib.triton_kernel_call_lib.get_compute_capability = lambda device: 90

    import jax
    import jax.numpy as jnp

    from jax_flux import errors, testing
    from tests.helpers import fused_fn, mesh_of

    mesh = mesh_of(4)
    f32 = {"preferred_element_type": jnp.float32}
    # (op, dtype, (m, k, n), op keywords, vmapped): a float32 result from bf16
    # operands (its own pointer types), and a vmapped call (one folded launch).
    cases = [("all_gather_matmul", jnp.bfloat16, (512, 256, 1024), {}, False),
             ("matmul_reduce_scatter", jnp.bfloat16, (512, 1024, 256), {}, False),
             ("all_gather_matmul", jnp.float32, (512, 256, 1024), {}, False),
             ("matmul_reduce_scatter", jnp.float16, (512, 1024, 256), {}, False),
             ("all_gather_matmul", jnp.bfloat16, (512, 256, 1024), f32, False),
             ("matmul_reduce_scatter", jnp.bfloat16, (512, 1024, 256), f32, False),
             ("all_gather_matmul", jnp.bfloat16, (512, 256, 1024), {}, True),
             ("matmul_reduce_scatter", jnp.bfloat16, (512, 1024, 256), {}, True)]
    # float8 operands, a bfloat16 result, w given as w^T (the layout FP8 MMAs want).
    fp8 = {"preferred_element_type": jnp.bfloat16, "w_transposed": True}
    cases += [("all_gather_matmul", jnp.float8_e4m3fn, (512, 256, 1024), fp8, False),
              ("matmul_reduce_scatter", jnp.float8_e4m3fn, (512, 1024, 256), fp8, False)]
    # Mixed operands: bfloat16 x against a float8 w (widened in registers).
    w8 = {"w_dtype": jnp.float8_e4m3fn}
    cases += [("all_gather_matmul", jnp.bfloat16, (512, 256, 1024), w8, False),
              ("matmul_reduce_scatter", jnp.bfloat16, (512, 1024, 256), w8, False)]
    for op, dtype, (m, k, n), kw, vmapped in cases:
        x, w, _, _ = testing.random_operands(m, k, n, dtype, w_dtype=kw.get("w_dtype"))
        kw = {key: v for key, v in kw.items() if key != "w_dtype"}
        xs, ws = testing.place(op, mesh, x, w, w_transposed=kw.get("w_transposed", False))
        fn = testing.sharded(op, mesh, "fused", **kw) if kw.get("w_transposed") else fused_fn(
            op, mesh, **kw)
        if vmapped:
            fn, xs = jax.jit(jax.vmap(fn, in_axes=(0, None))), jnp.stack([xs, xs])
        text = fn.trace(xs, ws).lower(lowering_platforms=("cuda",)).as_text()
        for name in ("all-gather", "all_gather", "reduce-scatter", "reduce_scatter"):
            assert f"stablehlo.{name}" not in text, (op, name)
        assert "stablehlo.case" not in text and "callback" not in text, op  # async: no check
        # vmapped with a shared w: the batch folded into one launch, no loop.
        assert "stablehlo.while" not in text, op
        configs = _backend_configs(text)
        assert len(configs) == 1, (op, len(configs))
        entry, target, f = _kernel(configs[0])
        out = jnp.dtype(kw.get("preferred_element_type", dtype)).name
        wname = "" if w.dtype == x.dtype else f"x {w.dtype.name} "
        print(f"{op:22s} {jnp.dtype(dtype).name:13s}{wname}-> {out:9s} "
              f"{'vmap ' if vmapped else ''}{'w^T ' if kw.get('w_transposed') else ''}"
              f"kernel={entry} target={target} cp.async={f['cp.async']} "
              f"wgmma={f['wgmma']} timer={f['timer']} acquire={f['acquire']} "
              f"release={f['release']} narrow_scope={f['narrow_scope']}")
        assert target == "sm_90a" and f["cp.async"] > 0 and f["wgmma"] > 0, (op, dtype)
        # What XLA will launch signals at system scope (tests/test_kernels_compile.py).
        assert f["acquire"] > 0 and f["release"] > 0 and f["narrow_scope"] == 0, (op, dtype)
    # The gradient: the forward's kernel and dx's, the other op reading w^T in
    # place (no transpose of w in the program); with float8 operands, dx's
    # kernel takes the bfloat16 cotangent against the float8 w (no convert of w).
    for op, dtype in itertools.product(testing.OPS, (jnp.bfloat16, jnp.float8_e4m3fn)):
        m, k, n = (512, 256, 1024) if op == "all_gather_matmul" else (512, 1024, 256)
        x, w, _, _ = testing.random_operands(m, k, n, dtype)
        xs, ws = testing.place(op, mesh, x, w)
        g = jnp.ones((m, n), jnp.bfloat16)
        text = testing.sharded(op, mesh, "fused", grad=True,
                               preferred_element_type=jnp.bfloat16).trace(xs, ws, g).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.transpose" not in text, op
        local = "x".join(map(str, ws.sharding.shard_shape(ws.shape)))
        assert f"tensor<{local}xf8E4M3FN>) -> tensor<{local}xbf16>" not in text, op
        kernels = [_kernel(c) for c in _backend_configs(text)]
        assert sorted(e for e, _, _ in kernels) == ["ag_gemm_kernel", "gemm_rs_kernel"], kernels
        assert all(t == "sm_90a" and f["cp.async"] > 0 and f["wgmma"] > 0 and
                   f["narrow_scope"] == 0 for _, t, f in kernels), (op, kernels)
        print(f"{op:22s} {jnp.dtype(dtype).name:13s} gradient: "
              f"kernels={[e for e, _, _ in kernels]}, no transpose or convert of w")
    check_auto(mesh)
    check_precision(mesh)
    check_residency(mesh)
    errors.watchdog.stop()
    return 0


def check_auto(mesh) -> None:
    """impl="auto" where a record says fused: the choice made at lowering takes the
    kernel (the fake driver's GPUs have NVLink-like links), no collective."""
    import jax
    import jax.numpy as jnp

    from jax_flux import autotune, testing

    os.environ["JAX_FLUX_AUTOTUNE_CACHE"] = os.path.join(tempfile.mkdtemp(), "autotune.json")
    for op, (m, k, n), local in (("all_gather_matmul", (512, 256, 1024), (128, 256, 256)),
                                 ("matmul_reduce_scatter", (512, 1024, 256), (128, 256, 256))):
        autotune.record(op, autotune.key(op, "cpu", *local, jnp.bfloat16, 4),
                        autotune.CONFIG_CLASSES[op](), 0.5, baselines_ms={"xla": 1.0})
        x, w, _, _ = testing.random_operands(m, k, n, jnp.bfloat16)
        xs, ws = testing.place(op, mesh, x, w)
        text = testing.sharded.__wrapped__(op, mesh, "auto").trace(xs, ws).lower(
            lowering_platforms=("cuda",)).as_text()
        assert len(_backend_configs(text)) == 1, op
        for name in ("all_gather", "reduce_scatter", "collective_permute"):
            assert f"stablehlo.{name}" not in text, (op, name)
        print(f"{op:22s} bfloat16 auto (a record says fused): one kernel, no collective")
        # For jax.export (a program to run in another process) auto takes xla,
        # and impl="fused" refuses before jax-triton compiles anything.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's warning says why
            text = jax.export.export(testing.sharded.__wrapped__(op, mesh, "auto"),
                                     platforms=("cuda",))(xs, ws).mlir_module()
        collective = "all_gather" if op == "all_gather_matmul" else "reduce_scatter"
        assert "triton_kernel_call" not in text and f"stablehlo.{collective}" in text, op
        try:
            jax.export.export(testing.sharded.__wrapped__(op, mesh, "fused"),
                              platforms=("cuda",))(xs, ws)
        except ValueError as e:
            assert "cannot be exported" in str(e), e
        else:
            raise AssertionError(f"{op}: impl='fused' exported")
        print(f"{op:22s} bfloat16 jax.export for cuda: auto exports xla, fused refuses")


def check_precision(mesh) -> None:
    """The ops' ``precision`` reaches the kernel jax-triton compiles: float32 operands
    go to tensorfloat32 wgmma by default, three times as many at TF32_TF32_F32_X3,
    and to float32 FMAs (no tensor cores) at HIGHEST, as XLA's dot runs them, in
    the heuristic's configs for each."""
    import jax.numpy as jnp
    from jax import lax

    from jax_flux import testing

    for op, (m, k, n) in (("all_gather_matmul", (512, 256, 1024)),
                          ("matmul_reduce_scatter", (512, 1024, 256))):
        x, w, _, _ = testing.random_operands(m, k, n, jnp.float32)
        xs, ws = testing.place(op, mesh, x, w)
        counts = {}
        for precision in (None, "highest", lax.DotAlgorithmPreset.TF32_TF32_F32_X3):
            text = testing.sharded(op, mesh, "fused", precision=precision).trace(xs, ws).lower(
                lowering_platforms=("cuda",)).as_text()
            config = _backend_configs(text)[0].decode("latin1")
            ptx = config[config.index(".version"):]
            counts[getattr(precision, "name", precision)] = (
                len(re.findall(r"wgmma\.mma_async[^;]*\.tf32", ptx)),
                ptx.count("wgmma.mma_async"), ptx.count("fma.rn.f32"))
        (tf32, wgmma, _), (_, exact_wgmma, fma), (x3, _, _) = counts.values()
        # tf32x3 runs 8 warps (jax_flux.config.WIDE_F32): three times the
        # default's MMAs, shared by two warpgroups where the default has one.
        assert tf32 == wgmma > 0 and exact_wgmma == 0 and fma > 0, counts
        assert 3 * tf32 in (x3, 2 * x3), counts
        print(f"{op:22s} float32 precision: default {tf32} tf32 wgmma, TF32_TF32_F32_X3 {x3}, "
              f"highest no wgmma ({fma} fma.rn.f32)")


def check_residency(mesh) -> None:
    """Two programs an SM of GEMM-RS: accepted in bfloat16 (two fit an H100's SM),
    refused in float32 (one fits: 192 KiB of shared memory) before jax-triton runs."""
    import jax.numpy as jnp

    from custom_calls import binding
    from jax_flux import MatmulReduceScatterConfig, testing
    from tests.helpers import fused_fn

    binding.gpu_target = lambda mesh: (132, 90)  # the CPU devices here are no GPU
    config = MatmulReduceScatterConfig(num_programs=264, reduce_programs=0)
    for dtype, fits in ((jnp.bfloat16, True), (jnp.float32, False)):
        x, w, _, _ = testing.random_operands(2048, 1024, 1024, dtype)
        xs, ws = testing.place("matmul_reduce_scatter", mesh, x, w)
        try:
            fused_fn("matmul_reduce_scatter", mesh, config).trace(xs, ws).lower(
                lowering_platforms=("cuda",))
            refused = None
        except ValueError as e:
            refused = str(e)
        assert (refused is None) == fits, (dtype, refused)
        print(f"264 programs of gemm_rs_kernel {jnp.dtype(dtype).name}: "
              f"{'accepted' if fits else 'refused: ' + refused[:120]}")


if __name__ == "__main__":
    sys.exit(main())
