"""The Llama-style decoder: tp=8 against the same model and parameters on one device
(data parallelism, FSDP and other layouts: test_model_layouts.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flux import testing
from jax_flux.quantize import quantize_float8
from models import PRESETS, KVCache, Llama
from models.generate import generate
from models.llama import copy_parameters, cross_entropy
from models.train import train
from tests.helpers import count_equations, mesh_of
from tests.model_helpers import CFG, _host, _stacked, _step, _tokens


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
    assert int(_prefill_then_decode_follow(model, tokens, full, 16).length) == 24


def _prefill_then_decode_follow(model, tokens, full, prompt):
    """Prefills ``prompt`` tokens, then decodes the rest one at a time; each
    step's logits must equal ``full`` (a full forward's). Returns the cache."""
    cache = KVCache.empty(model.cfg, tokens.shape[0], model.mesh)
    logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, tokens[:, :prompt], cache)
    assert testing.relative_error(logits, np.asarray(full[:, :prompt], np.float64)) < 1e-5
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    for pos in range(prompt, tokens.shape[1]):
        logits, cache = step(model, tokens[:, pos:pos + 1], cache)
        assert testing.relative_error(logits[:, 0], np.asarray(full[:, pos], np.float64)) < 1e-5
    return cache


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


@pytest.mark.parametrize("scan,impl,transposed", [(False, "xla", False), (True, "fused", True)],
                         ids=["loop-xla", "scanned-fused-kernels_transposed"])
def test_weight_only_float8_blocks(scan, impl, transposed):
    # quantize_float8(model.blocks): every block's kernels in float8 with a
    # scale per output feature (embedding, norms and head stay wide). The
    # logits equal those of the model holding the dequantized kernels
    # (kernel8 * scale, float32), and stay near the model's before; prefill
    # and decode steps follow a full forward of the quantized model.
    from jax_flux.nn import _ParallelLinear

    cfg = dataclasses.replace(CFG, scan_layers=scan, kernels_transposed=transposed)
    model = Llama(cfg, mesh=mesh_of(8), impl=impl, rngs=nnx.Rngs(2))
    dequantized = Llama(cfg, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(2))
    tokens = _tokens(batch=2, length=24, seed=6)
    forward = nnx.jit(lambda m, t: m(t))
    before = np.asarray(forward(model, tokens), np.float64)
    assert quantize_float8(model.blocks) == (4 if scan else 4 * cfg.layers)
    up = model.blocks.mlp.up if scan else model.blocks[0].mlp.up
    assert up.kernel[...].dtype == jnp.float8_e4m3fn and up.kernel_scale[...].dtype == jnp.float32
    assert up.kernel[...].shape[-1] == (cfg.hidden if transposed else 2)  # [.., out, in]
    pairs = zip(*([n for _, n in nnx.iter_graph(m.blocks) if isinstance(n, _ParallelLinear)]
                  for m in (model, dequantized)))
    for q, d in pairs:
        lead = q.kernel[...].ndim - len(q.in_shape) - len(q.out_shape)
        scale = jnp.expand_dims(q.kernel_scale[...],
                                tuple(lead + q.stored_dim(i) for i in q._input_dims()))
        d.kernel[...] = q.kernel[...].astype(jnp.float32) * scale
    full = forward(model, tokens)
    assert testing.relative_error(full, np.asarray(forward(dequantized, tokens))) < 1e-5
    assert 0 < testing.relative_error(full, before) < 0.15  # float8's rounding, 2 blocks deep
    _prefill_then_decode_follow(model, tokens[:, :20], full, 16)


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
    # Into a scanned model with kernels stored transposed ([out, in]), and back:
    # the same logits, the same parameters.
    cfg_t = dataclasses.replace(CFG, scan_layers=True, kernels_transposed=True)
    transposed = Llama(cfg_t, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(5))
    copy_parameters(loop, transposed)
    assert transposed.blocks.mlp.up.kernel[...].shape == (CFG.layers, CFG.ffn, 2, CFG.hidden)
    assert transposed.blocks.attn.out.kernel[...].shape == (
        CFG.layers, CFG.hidden, CFG.heads, CFG.head_dim)
    forward, tokens = nnx.jit(lambda m, t: m(t)), _tokens(length=16)
    assert testing.relative_error(forward(transposed, tokens),
                                  np.asarray(forward(loop, tokens), np.float64)) < 1e-5
    back = Llama(CFG, mesh=mesh_of(8), impl="xla", rngs=nnx.Rngs(9))
    copy_parameters(transposed, back)
    for a, b in zip(jax.tree.leaves(_host(nnx.state(back, nnx.Param))), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_config_rejects_an_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat policy must be one of"):
        dataclasses.replace(CFG, remat="dots")


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
