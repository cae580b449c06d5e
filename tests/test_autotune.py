"""Autotuning: the pruned space, verify-then-time, the persistent cache the ops consult."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_flux
from jax_flux import AllGatherMatmulConfig, MatmulReduceScatterConfig, autotune, testing, workspace
from tests.autotune_helpers import fresh_auto, impls_in, record_times
from tests.helpers import mesh_of


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(path))
    return path


def test_gpu_space_is_pruned_to_what_fits():
    space = autotune.candidates("all_gather_matmul", 1024, 12288, 6144, jnp.bfloat16, 8)
    assert space and all(isinstance(c, AllGatherMatmulConfig) for c in space)
    for c in space:
        smem = (c.block_m * c.block_k + c.block_k * c.block_n) * 2 * c.num_stages
        assert smem <= autotune.DEFAULT_SMEM_BYTES
        assert c.block_m * c.block_n <= 128 * 32 * c.num_warps
    assert {c.rotate for c in space} == {True, False}
    assert {c.programs_per_sm for c in space} == {1, 2}
    for c in space:
        if c.programs_per_sm == 2:  # two must fit an SM together
            smem = (c.block_m * c.block_k + c.block_k * c.block_n) * 2 * c.num_stages
            assert 2 * smem <= autotune.DEFAULT_SMEM_BYTES and c.num_warps <= 8
    small = autotune.candidates("matmul_reduce_scatter", 8, 1536, 12288, jnp.bfloat16, 8)
    assert small and all(c.block_m <= 64 for c in small)  # decode: no 128/256-row tiles


def test_tune_verifies_times_records_and_the_op_uses_it(cache):
    mesh = mesh_of(8)
    configs = [MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16, reduce_programs=r,
                                         num_programs=r + 2) for r in (1, 2)]
    best, rows = autotune.tune("matmul_reduce_scatter", mesh, 8, 4, 16, jnp.float32,
                               configs=configs, reps=1, log=lambda s: None)
    assert best in configs
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert cache.exists()
    kind = jax.devices()[0].device_kind
    assert autotune.lookup("matmul_reduce_scatter", kind, 8, 4, 16, jnp.float32, 8) == best
    # impl="fused" with config=None now uses the tuned config: spy on the lookup.
    seen = []
    real = autotune.lookup
    autotune_lookup = lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1]  # noqa: E731
    try:
        autotune.lookup = autotune_lookup
        x, w, x64, w64 = testing.random_operands(64, 32, 16, jnp.float32, seed=4)
        xs, ws = testing.place("matmul_reduce_scatter", mesh, x, w)
        out = testing.sharded("matmul_reduce_scatter", mesh, "fused")(xs, ws)
    finally:
        autotune.lookup = real
    assert seen == [best]
    assert testing.relative_error(out, x64 @ w64) < 1e-5


@pytest.mark.parametrize("fails_on_call", [0, 1], ids=["verifying", "timing"])
def test_a_config_that_fails_is_reported_not_kept(cache, monkeypatch, fails_on_call):
    from custom_calls.binding import PeerTimeoutError
    from jax_flux import testing

    mesh = mesh_of(8)
    # A config whose call fails deterministically, while it is checked or while
    # it is timed, as a too-short timeout does when a peer is late (a real one
    # fails only sometimes).
    bad = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=8)
    good = AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16, chunk_rows=4)
    real = testing.sharded

    def sharded(op, mesh_, impl="auto", config=None, grad=False, **variant):
        fn = real(op, mesh_, impl, config, grad, **variant)
        if config != bad:
            return fn
        calls = []

        def flaky(*args):
            calls.append(1)
            if len(calls) > fails_on_call:
                raise PeerTimeoutError("all_gather_matmul(impl='fused'): rank 1 of axis 'tp' "
                                       "gave up after about 1e-06 s waiting for row chunk 0")
            return fn(*args)
        return flaky

    monkeypatch.setattr(testing, "sharded", sharded)
    best, rows = autotune.tune("all_gather_matmul", mesh, 4, 16, 8, jnp.float32,
                               configs=[bad, good], reps=1, log=lambda s: None)
    assert rows[0]["status"].startswith("failed") and "gave up" in rows[0]["status"], rows[0]
    assert rows[1]["status"] == "ok" and best == good


def test_search_order_starts_at_the_default_and_moves_one_field_at_a_time():
    """A search cut short (benchmarks.tune --max-configs) still covers each axis."""
    for op, cls in ((autotune.AG, AllGatherMatmulConfig), (autotune.RS, MatmulReduceScatterConfig)):
        space = autotune.candidates(op, 512, 12288, 6144, jnp.bfloat16, 8)
        default = cls.default(512, 12288, 6144, 8, interpreting=False)
        assert space[0] == default and len(set(space)) == len(space)
        distances = [autotune._distance(c, default) for c in space]
        assert distances == sorted(distances) and distances[1] == 1
        first = space[:1 + distances.count(1)]
        fields = ["block_n", "num_warps", "programs_per_sm", "group_m", "rotate"]
        for field in fields + (["pull", "comm_programs"] if op == autotune.AG else []):
            assert len({getattr(c, field) for c in first}) > 1, (op, field)


def test_result_dtype_and_weight_layout_are_part_of_the_key(cache):
    plain = autotune.key(autotune.RS, "kind", 8, 4, 16, jnp.bfloat16, 8)
    assert plain == "kind|matmul_reduce_scatter|m=8,k=4,n=16|bfloat16|P=8"  # unchanged
    assert autotune.key(autotune.RS, "kind", 8, 4, 16, jnp.bfloat16, 8,
                        out_dtype=jnp.bfloat16) == plain
    variants = {autotune.key(autotune.RS, "kind", 8, 4, 16, jnp.bfloat16, 8, out_dtype=o,
                             w_transposed=t) for o in (None, jnp.float32) for t in (False, True)}
    assert len(variants) == 4
    # A float8 w against bfloat16 x (weight-only float8, the backward pass of
    # float8 operands): "|w=<dtype>"; w of x's dtype keeps the plain key.
    assert autotune.key(autotune.RS, "kind", 8, 4, 16, jnp.bfloat16, 8,
                        w_dtype=jnp.bfloat16) == plain
    assert autotune.key(autotune.RS, "kind", 8, 4, 16, jnp.bfloat16, 8, w_transposed=True,
                        w_dtype=jnp.float8_e4m3fn) == plain + "|w=float8_e4m3fn|wT"
    # A float32-result default is the heuristic's float32 one (8 warps on a GPU).
    space = autotune.candidates(autotune.RS, 512, 6144, 12288, jnp.bfloat16, 8,
                                out_dtype=jnp.float32)
    assert space[0].num_warps == 8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float8_e4m3fn], ids=["f32", "e4m3fn"])
def test_the_backward_pass_looks_up_its_transposed_weight_launch(cache, dtype):
    # AG-GEMM's dx is a GEMM-RS of dy with w^T: it consults the "|wT" entry of
    # that problem, so a config tuned for it (benchmarks.tune --backward) is
    # used. Float8 operands (a bfloat16 result): dy stays bfloat16 and meets the
    # float8 w as it is (the "|w=float8_e4m3fn" entry).
    mesh = mesh_of(8)
    seen = []
    real = autotune.lookup

    def spy(*a, **kw):
        seen.append((a[0], a[2:5], jnp.dtype(a[5]).name, jnp.dtype(kw["out_dtype"]).name,
                     kw.get("w_transposed"), jnp.dtype(kw["w_dtype"]).name))
        return real(*a, **kw)

    out = jnp.bfloat16 if dtype != jnp.float32 else None
    x, w, _, _ = testing.random_operands(64, 32, 16, dtype, seed=4)
    g = jnp.ones((64, 16), out or dtype)
    xs, ws = testing.place(autotune.AG, mesh, x, w)
    try:
        autotune.lookup = spy
        jax.block_until_ready(testing.sharded(autotune.AG, mesh, "fused", grad=True,
                                              preferred_element_type=out)(xs, ws, g))
    finally:
        autotune.lookup = real
    # Forward: x [8, 32] @ w [32, 2]; backward: dy [64, 2] @ w^T [2, 32], reduce-scattered.
    d, o = jnp.dtype(dtype).name, jnp.dtype(out or dtype).name
    assert seen == [(autotune.AG, (8, 32, 2), d, o, False, d),
                    (autotune.RS, (8, 2, 32), o, o, True, d)]


def test_tune_records_xla_and_ring_beside_the_fused_config(cache):
    mesh = mesh_of(8)
    cfg = MatmulReduceScatterConfig(block_m=16, block_n=16, block_k=16, reduce_programs=1)
    best, rows = autotune.tune(autotune.RS, mesh, 8, 4, 16, jnp.float32, configs=[cfg], reps=2,
                               log=lambda s: None)
    assert best == cfg and [r["status"] for r in rows] == ["ok"]
    kind = jax.devices()[0].device_kind
    entry = autotune.cached_entry(autotune.key(autotune.RS, kind, 8, 4, 16, jnp.float32, 8))
    times = autotune.measured_ms(entry)
    assert set(times) == {"fused", "xla", "ring"} and all(t > 0 for t in times.values()), entry
    assert autotune.best_impl(autotune.RS, kind, 8, 4, 16, jnp.float32, 8) == min(times,
                                                                                  key=times.get)


def test_auto_runs_the_impl_measured_fastest_else_xla(cache):
    mesh = mesh_of(8)
    x, w, x64, w64 = testing.random_operands(64, 32, 16, jnp.float32, seed=5)
    xs, ws = testing.place(autotune.AG, mesh, x, w)

    def impls():
        return impls_in(fresh_auto(autotune.AG, mesh).lower(xs, ws).as_text())

    # Per rank: x [8, 32] @ w [32, 2]. Never measured: xla.
    assert impls() == {"xla"}
    # An entry tuned before xla's time was kept (the fused time alone): still xla.
    record_times(autotune.AG, 8, 32, 2, fused=0.5)
    assert impls() == {"xla"}
    record_times(autotune.AG, 8, 32, 2, fused=0.5, xla=1.0, ring=2.0)
    assert impls() == {"fused"}
    out = fresh_auto(autotune.AG, mesh)(xs, ws)  # the fused kernel, with the recorded config
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    record_times(autotune.AG, 8, 32, 2, fused=0.5, xla=1.0, ring=0.25)
    assert impls() == {"ring"}
    record_times(autotune.AG, 8, 32, 2, fused=2.0, xla=1.0, ring=1.0)  # a tie stays on xla
    assert impls() == {"xla"}
    # No fused config passed when it was tuned: xla or ring, never fused.
    record_times(autotune.AG, 8, 32, 2, xla=1.0, ring=3.0)
    assert impls() == {"xla"}
    kind = jax.devices()[0].device_kind
    assert autotune.lookup(autotune.AG, kind, 8, 32, 2, jnp.float32, 8) is None


def test_auto_in_the_backward_pass_follows_the_backward_launchrecord_times(cache):
    # Forward AG-GEMM measured fastest on xla, its dx launch (a GEMM-RS of dy
    # [64, 2] with w^T [2, 32]) fastest fused: the gradient runs both.
    mesh = mesh_of(8)
    record_times(autotune.AG, 8, 32, 2, fused=2.0, xla=1.0)
    record_times(autotune.RS, 8, 2, 32, fused=0.5, xla=1.0, w_transposed=True)
    x, w, x64, w64 = testing.random_operands(64, 32, 16, jnp.float32, seed=6)
    g64 = np.random.default_rng(7).standard_normal((64, 16))
    xs, ws = testing.place(autotune.AG, mesh, x, w)
    fn = fresh_auto(autotune.AG, mesh, grad=True)
    g = jnp.asarray(g64, jnp.float32)
    text = fn.lower(xs, ws, g).as_text()
    assert text.count("cpu_callback") == 1 and impls_in(text) == {"fused", "xla"}
    assert "reduce_scatter" not in text
    out, dx, dw = fn(xs, ws, g)
    assert testing.relative_error(out, x64 @ w64) < 1e-5
    assert testing.relative_error(dx, g64 @ w64.T) < 1e-5
    assert testing.relative_error(dw, x64.T @ g64) < 1e-5


def test_an_untuned_m_takes_the_nearest_tuned_m_within_a_factor_of_2(cache):
    kind = jax.devices()[0].device_kind
    AG = autotune.AG

    def best(m, **kw):
        return autotune.best_impl(AG, kind, m, 32, 2, jnp.float32, 8, **kw)

    record_times(AG, 8, 32, 2, fused=0.5, xla=1.0)   # fused fastest at 8 rows a rank
    record_times(AG, 32, 32, 2, fused=2.0, xla=1.0)  # xla at 32
    assert [best(m) for m in (8, 12, 16, 24, 32, 64)] == [
        "fused", "fused",  # 12: nearest 8 (log2 0.58 against 1.42)
        "xla",             # 16: as near to 8 as to 32; the larger m's
        "xla", "xla", "xla"]
    assert best(3) is None and best(65) is None  # nearest over 2x away: never measured
    assert autotune.lookup(AG, kind, 12, 32, 2, jnp.float32, 8) == AllGatherMatmulConfig(
        block_m=16, block_n=16, block_k=16)
    # Only m may differ: another k, n, axis size, dtype or layout is another problem.
    assert autotune.best_impl(AG, kind, 12, 64, 2, jnp.float32, 8) is None
    assert autotune.best_impl(AG, kind, 12, 32, 4, jnp.float32, 8) is None
    assert autotune.best_impl(AG, kind, 12, 32, 2, jnp.float32, 4) is None
    assert autotune.best_impl(AG, kind, 12, 32, 2, jnp.bfloat16, 8) is None
    assert best(12, w_transposed=True) is None
    # What explain says of an untuned problem: the record it borrows, and why.
    why = autotune.explain(AG, kind, 12, 32, 2, jnp.float32, 8)
    assert why["key"] == autotune.key(AG, kind, 12, 32, 2, jnp.float32, 8)
    assert why["record"] == autotune.key(AG, kind, 8, 32, 2, jnp.float32, 8)
    assert why["file"] == str(cache) and why["auto"] == "fused" and why["fallback"] == "xla"
    assert why["measured_ms"] == {"fused": 0.5, "xla": 1.0}
    assert why["config"] == AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16)
    assert autotune.explain(AG, kind, 3, 32, 2, jnp.float32, 8) == {
        "key": autotune.key(AG, kind, 3, 32, 2, jnp.float32, 8), "record": None, "file": None,
        "config": None, "measured_ms": {}, "auto": "xla", "fallback": None}
    # A problem tuned itself keeps its own record.
    record_times(AG, 12, 32, 2, fused=3.0, xla=1.0)
    assert best(12) == "xla"
    assert autotune.explain(AG, kind, 12, 32, 2, jnp.float32, 8)["record"] == why["key"]
    # The op: 8 rows a rank, untuned, runs what 10 rows a rank measured fastest.
    mesh = mesh_of(8)
    record_times(AG, 10, 32, 16, fused=0.5, xla=1.0)
    x, w, x64, w64 = testing.random_operands(64, 32, 128, jnp.float32, seed=8)
    xs, ws = testing.place(AG, mesh, x, w)
    assert impls_in(fresh_auto(AG, mesh).lower(xs, ws).as_text()) == {"fused"}
    assert testing.relative_error(fresh_auto(AG, mesh)(xs, ws), x64 @ w64) < 1e-5


def _refuse_every_mesh(monkeypatch):
    # What the lowering finds on a mesh the fused kernels cannot run on (a
    # PCIe-linked or cross-machine group: tests/test_cuda_workspace.py,
    # tests/test_multiprocess.py give the real ones).
    def placement(self, mesh, platform):
        raise ValueError(f"{self.op}(impl='fused') over axis {self.axis_name!r}: refused here")
    monkeypatch.setattr(workspace.TableRequest, "placement", placement)


@pytest.mark.parametrize("op", [autotune.AG, autotune.RS])
def test_auto_runs_the_faster_of_the_rest_where_the_mesh_refuses_the_fused_kernels(
        cache, monkeypatch, op):
    # Measured fastest fused, ring next: auto takes fused where the mesh it is
    # lowered on allows it, ring (with a warning saying why) where it does not,
    # and the refused kernel leaves nothing in the program; forward, gradient,
    # vmap with a shared weight (still one folded launch where fused).
    mesh = mesh_of(8)
    dims = (8, 32, 2) if op == autotune.AG else (8, 4, 16)  # per rank: m_local, k, n
    record_times(op, *dims, fused=0.5, xla=1.0, ring=0.75)
    x, w, x64, w64 = testing.random_operands(64, 32, 16, jnp.float32, seed=9)
    xs, ws = testing.place(op, mesh, x, w)
    g64 = np.random.default_rng(10).standard_normal((64, 16) if op == autotune.AG else (64, 16))
    g = jnp.asarray(g64, jnp.float32)
    want = x64 @ w64
    in_specs, out_spec = testing._SPECS[op]
    batched = jax.jit(jax.vmap(jax.shard_map(
        lambda x, w: testing.OPS[op](x, w, "tp"), mesh=mesh, in_specs=in_specs,
        out_specs=out_spec), in_axes=(0, None)))
    xb = jnp.stack([xs, 2 * xs])

    def check(expect):
        lowered = fresh_auto(op, mesh).lower(xs, ws)
        assert impls_in(lowered.as_text()) == {expect}
        assert f"jax_flux.{op}[{expect}]" in lowered.as_text(debug_info=True)  # in profiles
        assert testing.relative_error(fresh_auto(op, mesh)(xs, ws), want) < 1e-5
        out, dx, dw = fresh_auto(op, mesh, grad=True)(xs, ws, g)
        assert testing.relative_error(out, want) < 1e-5
        assert testing.relative_error(dx, g64 @ w64.T) < 1e-5
        assert testing.relative_error(dw, x64.T @ g64) < 1e-5
        text = batched.lower(xb, ws).as_text()
        assert impls_in(text) == {expect}
        assert text.count("cpu_callback") == (1 if expect == "fused" else 0)
        assert "stablehlo.while" not in text
        out = batched(xb, ws)
        assert testing.relative_error(out, np.stack([want, 2 * want])) < 1e-5

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        check("fused")
    before = len(workspace.info())
    _refuse_every_mesh(monkeypatch)
    jax.clear_caches()
    with pytest.warns(UserWarning, match=rf"{op}\(impl='auto'\): the fused kernels were "
                                         rf"measured fastest .* runs impl='ring' .*refused here"):
        check("ring")
    assert len(workspace.info()) == before
    record_times(op, *dims, fused=0.5, xla=1.0, ring=2.0)  # xla next: xla
    with pytest.warns(UserWarning, match="runs impl='xla'"):
        assert impls_in(fresh_auto(op, mesh).lower(xs, ws).as_text()) == {"xla"}


def test_auto_runs_the_faster_of_the_rest_where_shard_map_is_not_manual_over_every_axis(
        cache):
    # The fused kernels need shard_map manual over every mesh axis of size > 1
    # (a ValueError with impl="fused"); auto falls back when it is traced.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))
    kind = jax.devices()[0].device_kind
    autotune.record(autotune.AG, autotune.key(autotune.AG, kind, 8, 32, 4, jnp.float32, 4),
                    AllGatherMatmulConfig(block_m=16, block_n=16, block_k=16), 0.5,
                    baselines_ms={"xla": 1.0, "ring": 2.0})
    x, w, x64, w64 = testing.random_operands(32, 32, 16, jnp.float32, seed=11)

    def body(impl):
        return jax.jit(jax.shard_map(lambda x, w: jax_flux.all_gather_matmul(x, w, "tp",
                                                                             impl=impl),
                                     mesh=mesh, in_specs=(P("tp"), P(None, "tp")),
                                     out_specs=P(None, "tp"), axis_names={"tp"}))

    with pytest.raises(ValueError, match="manual over every mesh axis"):
        body("fused").lower(x, w)
    auto = body("auto")
    with pytest.warns(UserWarning, match=r"runs impl='xla' .*manual over every mesh axis"):
        assert impls_in(auto.lower(x, w).as_text()) == {"xla"}
        assert testing.relative_error(auto(x, w), x64 @ w64) < 1e-5
