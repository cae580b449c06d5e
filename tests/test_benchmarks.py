"""The benchmark harness runs end to end in its --quick mode (a smoke run: no timing claims)."""

import csv
import importlib.util

import jax
import pytest

from benchmarks import gemm, model, ops, projection
from jax_flux import testing


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ops_quick(tmp_path):
    assert ops.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "ops_quick_bfloat16_cpu8.csv")
    assert {r["impl"] for r in rows} == {"xla", "ring", "fused"}
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(float(r["median_ms"]) > 0 and r["overlap_E"] for r in rows)
    md = (tmp_path / "ops_quick_bfloat16_cpu8.md").read_text()
    assert "command" in md and "device" in md and "not a performance claim" in md
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "ops_quick_bfloat16_cpu8.png").stat().st_size > 0


def test_ops_points_with_float8_and_w_transposed():
    # What `benchmarks.ops --dtype float8_e4m3fn --w-transposed` times: one point an op
    # (the CLI around it is the one test_ops_quick runs).
    import jax.numpy as jnp

    mesh = testing.mesh(jax.devices()[:8])
    for op in (ops.AG, ops.RS):
        rows = ops.run_point(ops.Shape(op, "tiny", 64, 128, 256), mesh, ["fused"],
                             jnp.float8_e4m3fn, 1, 1.0, 1.0, w_transposed=True)
        assert [r["status"] for r in rows] == ["ok"], rows
        assert float(rows[0]["rel_err"]) < 2e-2


def test_ops_points_with_a_float8_weight():
    # What `benchmarks.ops --w-dtype float8_e4m3fn` times: bfloat16 X, e4m3 W.
    import jax.numpy as jnp

    mesh = testing.mesh(jax.devices()[:8])
    for op in (ops.AG, ops.RS):
        rows = ops.run_point(ops.Shape(op, "tiny", 64, 128, 256), mesh, ["xla", "fused"],
                             jnp.bfloat16, 1, 1.0, 1.0, w_dtype=jnp.float8_e4m3fn)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert all(r["w_dtype"] == "float8_e4m3fn" and float(r["rel_err"]) < 2e-2 for r in rows)


def test_gemm_quick_and_the_projection_from_it(tmp_path):
    assert gemm.main(["--quick", "--out", str(tmp_path)]) == 0
    csv_path = tmp_path / "gemm_quick_bfloat16_cpu.csv"
    rows = _rows(csv_path)
    assert rows and all(r["ratio_vs_xla"] for r in rows)
    assert projection.main([str(csv_path)]) == 0
    text = (tmp_path / "gemm_quick_bfloat16_cpu_projection_P8.md").read_text()
    assert text.startswith("# PROJECTION (not a measurement)")


def test_projection_sends_what_each_op_sends():
    # AG-GEMM moves x's rows (1 byte for float8), GEMM-RS the partial sums in the
    # result's dtype (bfloat16 for float8 operands, the wider one for mixed).
    row = dict(M=8192, K=12288, N=6144, xla_ms=1.0, triton_ms=1.0)
    sizes = {(op, d, b): projection.wire_itemsize(dict(row, shape=f"{op}:x", dtype=d, b_dtype=b))
             for op in ("ag", "rs") for d, b in [("bfloat16", "bfloat16"), ("float32", ""),
                                                 ("float8_e4m3fn", "float8_e4m3fn"),
                                                 ("bfloat16", "float8_e4m3fn")]}
    assert sizes == {("ag", "bfloat16", "bfloat16"): 2, ("ag", "float32", ""): 4,
                     ("ag", "float8_e4m3fn", "float8_e4m3fn"): 1,
                     ("ag", "bfloat16", "float8_e4m3fn"): 2,
                     ("rs", "bfloat16", "bfloat16"): 2, ("rs", "float32", ""): 4,
                     ("rs", "float8_e4m3fn", "float8_e4m3fn"): 2,
                     ("rs", "bfloat16", "float8_e4m3fn"): 2}
    fp8 = projection.project(dict(row, shape="ag:x", dtype="float8_e4m3fn",
                                  b_dtype="float8_e4m3fn"), 8, 450.0, 3350.0, 132, 4, 10.0)
    bf16 = projection.project(dict(row, shape="ag:x", dtype="bfloat16", b_dtype="bfloat16"),
                              8, 450.0, 3350.0, 132, 4, 10.0)
    assert fp8["comm_ms"] == pytest.approx(bf16["comm_ms"] / 2)


