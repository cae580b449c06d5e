"""The Llama-style decoder on other layouts than tensor parallelism alone: data x tensor
parallelism, FSDP, token-parallel decode, a tuple of axes, meshes with explicit axes; each
against the same model and parameters on one device."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jax_flux import testing
from models import KVCache, Llama
from models.generate import generate
from models.llama import copy_parameters
from tests.helpers import count_equations, mesh_of
from tests.model_helpers import CFG, _adamw_step, _host, _stacked, _step, _tokens


def _dp_tp_mesh():
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp"))


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_data_and_tensor_parallel_model_matches_one_device(impl, single_device):
    # dp=2 x tp=4: each dp group runs its half of the batch; parameter gradients
    # are summed over dp; the AdamW step sees the same gradients as on one device.
    model = Llama(CFG, mesh=_dp_tp_mesh(), batch_axis="dp", impl=impl, rngs=nnx.Rngs(0))
    logits, grads, params = _step(model, _tokens())
    ref_logits, ref_grads, ref_params = single_device
    assert testing.relative_error(logits, ref_logits) < 1e-5
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert testing.relative_error(g, r) < 1e-4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert testing.relative_error(a, b) < 1e-5


@pytest.mark.parametrize("impl,explicit,scan", [("xla", False, False), ("fused", True, True)],
                         ids=["xla", "fused-explicit-scanned"])
def test_fsdp_model_matches_one_device_with_its_state_split_8_ways(impl, explicit, scan,
                                                                   single_device):
    # FSDP x TP (dp=2 x tp=4): every parallel kernel and the embedding stored
    # split over "dp" as well; logits, gradients and the AdamW step as on one
    # device, the gradients and the optimizer state split like the parameters.
    if explicit:
        mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    else:
        mesh = _dp_tp_mesh()
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    model = Llama(cfg, mesh=mesh, batch_axis="dp", fsdp=True, impl=impl, rngs=nnx.Rngs(0))
    if scan:  # the one-device model's parameters, stacked (placed as model's are)
        copy_parameters(Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(0)), model)
    up = model.blocks.mlp.up if scan else model.blocks[0].mlp.up
    kernel = up.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape)[-3:-2] == (kernel.shape[-3] // 2,)
    assert np.prod(kernel.sharding.shard_shape(kernel.shape)) * 8 == kernel.size
    assert model.embed[...].sharding.shard_shape(model.embed[...].shape) == (CFG.vocab // 4,
                                                                              CFG.hidden // 2)

    logits, grads, optimizer = _adamw_step(model, _tokens())
    ref_logits, ref_grads, ref_params = single_device
    assert testing.relative_error(logits, ref_logits) < 1e-5
    layout = _stacked if scan else nnx.to_pure_dict
    for ours, ref, tol in ((nnx.state(grads), ref_grads, 1e-4),
                           (nnx.state(model, nnx.Param), ref_params, 1e-5)):
        flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(_host(ours)))
        want = dict(jax.tree_util.tree_leaves_with_path(layout(ref)))
        assert len(flat) == len(want) > 5
        for path, a in flat:
            assert testing.relative_error(a, want[path]) < tol, jax.tree_util.keystr(path)
    grad_kernel = (grads.blocks.mlp.up if scan else grads.blocks[0].mlp.up).kernel[...]
    assert grad_kernel.sharding.shard_shape(grad_kernel.shape) == kernel.sharding.shard_shape(
        kernel.shape)
    moments = [a for a in jax.tree.leaves(nnx.state(optimizer)) if getattr(a, "shape", ()) ==
               kernel.shape]
    assert moments and all(m.sharding.shard_shape(m.shape) == kernel.sharding.shard_shape(
        kernel.shape) for m in moments)
    with pytest.raises(ValueError, match="fsdp=True splits the parameters over batch_axis"):
        Llama(CFG, mesh=mesh, fsdp=True, rngs=nnx.Rngs(0))


def test_data_parallel_generation_and_errors():
    prompt = _tokens(batch=2, length=16, seed=4)
    quiet = lambda s: None  # noqa: E731
    dp = Llama(CFG, mesh=_dp_tp_mesh(), batch_axis="dp", impl="xla", rngs=nnx.Rngs(1))
    one = Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(1))
    assert np.array_equal(generate(dp, prompt, 4, log=quiet), generate(one, prompt, 4, log=quiet))
    with pytest.raises(ValueError, match="batch 3 must be divisible by the size 2 of batch_axis"):
        dp(_tokens(batch=3, length=16))
    with pytest.raises(ValueError, match="batch_axis 'tp' must name mesh axes other than"):
        Llama(CFG, mesh=_dp_tp_mesh(), batch_axis="tp", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl,dp,tied", [("xla", 1, True), ("fused", 2, False)])
def test_token_parallel_decode_matches_one_device(impl, dp, tied):
    # Decode steps with the 8 tokens split over the tp ranks (AG-GEMM / GEMM-RS
    # instead of local matmuls + all-reduce), against the one-device model; the
    # head's AG-GEMM, or the tied embedding's.
    from jax.sharding import Mesh

    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    mesh = Mesh(np.asarray(jax.devices()).reshape(dp, 8 // dp), ("dp", "tp"))
    model = Llama(cfg, mesh=mesh, batch_axis="dp", impl=impl, rngs=nnx.Rngs(2))
    one = Llama(cfg, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(2))
    tokens = _tokens(batch=8, length=19, seed=9)
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
    _, cache = prefill(model, tokens[:, :16], KVCache.empty(cfg, 8, mesh, "tp", "dp"))
    _, ref_cache = prefill(one, tokens[:, :16], KVCache.empty(cfg, 8, one.mesh))
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c, token_parallel=True))
    ref_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    for pos in range(16, 19):
        logits, cache = step(model, tokens[:, pos:pos + 1], cache)
        want, ref_cache = ref_step(one, tokens[:, pos:pos + 1], ref_cache)
        assert logits.shape == (8, 1, CFG.vocab)
        assert testing.relative_error(logits, np.asarray(want, np.float64)) < 1e-5, pos
    if impl == "fused":  # per block 2 AG-GEMMs and 2 GEMM-RS, then the head's AG-GEMM
        jaxpr = jax.make_jaxpr(lambda m, t, c: m.decode_step(t, c, token_parallel=True))(
            model, tokens[:, :1], cache).jaxpr
        assert count_equations(jaxpr, ("jax_flux_triton_call",)) == 4 * CFG.layers + 1
    with pytest.raises(ValueError, match=r"B divisible by 8 .* got \(4, 1\)"):
        model.decode_step(tokens[:4, :1], KVCache.empty(cfg, 4, mesh, "tp", "dp"),
                          token_parallel=True)


def test_tensor_parallel_over_a_tuple_of_axes_matches_one_device():
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    tokens = _tokens(length=16)
    forward = nnx.jit(lambda m, t: m(t))
    got = forward(Llama(CFG, mesh=mesh, axis_name=("x", "y"), impl="ring", rngs=nnx.Rngs(3)),
                  tokens)
    want = forward(Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(3)), tokens)
    assert testing.relative_error(got, np.asarray(want, np.float64)) < 1e-5
    with pytest.raises(ValueError, match="must name mesh axes other than"):
        Llama(CFG, mesh=mesh, axis_name=("x", "y"), batch_axis="y", rngs=nnx.Rngs(0))


def test_command_lines_with_every_layout_option(capsys):
    from models import generate as generate_cli
    from models import train as train_cli

    assert train_cli.main(["--steps", "2", "--impl", "xla", "--dp", "2", "--tp", "4",
                           "--scan-layers", "--remat", "collective_matmuls", "--fsdp"]) == 0
    assert generate_cli.main(["--impl", "xla", "--dp", "2", "--tp", "4", "--batch", "8",
                              "--scan-layers", "--token-parallel-decode",
                              "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and out.count("prompt") == 8


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_a_mesh_from_make_mesh_with_explicit_axes(impl, single_device):
    # jax.make_mesh gives Explicit axes by default: layouts are part of the types
    # (reshard, no with_sharding_constraint; gathers and reshapes of sharded dims
    # must be unambiguous). Training step and both decodes against one device.
    mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    model = Llama(CFG, mesh=mesh, batch_axis="dp", impl=impl, rngs=nnx.Rngs(0))
    logits, grads, _ = _step(model, _tokens())
    ref_logits, ref_grads, _ = single_device
    assert testing.relative_error(logits, ref_logits) < 1e-5
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert testing.relative_error(g, r) < 1e-4
    prompt = _tokens(batch=8, length=16, seed=4)
    quiet = lambda s: None  # noqa: E731
    want = generate(Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(1)), prompt, 3,
                    log=quiet)
    model = Llama(CFG, mesh=mesh, batch_axis="dp", impl=impl, rngs=nnx.Rngs(1))
    # Replicated decode runs no collective matmul: the fused impl only matters token parallel.
    with jax.set_mesh(mesh):
        for token_parallel in ((True,) if impl == "fused" else (False, True)):
            got = generate(model, prompt, 3, log=quiet, token_parallel=token_parallel)
            assert np.array_equal(got, want), token_parallel
