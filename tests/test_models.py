"""The Llama-style decoder: tp=8 against the same model and parameters on one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_flux import testing
from models import PRESETS, KVCache, Llama
from models.data import progressions
from models.generate import generate
from models.llama import copy_parameters, cross_entropy
from models.train import train
from tests.helpers import count_equations, mesh_of

CFG = PRESETS["tiny"]


def _tokens(batch=2, length=17, seed=0):
    return jnp.asarray(progressions(np.random.default_rng(seed), batch, length, CFG.vocab))


def _host(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _step(model, tokens):
    """Logits, parameter gradients and parameters after one AdamW step (on the host)."""
    logits, grads, _ = _adamw_step(model, tokens)
    return _host(logits), _host(nnx.state(grads)), _host(nnx.state(model, nnx.Param))


def _adamw_step(model, tokens):
    """One AdamW step of ``model``: (logits, gradients, the optimizer), on the devices."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def run(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:]), logits

        (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return logits, grads

    logits, grads = run(model, optimizer, tokens)
    return logits, grads, optimizer


@pytest.fixture(scope="module")
def single_device():
    model = Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(0))
    return _step(model, _tokens())


@pytest.mark.parametrize("impl", ["xla", "ring", "fused"])
def test_tp8_matches_one_device(impl, single_device):
    model = Llama(CFG, mesh=mesh_of(8), impl=impl, rngs=nnx.Rngs(0))
    logits, grads, params = _step(model, _tokens())
    ref_logits, ref_grads, ref_params = single_device
    assert testing.relative_error(logits, ref_logits) < 1e-5
    flat = jax.tree_util.tree_leaves_with_path(grads)
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    assert len(flat) == len(ref) > 10
    for path, g in flat:
        assert testing.relative_error(g, ref[path]) < 1e-4, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert testing.relative_error(a, b) < 1e-5


def test_loss_decreases_over_20_steps():
    _, losses = train("tiny", tp=8, steps=20, impl="xla", log=lambda s: None)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


def _full_forward_greedy(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        pad = (-tokens.shape[1]) % model.tp  # sequence parallel needs S % tp == 0
        padded = jnp.pad(tokens, ((0, 0), (0, pad)))
        logits = nnx.jit(lambda m, t: m(t))(model, padded)
        nxt = jnp.argmax(logits[:, tokens.shape[1] - 1], axis=-1).astype(jnp.int32)
        tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
    return np.asarray(tokens[:, prompt.shape[1]:])


@pytest.mark.parametrize("impl", ["xla", "fused"])
def test_generate_matches_the_single_device_model(impl):
    prompt = _tokens(batch=2, length=16, seed=4)
    tp8 = Llama(CFG, mesh=mesh_of(8), impl=impl, rngs=nnx.Rngs(1))
    one = Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(1))
    quiet = lambda s: None  # noqa: E731
    got = generate(tp8, prompt, 6, log=quiet)
    assert np.array_equal(got, generate(one, prompt, 6, log=quiet))
    # And the KV cache path equals recomputing the whole sequence each step.
    assert np.array_equal(got, _full_forward_greedy(one, prompt, 6))


def test_prefill_and_decode_logits_match_a_full_forward():
    model = Llama(CFG, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(2))
    tokens = _tokens(batch=2, length=24, seed=6)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    cache = KVCache.empty(CFG, 2, model.mesh)
    logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, tokens[:, :16], cache)
    assert testing.relative_error(logits, np.asarray(full[:, :16], np.float64)) < 1e-5
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    for pos in range(16, 24):
        logits, cache = step(model, tokens[:, pos:pos + 1], cache)
        assert testing.relative_error(logits[:, 0], np.asarray(full[:, pos], np.float64)) < 1e-5
    assert int(cache.length) == 24


def test_tied_embeddings_and_gelu_mlp_match_one_device():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, mlp="gelu")
    tokens = _tokens(length=16)
    out = [np.asarray(nnx.jit(lambda m, t: m(t))(
        Llama(cfg, mesh=mesh_of(n), impl="ring", rngs=nnx.Rngs(3)), tokens), np.float64)
        for n in (8, 1)]
    assert testing.relative_error(out[0], out[1]) < 1e-5


def test_the_embedding_is_vocab_parallel():
    # Megatron's VocabParallelEmbedding: vocab / tp rows a rank; the lookup's sum
    # over ranks is reduce-scattered straight into the sequence-parallel layout.
    model = Llama(CFG, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(0))
    table = model.embed[...]
    assert table.sharding.shard_shape(table.shape) == (CFG.vocab // 8, CFG.hidden)
    text = jax.jit(lambda m, t: m(t)).lower(model, _tokens()[:, :16]).as_text()
    # Two row-parallel GEMM-RS (xla impl) a block, and the embedding's.
    assert text.count("stablehlo.reduce_scatter") == 2 * CFG.layers + 1


def test_presets_split_over_8_and_have_the_expected_size():
    for name in ("llama2-7b", "llama2-70b", "gpt3-175b"):
        PRESETS[name].check_tp(8)
    assert 6.5e9 < PRESETS["llama2-7b"].num_params() < 7e9
    assert 68e9 < PRESETS["llama2-70b"].num_params() < 70e9
    assert 170e9 < PRESETS["gpt3-175b"].num_params() < 180e9


def test_train_checkpoint_save_and_restore(tmp_path):
    path = str(tmp_path / "ckpt")
    model, _ = train("tiny", tp=8, steps=2, impl="xla", checkpoint_dir=path, log=lambda s: None)
    saved = _host(nnx.state(model, nnx.Param))
    restored, _ = train("tiny", tp=8, steps=0, impl="xla", checkpoint_dir=path, restore=True,
                        log=lambda s: None)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(_host(nnx.state(restored, nnx.Param)))):
        np.testing.assert_array_equal(a, b)


