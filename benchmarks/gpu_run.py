"""Every GPU check in one device call, sized to a lease: steps in priority order under a budget.

    bash benchmarks/gpu_run.sh                        # plan "first" within GPU_BUDGET_S (480 s)
    bash benchmarks/gpu_run.sh --budget 300 second    # the next plan, in a second call
    bash benchmarks/gpu_run.sh pytest_gpu_core gemm_gpt3   # these steps, in this order
    python -m benchmarks.gpu_run --list               # plans, steps, their estimates

A lent GPU comes with a few minutes of device time for the whole session, its
start included, and returns at most 8 files from ``$OUT``. So:

* steps run in the order named (plans expand in place), each in its own
  process group, cut at ``min(its cap, the budget left)``; a step is skipped,
  and says so, when less is left than it needs to say anything (``min_s``);
* each step's output goes to ``RESULTS/<step>.txt`` (and to stdout), the
  benchmarks write their CSV/markdown/PNG into ``RESULTS``;
* after every step, ``RESULTS`` is packed into ``$OUT/gpu_results.tar.gz``
  and the summary (step, status, rc, seconds, estimate, last line) written to
  ``$OUT/summary.md``: a call killed at its limit still returns what ran;
* the summary table is printed last (the device tool returns the output's tail).

A session with a lent GPU (15 minutes of device time here, the machine's
start included): download jax-triton 0.3.1's wheel into ``.whl/`` (README of
the device tool), then one call ``bash benchmarks/gpu_run.sh --budget 480
first`` carrying ``.whl`` with a timeout of about 540 s, and, while the
machine is still warm, ``--budget 240 pytest_gpu_rest status_check`` or what
the summary says is next; unpack ``gpu_results.tar.gz`` into
``benchmarks/results/`` and commit what matters.

The estimates are guesses until a GPU session measures them: the summary
records every step's actual seconds next to its estimate, so the next session
can correct ``STEPS``. The exit status is the first failing step's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

PY = os.environ.get("PYTHON", sys.executable)
ARCHIVE = "gpu_results.tar.gz"
SUMMARY = "summary.md"
# Seconds kept back from the budget for packing the results after the last step.
RESERVE_S = 10
# What every step runs with (unless set already): lazily loaded CUDA modules can
# deadlock kernels that spin-wait on each other, so load them all up front;
# jax_flux's workspace and the rank emulation allocate outside XLA's pool, so
# leave room; unbuffered output, so a step cut at its limit has logged what it did.
STEP_ENV = {"CUDA_MODULE_LOADING": "EAGER", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
            "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONUNBUFFERED": "1"}

# GPU tests worth the first minutes: each op through jax-triton at world size 1
# (bfloat16), the 8-ranks-on-one-GPU protocol for both ops (the 200-repetition
# cases), float8 with w^T, and a rank that never launches.
CORE_TESTS = ("(world_size_1_through_jax_triton and bfloat16) or "
              "(ag_gemm_8_ranks and push and 128x512x256 and bfloat16) or "
              "(gemm_rs_8_ranks and epilogue and 1024x512x256 and bfloat16) or "
              "float8_with_w_transposed_8_ranks or never_launches")
GPU_TESTS = ("tests/test_gpu.py", "tests/test_gpu_fused.py", "tests/test_gpu_multi.py")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a GPU session.

    Attributes:
      name: what the session names it by; also its log's name.
      argv: the command (``{results}`` is replaced by the results folder).
      est_s: expected seconds on one H100/H200 (a guess until measured).
      cap_s: the most it may take.
      min_s: the least time left in which it is still worth starting.
    """

    name: str
    argv: tuple[str, ...]
    est_s: int
    cap_s: int
    min_s: int

    def command(self, results: str) -> list[str]:
        return [a.replace("{results}", results) for a in self.argv]


def _pytest(expr: str, *files: str) -> tuple[str, ...]:
    # Without JAX_FLUX_TEST_PLATFORM=gpu the suite pins JAX to the CPU and skips these.
    return ("env", "JAX_FLUX_TEST_PLATFORM=gpu", PY, "-m", "pytest", "-v", "-rfE",
            "--durations=15", "-p", "no:cacheprovider", "-m", "gpu", "-k", expr, *files)


def _bench(module: str, *args: str) -> tuple[str, ...]:
    return (PY, "-m", f"benchmarks.{module}", *args, "--out", "{results}")


# The device, its clocks, then what it gives the fused kernels (jax_flux.doctor:
# versions, jax-triton, peer links, settings; the step's rc is 1 if a check fails).
_ENV = ("bash", "-c", "nvidia-smi; nvidia-smi -q -d CLOCK | sed -n 1,40p; " + PY +
        " -c 'import jax, triton; print(jax.__version__, triton.__version__, jax.devices())'; "
        + PY + " -m jax_flux.doctor")
