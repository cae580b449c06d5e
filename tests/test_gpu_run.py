"""The GPU session runner (benchmarks/gpu_run.py) on the CPU: its plans, its budget, what comes back.

A lent GPU gives a session minutes, and its tool returns at most 8 files of
plain names from $OUT; these tests hold the runner to that without a GPU.
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_run
from benchmarks.gpu_run import Step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plans_name_steps_and_expand_in_order():
    for plan in gpu_run.PLANS.values():
        assert plan and all(n in gpu_run.STEPS for n in plan)
    steps = gpu_run.expand(["gemm_gpt3", "first"])
    assert [s.name for s in steps] == ["gemm_gpt3", "env", "pytest_gpu_core", "emulated",
                                       "ops_gpt3"]
    assert [s.name for s in gpu_run.expand([])] == list(gpu_run.PLANS["first"])
    with pytest.raises(ValueError, match="unknown step or plan 'nope'"):
        gpu_run.expand(["nope"])
    for s in gpu_run.STEPS.values():
        assert 0 < s.min_s <= s.est_s <= s.cap_s <= 600, s


def _collected(step: str) -> set[str]:
    argv = gpu_run.STEPS[step].command("unused")
    # On the GPU: the suite's conftest pins JAX to the CPU unless told otherwise.
    assert argv[:2] == ["env", "JAX_FLUX_TEST_PLATFORM=gpu"] and argv[3:5] == ["-m", "pytest"]
    args = [a for a in argv[5:] if a != "-v"]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_core_and_rest_gpu_tests_split_every_gpu_test_once():
    core, rest = _collected("pytest_gpu_core"), _collected("pytest_gpu_rest")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                        *gpu_run.GPU_TESTS], cwd=ROOT, capture_output=True, text=True)
    every = {line for line in r.stdout.splitlines() if "::" in line}
    assert len(core) == 7 and not core & rest and core | rest == every, (core, len(every))
    # The protocol's 200-repetition cases and both ops through jax-triton are in the core.
    assert sum("8_ranks" in t for t in core) == 4
    assert sum("through_jax_triton" in t for t in core) == 2


class _Parsed(Exception):
    pass


def test_every_benchmark_step_parses_its_arguments(monkeypatch):
    # Each benchmark step's arguments go through its module's own parser (and
    # nothing runs): a renamed flag fails here, not in a GPU session's minutes.
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    checked = 0
    for s in gpu_run.STEPS.values():
        argv = s.command("/nonexistent")
        if argv[1:2] != ["-m"] or not argv[2].startswith("benchmarks."):
            continue
        main = importlib.import_module(argv[2]).main
        with pytest.raises(_Parsed):
            main(argv[3:])
        checked += 1
    assert checked == sum(1 for s in gpu_run.STEPS.values() if "benchmarks." in " ".join(s.argv))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_budget_timeouts_failures_and_what_comes_back(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out"
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('spinning', flush=True); "
            "time.sleep(60)")
    steps = [
        Step("ok", _py("import os, sys; print('hello', os.environ['CUDA_MODULE_LOADING']); "
                       "open(sys.argv[1] + '/r.csv', 'w').write('a\\n1\\n')") + ("{results}",),
             5, 30, 1),
        Step("hangs", _py(hang), 5, 3, 1),
        Step("fails", _py("import sys; print('boom'); sys.exit(3)"), 5, 30, 1),
        Step("too_big", _py("print('never')"), 5, 600, 500),
    ]
    rows = gpu_run.run(steps, 120, str(results), str(out))
    status = {r["step"]: (r["status"], r["rc"]) for r in rows}
    assert status == {"ok": ("ok", 0), "hangs": ("timeout", 124), "fails": ("failed", 3),
                      "too_big": ("skipped", None)}
    # The timed-out step's whole process group is gone, its child included.
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    # What the device tool returns: at most 8 files of plain names, 2 folders deep.
    back = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(back) == ["gpu_results.tar.gz", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in back)
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        log = tar.extractfile("results/hangs.txt").read().decode()
    assert {"ok.txt", "hangs.txt", "fails.txt", "r.csv", "summary.md", "summary.csv"} <= names
    assert "spinning" in log and "too_big.txt" not in names
    summary = (out / "summary.md").read_text()
    assert "| fails | failed | 3 |" in summary and "not started" in summary
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(summary.strip().splitlines()[-1])  # the table comes last
    assert "hello EAGER" in printed and "boom" in printed  # gpu_run.STEP_ENV


def test_main_returns_the_first_failing_rc_and_refuses_out_as_results(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_run.STEPS, "fails", Step("fails", _py("raise SystemExit(5)"), 1, 30, 1))
    monkeypatch.setitem(gpu_run.STEPS, "ok", Step("ok", _py("pass"), 1, 30, 1))
    rc = gpu_run.main(["ok", "fails", "ok", "--results", str(tmp_path / "r"),
                       "--out", str(tmp_path / "o"), "--budget", "60"])
    assert rc == 5
    with pytest.raises(SystemExit):
        gpu_run.main(["ok", "--results", str(tmp_path), "--out", str(tmp_path)])


def test_the_shell_wrapper_lists_the_plans():
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), "--list"],
                       capture_output=True, text=True, env=dict(os.environ, OUT=""))
    assert r.returncode == 0, r.stderr
    assert "plan first" in r.stdout and "pytest_gpu_core" in r.stdout
