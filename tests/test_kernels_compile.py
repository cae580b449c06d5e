"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked on this CPU-only host.

The interpreter runs the kernels' logic; this checks what only the compiler
sees (branch types, atomics, constexpr globals). It runs in a subprocess
because this process has Triton in interpreter mode.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "tests.compile_for_gpu", "90"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 9 and all(" ok: " in line for line in lines), r.stdout