# In priority order: correctness first, then the numbers the issues ask for.
STEPS = {s.name: s for s in [
    Step("env", _ENV, 20, 90, 5),
    Step("pytest_gpu_core", _pytest(CORE_TESTS, *GPU_TESTS), 180, 330, 60),
    Step("gemm_gpt3", _bench("gemm", "--sweep", "gpt3-175b", "--configs", "2"), 90, 240, 40),
    Step("emulated", _bench("emulated", "--max-m", "4096", "--reps", "5"), 120, 240, 40),
    Step("ops_gpt3", _bench("ops", "--sweep", "gpt3-175b", "--ms", "64,1024,8192"), 120, 300, 40),
    Step("pytest_gpu_rest", _pytest(f"not ({CORE_TESTS})", *GPU_TESTS), 300, 540, 60),
    Step("status_check", _bench("status_check"), 60, 180, 30),
    Step("gemm_gpt3_all", _bench("gemm", "--sweep", "gpt3-175b"), 150, 300, 60),
    Step("gemm_gpt3_bT", _bench("gemm", "--sweep", "gpt3-175b", "--b-transposed", "--configs",
                                "2"), 90, 240, 40),
    Step("gemm_gpt3_fp8", _bench("gemm", "--sweep", "gpt3-175b", "--dtype", "float8_e4m3fn",
                                 "--b-transposed", "--configs", "2"), 90, 240, 40),
    Step("gemm_llama70b", _bench("gemm", "--sweep", "llama2-70b", "--configs", "2"), 120, 300,
         40),
    Step("gemm_llama70b_w8", _bench("gemm", "--sweep", "llama2-70b", "--b-dtype",
                                    "float8_e4m3fn", "--b-transposed", "--configs", "2"),
         120, 300, 40),
    Step("emulated_fp8", _bench("emulated", "--dtype", "float8_e4m3fn", "--max-m", "4096",
                                "--reps", "5"), 120, 240, 40),
    Step("ops_gpt3_all", _bench("ops", "--sweep", "gpt3-175b"), 240, 420, 60),
    Step("ops_gpt3_fp8", _bench("ops", "--sweep", "gpt3-175b", "--dtype", "float8_e4m3fn",
                                "--w-transposed", "--impls", "xla,fused"), 180, 360, 60),
    Step("model_7b", _bench("model", "--preset", "llama2-7b", "--layers", "2", "--impls",
                            "xla,ring,fused", "--float8-weights"), 180, 360, 60),
    Step("model_7b_wT", _bench("model", "--preset", "llama2-7b", "--layers", "2", "--impls",
                               "xla,fused", "--float8-weights", "--kernels-transposed"),
         150, 300, 60),
    Step("model_7b_remat", _bench("model", "--preset", "llama2-7b", "--layers", "2",
                                  "--scan-layers", "--remat", "collective_matmuls", "--impls",
                                  "xla,fused"), 150, 300, 60),
    Step("tune", _bench("tune", "--sweep", "gpt3-175b", "--max-configs", "16"), 480, 540, 120),
    Step("tune_backward", _bench("tune", "--sweep", "gpt3-175b", "--backward", "--max-configs",
                                 "16"), 480, 540, 120),
]}
# A session's first call (correctness, then the first numbers), its second, everything.
PLANS = {
    "first": ("env", "pytest_gpu_core", "gemm_gpt3", "emulated", "ops_gpt3"),
    "second": ("pytest_gpu_rest", "status_check", "gemm_gpt3_bT", "gemm_gpt3_fp8",
               "emulated_fp8", "model_7b"),
    "all": tuple(n for n in STEPS if not n.startswith("tune")),
    "tune": ("tune", "tune_backward"),
}


def expand(names: list[str]) -> list[Step]:
    """Steps of ``names`` (steps or plans), in the order named, each once."""
    out: list[Step] = []
    for name in names or ["first"]:
        if name in PLANS:
            batch = [STEPS[n] for n in PLANS[name]]
        elif name in STEPS:
            batch = [STEPS[name]]
        else:
            raise ValueError(f"unknown step or plan {name!r}: plans {sorted(PLANS)}, "
                             f"steps {list(STEPS)}")
        out += [s for s in batch if s not in out]
    return out


def _run_one(argv: list[str], log_path: str, timeout_s: float) -> tuple[int, str]:
    """Runs ``argv`` in its own process group, its output to ``log_path`` and
    stdout; (rc, last line). Past ``timeout_s`` the whole group is ended: rc 124."""
    last = ""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1,
                                env={**STEP_ENV, **os.environ})

        def pump():
            nonlocal last
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
                if line.strip():
                    last = line.strip()
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
            last = f"cut at {timeout_s:.0f} s (last output: {last[:200]})"
        reader.join(timeout=5)
    return rc, last