def _scanned(impl, remat="none", mesh=None, seed=0):
    """A scan_layers model on 8 devices holding the one-device model's parameters (seed)."""
    cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
    model = Llama(cfg, mesh=mesh or mesh_of(8), impl=impl, rngs=nnx.Rngs(99))
    copy_parameters(Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(seed)), model)
    return model


def _stacked(state):
    """A loop model's (host) state in the scanned layout."""
    tree = nnx.to_pure_dict(state)
    blocks = tree.pop("blocks")
    tree["blocks"] = jax.tree.map(lambda *a: np.stack(a), *[blocks[i] for i in sorted(blocks)])
    return tree


@pytest.mark.parametrize("impl,remat", [("xla", "full"), ("ring", "none"),
                                        ("fused", "collective_matmuls")])
def test_scanned_rematerialised_model_matches_one_device(impl, remat, single_device):
    logits, grads, params = _step(_scanned(impl, remat), _tokens())
    ref_logits, ref_grads, ref_params = single_device
    assert testing.relative_error(logits, ref_logits) < 1e-5
    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    ref = dict(jax.tree_util.tree_leaves_with_path(_stacked(ref_grads)))
    assert len(flat) == len(ref) == 9  # 6 stacked block parameters, embed, norm, head
    for path, g in flat:
        assert g.shape == ref[path].shape
        assert testing.relative_error(g, ref[path]) < 1e-4, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(params)),
                    jax.tree.leaves(_stacked(ref_params))):
        assert testing.relative_error(a, b) < 1e-5


def _launches(model, grad):
    tokens = _tokens(length=17)

    def loss(m):
        return cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])

    fn = nnx.grad(loss) if grad else loss
    return count_equations(jax.make_jaxpr(lambda m: fn(m))(model).jaxpr,
                           ("jax_flux_triton_call",))


def test_scan_puts_one_block_in_the_program_and_remat_saves_the_collectives():
    deep = dataclasses.replace(CFG, layers=4)
    loop = Llama(deep, mesh=mesh_of(8), impl="fused", rngs=nnx.Rngs(0))
    scanned = {r: Llama(dataclasses.replace(deep, scan_layers=True, remat=r), mesh=mesh_of(8),
                        impl="fused", rngs=nnx.Rngs(0)) for r in ("none", "full",
                                                                  "collective_matmuls")}
    # Per block: qkv AG-GEMM, attention-out GEMM-RS, MLP up AG-GEMM, down GEMM-RS;
    # then the head's AG-GEMM.
    assert _launches(loop, grad=False) == 4 * 4 + 1
    assert _launches(scanned["none"], grad=False) == 4 + 1
    # The gradient runs each op again as the other's backward; a full remat also
    # recomputes both AG-GEMMs and the attention GEMM-RS (the MLP's norm reads it).
    plain = _launches(scanned["none"], grad=True)
    assert plain == 2 * (4 + 1)
    assert _launches(scanned["collective_matmuls"], grad=True) == plain
    assert _launches(scanned["full"], grad=True) == plain + 3


def test_scanned_model_generates_as_the_loop_model():
    prompt = _tokens(batch=2, length=16, seed=4)
    quiet = lambda s: None  # noqa: E731
    one = Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(1))
    got = generate(_scanned("xla", seed=1), prompt, 6, log=quiet)
    assert np.array_equal(got, generate(one, prompt, 6, log=quiet))


def test_copy_parameters_round_trips_and_checks_shapes():
    scanned = _scanned("xla")
    loop = Llama(CFG, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(7))
    copy_parameters(scanned, loop)
    want = _host(nnx.state(Llama(CFG, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(0)), nnx.Param))
    for a, b in zip(jax.tree.leaves(_host(nnx.state(loop, nnx.Param))), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    kernel = nnx.state(loop, nnx.Param)["blocks"][0]["mlp"]["up"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)  # [H, F, 2]
    wide = Llama(dataclasses.replace(CFG, ffn=256), mesh=mesh_of(8), impl="xla",
                 rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="differ in shape"):
        copy_parameters(loop, wide)


def test_config_rejects_an_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat policy must be one of"):
        dataclasses.replace(CFG, remat="dots")


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


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_float32_in_a_bfloat16_model(tied):
    cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=tied)
    model = Llama(cfg, mesh=mesh_of(8), impl="ring", rngs=nnx.Rngs(0))
    tokens = _tokens(length=16)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.dtype == jnp.float32
    one = Llama(cfg, mesh=mesh_of(1), impl="xla", rngs=nnx.Rngs(0))
    want = nnx.jit(lambda m, t: m(t))(one, tokens)
    assert testing.relative_error(logits, np.asarray(want, np.float64)) < 2e-2


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
