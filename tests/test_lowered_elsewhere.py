"""Programs lowered for where the fused kernels cannot run: for ``jax.export`` (the fused
kernels' program holds this process's symmetric-workspace addresses) and for ROCm.
``impl="fused"`` refuses them with a ValueError, before anything is allocated or
compiled; ``impl="auto"`` takes the faster of xla and ring, with a warning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flux import autotune, testing, workspace
from tests.autotune_helpers import fresh_auto, impls_in, record_times
from tests.helpers import mesh_of


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))


@pytest.mark.parametrize("op", [autotune.AG, autotune.RS])
def test_fused_refuses_export_and_auto_exports_the_faster_of_the_rest(cache, op):
    mesh = mesh_of(8)
    dims = (8, 32, 2) if op == autotune.AG else (8, 4, 16)  # per rank: m_local, k, n
    record_times(op, *dims, fused=0.5, xla=1.0, ring=0.75)  # fused fastest, ring next
    x, w, x64, w64 = testing.random_operands(64, 32, 16, jnp.float32, seed=12)
    xs, ws = testing.place(op, mesh, x, w)
    g64 = np.random.default_rng(13).standard_normal((64, 16))
    g = jnp.asarray(g64, jnp.float32)
    before = len(workspace.info())

    fused = testing.sharded.__wrapped__(op, mesh, "fused")
    with pytest.raises(ValueError, match=r"fused kernels \(impl='fused'\) cannot be exported "
                                         r"\(jax.export\).*impl='xla' or 'ring'"):
        jax.export.export(fused)(xs, ws)

    with pytest.warns(UserWarning, match=rf"{op}\(impl='auto'\): .* runs impl='ring' .*"
                                         rf"lowered for jax.export"):
        exported = jax.export.export(fresh_auto(op, mesh))(xs, ws)
        exported_grad = jax.export.export(fresh_auto(op, mesh, grad=True))(xs, ws, g)
    # (The module text names the ops in its locations: look for the HLO ops.)
    text = exported.mlir_module()
    assert "stablehlo.collective_permute" in text and "callback" not in text
    assert "stablehlo.all_gather" not in text and "stablehlo.reduce_scatter" not in text
    assert "callback" not in exported_grad.mlir_module()
    assert len(workspace.info()) == before  # nothing allocated for a refused kernel

    # The exported StableHLO, compiled and run as a loading process would
    # (serialize() would also want flatbuffers, not one of our dependencies).
    assert testing.relative_error(exported.call(xs, ws), x64 @ w64) < 1e-5
    out, dx, dw = exported_grad.call(xs, ws, g)
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    assert testing.relative_error(dx, g64 @ w64.T) < 1e-5
    assert testing.relative_error(dw, x64.T @ g64) < 1e-5

    # Jitted here, the same function still runs the fused kernel.
    assert impls_in(fresh_auto(op, mesh).lower(xs, ws).as_text()) == {"fused"}


@pytest.mark.parametrize("op", [autotune.AG, autotune.RS])
def test_rocm_is_refused_by_fused_and_falls_back_under_auto(cache, op):
    # Lowered on this CPU host for "rocm" (no plugin needed to lower): the
    # kernels time their waits with CUDA's global timer and the workspace is
    # CUDA memory.
    mesh = mesh_of(8)
    dims = (8, 32, 2) if op == autotune.AG else (8, 4, 16)
    record_times(op, *dims, fused=0.5, xla=1.0, ring=2.0)  # xla next
    x, w, _, _ = testing.random_operands(64, 32, 16, jnp.float32, seed=14)
    xs, ws = testing.place(op, mesh, x, w)
    before = len(workspace.info())
    fused = testing.sharded.__wrapped__(op, mesh, "fused")
    with pytest.raises(ValueError, match=rf"{op}\(impl='fused'\) runs on CUDA GPUs and on CPU "
                                         rf"devices .* not on 'rocm' devices"):
        fused.trace(xs, ws).lower(lowering_platforms=("rocm",))
    with pytest.warns(UserWarning, match=rf"{op}\(impl='auto'\): .* runs impl='xla' .*'rocm'"):
        text = fresh_auto(op, mesh).trace(xs, ws).lower(lowering_platforms=("rocm",)).as_text()
    assert impls_in(text) == {"xla"} and "triton_kernel_call" not in text
    assert len(workspace.info()) == before