@pytest.mark.parametrize("dtype,b_dtype", [("bfloat16", None), ("float8_e4m3fn", None),
                                           ("bfloat16", "float8_e4m3fn")])
def test_gemm_quick_with_b_transposed(tmp_path, dtype, b_dtype):
    extra = ["--b-dtype", b_dtype] if b_dtype else []
    assert gemm.main(["--quick", "--b-transposed", "--dtype", dtype, "--out", str(tmp_path)] +
                     extra) == 0
    name = dtype + (f"_b_{b_dtype}" if b_dtype else "")
    rows = _rows(tmp_path / f"gemm_quick_bT_{name}_cpu.csv")
    assert rows and all(r["ratio_vs_xla"] and float(r["rel_err"]) < 2e-2 for r in rows), rows


@pytest.mark.parametrize("impls,extra,name", [
    ("xla,ring", [], "model_tiny_L2_cpu8"),
    ("xla", ["--dp", "2", "--scan-layers", "--remat", "collective_matmuls", "--fsdp",
             "--float8-weights", "--kernels-transposed"],
     "model_tiny_L2_dp2_scan_remat-collective_matmuls_wT_cpu8")])
def test_model_quick(tmp_path, impls, extra, name):
    assert model.main(["--quick", "--impls", impls, "--out", str(tmp_path), *extra]) == 0
    rows = _rows(tmp_path / f"{name}.csv")
    what = {"block fwd+bwd", "train step", "decode step", "decode step, token parallel"}
    if "--fsdp" in extra:
        what.add("train step, fsdp")
    if "--float8-weights" in extra:
        what |= {"decode step, float8 weights", "decode step, token parallel, float8 weights"}
    assert len(rows) == len(what) * len(impls.split(",")) and all(r["status"] == "ok"
                                                                  for r in rows)
    assert {r["what"] for r in rows} == what


def test_status_check_quick(tmp_path):
    from benchmarks import status_check

    assert status_check.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "status_check.csv")
    assert rows and {"calls", "plain_ms", "checked_ms", "per_check_us"} <= set(rows[0])
    assert "smoke run" in (tmp_path / "status_check.md").read_text()
    fused = _rows(tmp_path / "status_check_fused.csv")
    assert fused and {"calls", "sync_ms", "async_ms", "per_call_us"} <= set(fused[0])
    from jax_flux import errors

    errors.watchdog.stop()  # the async chain started it