def _status(rc: int | None) -> str:
    return {None: "skipped", 0: "ok", 124: "timeout"}.get(rc, "failed")


def write_summary(rows: list[dict], results: str, out: str | None, header: list[str]) -> str:
    """Summary table to ``results``/summary.md (+ .csv) and, with ``out``, a copy
    there beside the packed results; returns the table's text. (Not
    benchmarks.harness's writers: they import jax_flux, and the runner imports
    nothing the steps it launches and times could share.)"""
    cols = ["step", "status", "rc", "seconds", "est_s", "last"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r[c]).replace("|", "/") if r[c] is not None else "" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    text = "# GPU session summary\n\n" + "".join(f"- {h}\n" for h in header) + "\n" + table + "\n"
    with open(os.path.join(results, SUMMARY), "w") as f:
        f.write(text)
    with open(os.path.join(results, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if out:
        with open(os.path.join(out, SUMMARY), "w") as f:
            f.write(text)
    return table


def pack(results: str, out: str) -> str:
    """``results`` as ``out``/gpu_results.tar.gz (written aside, then moved in place)."""
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz")
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(results, arcname=os.path.basename(os.path.normpath(results)) or "results")
    os.chmod(tmp, 0o644)
    dest = os.path.join(out, ARCHIVE)
    shutil.move(tmp, dest)
    return dest


def run(steps: list[Step], budget_s: float, results: str, out: str | None,
        clock=time.monotonic) -> list[dict]:
    """Runs ``steps`` within ``budget_s`` seconds; the rows of the summary."""
    start = clock()
    deadline = start + budget_s - RESERVE_S
    os.makedirs(results, exist_ok=True)
    if out:
        os.makedirs(out, exist_ok=True)
    header = [f"budget {budget_s:.0f} s, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
              f"steps: {' '.join(s.name for s in steps)}",
              f"results: {results}" + (f", packed into $OUT/{ARCHIVE}" if out else "")]
    rows: list[dict] = []
    table = ""
    for s in steps:
        left = deadline - clock()
        row = dict(step=s.name, status="skipped", rc=None, seconds=0, est_s=s.est_s, last="")
        argv = s.command(results)
        if left < s.min_s:
            row["last"] = f"not started: {left:.0f} s of the budget left, needs {s.min_s}+"
        else:
            timeout = min(s.cap_s, left)
            log = os.path.join(results, f"{s.name}.txt")
            with open(log, "w") as f:
                f.write(f"== {s.name}: {' '.join(argv)} (cut at {timeout:.0f} s)\n")
            print(f"== {s.name}: {' '.join(argv)} (cut at {timeout:.0f} s)", flush=True)
            t0 = clock()
            rc, last = _run_one(argv, log, timeout)
            row.update(status=_status(rc), rc=rc, seconds=round(clock() - t0), last=last[:160])
            print(f"== {s.name}: {row['status']} (rc={rc}) in {row['seconds']} s", flush=True)
        rows.append(row)
        # After every step, so a call cut at its limit still returns what ran.
        table = write_summary(rows, results, out, header + [f"took {clock() - start:.0f} s"])
        if out:
            pack(results, out)
    print("\n" + table, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("names", nargs="*", help="steps or plans, in order (default: first)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_BUDGET_S", 480)),
                   help="seconds for the whole call (default $GPU_BUDGET_S or 480)")
    p.add_argument("--results", default=os.environ.get(
        "RESULTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu")))
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="where the packed results and summary go (default $OUT; none: no pack)")
    p.add_argument("--list", action="store_true", help="print the plans and steps, run nothing")
    a = p.parse_args(argv)
    try:
        steps = expand(a.names)
    except ValueError as e:
        p.error(str(e))
    if a.list:
        for name, plan in PLANS.items():
            est = sum(STEPS[n].est_s for n in plan)
            print(f"plan {name} (~{est} s): {' '.join(plan)}")
        for s in STEPS.values():
            print(f"  {s.name:18s} est {s.est_s:4d} s, cap {s.cap_s:4d} s, min {s.min_s:4d} s: "
                  f"{' '.join(s.argv)}")
        return 0
    if a.out and os.path.abspath(a.out) == os.path.abspath(a.results):
        p.error("--out must not be the results folder (the archive would hold itself)")
    rows = run(steps, a.budget, a.results, a.out)
    return next((r["rc"] for r in rows if r["rc"] not in (None, 0)), 0)


if __name__ == "__main__":
    sys.exit(main())
