"""The fused ops lowered for CUDA on this CPU host: what reaches jax-triton.

jax-triton does not import without a CUDA jaxlib, so a stand-in module
records each ``jax_triton.triton_call`` and returns zeros; the workspace
comes from the fake driver (tests/fake_cuda), resolved for the mesh's devices
at lowering. The status check's host callback cannot be lowered for CUDA
from a CPU backend, so it is replaced by a recorder too. Checked: one
jax-triton call per fused op, its operands (arrays, then the output
pointers), grid, constexprs and zeroed status output, the address table baked
as a constant, and no XLA collective in the program.
"""

import sys
import types

import jax.numpy as jnp
import pytest

from custom_calls import binding
from jax_flux import testing
from tests.helpers import fused_fn, mesh_of


@pytest.fixture
def fake_jax_triton(monkeypatch, fake_driver):
    calls, status_checks = [], []
    module = types.ModuleType("jax_triton")

    def triton_call(*args, kernel, out_shape, grid, **kw):
        calls.append(dict(args=args, kernel=kernel, out_shape=out_shape, grid=grid, kw=kw))
        return [jnp.zeros(s.shape, s.dtype) for s in out_shape]

    module.triton_call = triton_call
    monkeypatch.setitem(sys.modules, "jax_triton", module)
    binding._jax_triton.cache_clear()
    monkeypatch.setattr(binding, "io_callback",
                        lambda fn, result, *args, **kw: status_checks.append(fn))
    yield calls, status_checks
    binding._jax_triton.cache_clear()


def test_jax_triton_0_4_gets_out_type_and_no_deprecation_warning(fake_jax_triton):
    # jax-triton 0.4 names the outputs out_type (out_shape is deprecated there)
    # and deprecates zeroed_outputs, which the status output needs (0.3.1, for
    # Triton 3.6, has no Refs to zero instead): the binding passes out_type, and
    # the zeroed_outputs warning, raised as 0.4.1 raises it, does not reach users.
    import warnings

    from custom_calls import _jax_compat

    calls, _ = fake_jax_triton
    module = sys.modules["jax_triton"]

    def triton_call(*args, kernel, out_type=None, grid, zeroed_outputs=(), **kw):
        if zeroed_outputs:
            warnings.warn("zeroed_outputs is deprecated. Zero the buffer explicitly and pass"
                          " it as a Ref argument instead", DeprecationWarning, stacklevel=2)
        calls.append(dict(args=args, kernel=kernel, out_shape=out_type, grid=grid, kw=kw))
        return [jnp.zeros(s.shape, s.dtype) for s in out_type]

    module.triton_call = triton_call
    mesh = mesh_of(4)
    x, w, _, _ = testing.random_operands(24, 24, 64, jnp.bfloat16)
    xs, ws = testing.place("all_gather_matmul", mesh, x, w)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # pytest's; then what importing custom_calls adds
        _jax_compat.silence_zeroed_outputs_deprecation()
        fused_fn("all_gather_matmul", mesh).trace(xs, ws).lower(lowering_platforms=("cuda",))
    assert len(calls) == 1 and calls[0]["out_shape"][1].shape == (6,), calls
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning)], seen
    from jax_flux import errors
    errors.watchdog.stop()