def test_tune_quick_records_and_ships(tmp_path, monkeypatch):
    import json

    from benchmarks import tune
    from jax_flux import autotune

    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    shipped = tmp_path / "shipped.json"
    assert tune.main(["--quick", "--ship", "--shipped-path", str(shipped),
                      "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "tune_quick_bfloat16_cpu8.csv")
    assert rows and all(r["config"] != "none passed" for r in rows), rows
    # The baselines beside each winner, and what auto runs: the fastest of the three.
    for r in rows:
        times = {"fused": float(r["best_ms"]), "xla": float(r["xla_ms"]),
                 "ring": float(r["ring_ms"])}
        assert times[r["auto"]] <= min(times.values()) + 1e-3, r  # (the CSV rounds)
    entries = json.loads(shipped.read_text())
    assert len(entries) == len(rows)
    for entry_key, entry in entries.items():
        assert "|P=8" in entry_key and entry["config"] and entry["median_ms"] > 0
        assert entry["xla_ms"] > 0 and entry["ring_ms"] > 0
        assert autotune.cached_entry(entry_key) == entry


def test_tune_quick_backward_of_float8_operands(tmp_path, monkeypatch):
    # The backward pass's launches (the other op, w^T) of float8 operands with
    # bfloat16 results: the bfloat16 cotangent against the float8 weight, under
    # their own cache keys, which the ops' backward then looks up.
    from benchmarks import tune
    from jax_flux import _tuning_records, autotune

    monkeypatch.setenv("JAX_FLUX_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    assert tune.main(["--quick", "--backward", "--dtype", "float8_e4m3fn", "--out-dtype",
                      "bfloat16", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "tune_quick_backward_bfloat16_w_float8_e4m3fn_cpu8.csv")
    assert {r["op"] for r in rows} == {"all_gather_matmul", "matmul_reduce_scatter"}
    assert all(r["w"] == "w^T" and (r["dtype"], r["w_dtype"], r["out"]) == (
        "bfloat16", "float8_e4m3fn", "bfloat16") and r["config"] != "none passed"
        for r in rows), rows
    cached = _tuning_records._read(autotune.cache_path())
    assert len(cached) == 2 and all(
        k.endswith("|bfloat16|P=8|w=float8_e4m3fn|wT") for k in cached), cached


@pytest.mark.parametrize("extra,name", [
    ([], "bfloat16"), (["--w-dtype", "float8_e4m3fn", "--w-transposed"],
                       "bfloat16_w_float8_e4m3fn_wT")])
def test_compiled_report_quick(tmp_path, extra, name):
    """The static report compiles the fused kernels for sm_90 (a subprocess: this
    process runs Triton's interpreter) and reads their SASS; also for a float8
    w given transposed against bfloat16 x."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=repo, TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--sweep", "quick",
                        "--out", str(tmp_path), *extra], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    rows = _rows(tmp_path / f"compiled_quick_{name}_sm90.csv")
    assert {r["op"] for r in rows} == {"ag", "rs"}
    for row in rows:
        assert int(row["regs"]) > 0 and int(row["fit_per_sm"]) >= 1, row
        assert int(row["loop_mma"]) > 0, row
        # Nothing spills in a K loop. K=128 is two steps, which ptxas may unroll
        # (Triton 3.6.0 does for AG at M=64: the loop found is then the tile
        # loop, with 2 local loads a tile for bfloat16 x float8 w^T; 3.9 none).
        assert row["loop_kind"] in ("K", "tile"), row
        assert row["loop_spills"] == "0" or row["loop_kind"] == "tile", row
        assert int(row["tiles"]) <= int(row["waves"]) * int(row["gemm_programs"]), row
    md = (tmp_path / f"compiled_quick_{name}_sm90.md").read_text()
    assert "compiled on a CPU-only host, not run" in md and "command" in md



def test_time_fn_batches_short_calls_and_times_long_ones_alone():
    import time

    import jax.numpy as jnp

    from benchmarks import harness

    calls = []
    x = jnp.ones((4,))
    fast = jax.jit(lambda x: x + 1)

    def slow(x):
        calls.append(1)
        time.sleep(0.02)
        return x

    t = harness.time_fn(fast, (x,), reps=3, min_sample_ms=5.0)
    assert t.batch > 1 and t.median_ms < 5.0, t
    t = harness.time_fn(slow, (x,), warmup=1, reps=3, min_sample_ms=5.0)
    assert t.batch == 1 and len(calls) == 4 and 15 < t.median_ms < 200, t


def test_sweeps_keep_the_points_asked_for():
    assert ops.parse_ms(None) is None and ops.parse_ms("64,8192") == (64, 8192)
    shapes = ops.select(ops.sweep_shapes("gpt3-175b"), (64, 8192))
    assert sorted({s.m for s in shapes}) == [64, 8192] and len(shapes) == 4
    with pytest.raises(ValueError, match="positive integers"):
        ops.parse_ms("64,-1")
    with pytest.raises(ValueError, match="no shape of the sweep has M in"):
        ops.select(ops.sweep_shapes("gpt3-175b"), (3,))
