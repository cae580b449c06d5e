"""Timing, environment record and report writing shared by the benchmark sweeps.

Rules every sweep follows: check the result against the reference before
timing it; exclude warm-up (compilation, first launch, lazy module loading);
time repeated device-synchronised runs and report the median and spread.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

from jax_flux._timing import sample_ms


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    batch: int = 1  # calls per timed sample (see time_fn)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0


def time_fn(fn: Callable, args: Sequence, *, warmup: int = 2, reps: int = 10,
            min_sample_ms: float = 5.0) -> Timing:
    """Per-call wall time of ``fn(*args)``: median, min and max over ``reps``
    samples, each a batch of back-to-back calls synchronised once
    (``jax_flux._timing.sample_ms``: a short kernel is not timed as the host's
    dispatch latency). Warm-up is excluded."""
    samples, batch = sample_ms(fn, args, warmup=warmup, reps=reps, min_sample_ms=min_sample_ms)
    return Timing(statistics.median(samples), min(samples), max(samples), reps, batch)


def environment(devices) -> dict:
    """What a result must be read with: device, count, versions, command."""
    import jax
    import triton

    return {
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "platform": devices[0].platform,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "command": "python -m " + " ".join(shlex.quote(a) for a in
                                           [_module_name()] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return "?"


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: str, title: str, env: dict, tables: list[tuple[str, str]],
                   notes: Sequence[str] = ()) -> None:
    with open(path, "w") as f:
        f.write(f"# {title}\n\n")
        for k, v in env.items():
            f.write(f"- {k}: `{v}`\n")
        for note in notes:
            f.write(f"\n{note}\n")
        for heading, table in tables:
            f.write(f"\n## {heading}\n\n{table}\n")


def plot(path: str, title: str, series: dict[str, tuple[list, list]], xlabel: str,
         ylabel: str) -> bool:
    """Line plot of {label: (x, y)}; False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install '.[bench]'): no {path}")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def format_row(row: dict, columns: Sequence[str]) -> str:
    """One result row as ``key=value`` pairs (for the console)."""
    return " ".join(f"{c}={row[c]:.4g}" if isinstance(row[c], float) else f"{c}={row[c]}"
                    for c in columns if row.get(c) is not None)


def write_report(base: str, title: str, env: dict, rows: list[dict], columns: Sequence[str],
                 notes: Sequence[str], on_gpu: bool) -> None:
    """``base``.csv and ``base``.md of one benchmark run (CPU runs marked as smoke runs)."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    write_csv(base + ".csv", [{c: r.get(c) for c in columns} for r in rows])
    notes = list(notes)
    if not on_gpu:
        notes.append("CPU devices: a smoke run of the harness, not a performance claim.")
    write_markdown(base + ".md", title, env, [("results", markdown_table(rows, columns))], notes)