@pytest.mark.parametrize("check", ["sync", "async"])
@pytest.mark.parametrize("op,kernel,metaparams", [
    ("all_gather_matmul", "ag_gemm_kernel", {"M_LOCAL": 6, "N": 16, "K": 24, "WORLD": 4}),
    ("matmul_reduce_scatter", "gemm_rs_kernel", {"M_OWN": 6, "N": 16, "K": 24, "WORLD": 4}),
])
def test_fused_op_lowers_for_cuda_to_one_jax_triton_call(fake_jax_triton, op, kernel,
                                                         metaparams, check, monkeypatch):
    from jax_flux import errors

    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", check)
    calls, status_checks = fake_jax_triton
    mesh = mesh_of(4)
    # Global X [24, 24 * (1 or 4)], W chosen so each rank's problem is m=6, K=24, n=16.
    if op == "all_gather_matmul":
        x, w, _, _ = testing.random_operands(24, 24, 64, jnp.bfloat16)
    else:
        x, w, _, _ = testing.random_operands(24, 96, 16, jnp.bfloat16)
    xs, ws = testing.place(op, mesh, x, w)
    f = fused_fn(op, mesh)
    lowered = f.trace(xs, ws).lower(lowering_platforms=("cuda",))
    assert len(calls) == 1, calls
    call = calls[0]
    assert call["kernel"].__name__ == kernel
    assert len(call["args"]) == 4  # x, w, ctx, this rank's row of the address table
    assert len(call["grid"]) == 1 and 2 <= call["grid"][0] <= 132
    assert {k: call["kw"][k] for k in metaparams} == metaparams
    assert call["kw"]["zeroed_outputs"] == (1,) and call["kw"]["input_output_aliases"] == {}
    assert call["out_shape"][1].shape == (6,)  # the status words
    # sync: a lax.cond + host callback on the status after the call (a host
    # synchronisation per call on CUDA); async: none, the watchdog reads the records.
    assert len(status_checks) == (1 if check == "sync" else 0)
    if check == "async":
        assert errors.watchdog.running
        errors.watchdog.stop()
    text = lowered.as_text()
    assert "all-gather" not in text and "reduce-scatter" not in text
    assert "all_gather" not in text and "reduce_scatter" not in text
    # [groups * ranks (a row per rank), 2 * ranks (workspaces, records), (lo, hi)]
    assert "tensor<4x8x2xui32>" in text


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_a_grid_that_cannot_be_resident_is_a_value_error_at_lowering(fake_jax_triton, op,
                                                                    monkeypatch):
    # A persistent grid is meant to run in one wave. Lowered for a GPU, a grid
    # beyond the SMs x the compiled
    # kernel's programs an SM is refused before jax-triton is called. The
    # compile itself (compiler.programs_per_sm) needs Triton in compiled mode;
    # tests.compile_for_gpu checks it for sm_90. Here it is replaced, and the
    # signature the binding derives from the operands is checked against the
    # kernel module's own.
    from custom_calls import ag_gemm, compiler, gemm_rs
    from jax_flux import config as cfgs

    calls, _ = fake_jax_triton
    asked = []

    def programs_per_sm(kernel, capability, pointers, constexprs, num_warps, num_stages):
        asked.append(dict(kernel=kernel.__name__, capability=capability, pointers=dict(pointers),
                          constexprs=dict(constexprs), num_warps=num_warps))
        return dict(fit=fit, bound_by="registers", regs=255, regs_assumed=False, shared=99328,
                    limits_known=True)

    monkeypatch.setattr(compiler, "programs_per_sm", programs_per_sm)
    monkeypatch.setattr(binding, "gpu_target", lambda mesh: (132, 90))
    monkeypatch.setenv("JAX_FLUX_STATUS_CHECK", "async")
    mesh = mesh_of(4)
    if op == "all_gather_matmul":
        x, w, _, _ = testing.random_operands(24, 24, 64, jnp.bfloat16)
        cls, module, helpers = cfgs.AllGatherMatmulConfig, ag_gemm, dict(comm_programs=1)
    else:
        x, w, _, _ = testing.random_operands(24, 96, 16, jnp.bfloat16)
        cls, module, helpers = cfgs.MatmulReduceScatterConfig, gemm_rs, dict(reduce_programs=2)
    xs, ws = testing.place(op, mesh, x, w)

    def lower(num_programs):
        config = cls(block_m=16, block_n=16, block_k=16, num_programs=num_programs, **helpers)
        fused_fn(op, mesh, config).trace(xs, ws).lower(lowering_platforms=("cuda",))

    fit = 1
    lower(132)  # never more than one program an SM: nothing to compile, accepted
    assert asked == [] and calls[-1]["grid"] == (132,)
    with pytest.raises(ValueError, match=r"grid of 133 programs cannot all be resident.*"
                                         r"132 SMs x 1 program.*bound by registers"):
        lower(133)
    assert len(calls) == 1  # refused before jax-triton compiled or emitted anything
    (seen,) = asked
    assert seen["kernel"] == module.__name__.split(".")[-1] + "_kernel"
    assert seen["capability"] == 90 and seen["num_warps"] == 4
    assert seen["pointers"] == module.pointer_types("bf16")
    assert seen["constexprs"]["BLOCK_M"] == 16 and seen["constexprs"]["WORLD"] == 4
    fit = 2
    lower(264)  # two fit an SM: accepted
    assert calls[-1]["grid"] == (264,)
    from jax_flux import errors
    errors.watchdog.stop()


def test_lowering_through_the_real_jax_triton(tmp_path):
    # Where jax-triton and a CUDA plugin of jaxlib import (no GPU needed), the
    # real jax-triton compiles the kernels for sm_90 and emits the call XLA
    # would launch. Skipped where jax-triton does not import (the CI host).
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XLA_FLAGS")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])),
               TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "tests.lower_with_jax_triton"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert len([line for line in lines if "target=sm_90a" in line]) == 12, r.stdout
    assert len([line for line in lines if "gradient: kernels=" in line]) == 4, r.stdout
    assert len([line for line in lines if "auto (a record says fused)" in line]) == 2, r.stdout
    assert len([line for line in lines if "auto exports xla, fused refuses" in line]) == 2, \
        r.stdout
    assert len([line for line in lines if "float32 precision: default" in line]) == 2, r.stdout
