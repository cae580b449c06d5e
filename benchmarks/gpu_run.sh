#!/usr/bin/env bash
# Everything a lent GPU should run, sized to the lease (see benchmarks/gpu_run.py).
#
#   on the device machine, from the repository root, with .whl/ carried:
#   bash benchmarks/gpu_run.sh                          # plan "first", within GPU_BUDGET_S (480)
#   bash benchmarks/gpu_run.sh --budget 300 second      # the next plan
#   bash benchmarks/gpu_run.sh pytest_gpu_core gemm_gpt3   # only these steps, in this order
#   python3 -m benchmarks.gpu_run --list                # plans and steps (no GPU needed)
#
# Installs the carried jax-triton wheel (the machine has no network), sets what the kernels need,
# then runs the steps in the order named under the time budget. Logs and the benchmarks' CSV /
# markdown / PNG go to $RESULTS (default benchmarks/results/gpu); after every step they are packed
# into $OUT/gpu_results.tar.gz beside $OUT/summary.md (the device tool returns at most 8 files),
# and the summary table is printed last. Exit status: the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps --no-index --target .site .whl/*.whl || exit
  export PYTHONPATH="$PWD/.site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# Every step also gets gpu_run.STEP_ENV (CUDA_MODULE_LOADING=EAGER: lazily loaded modules can
# deadlock spin-waiting kernels; room beside XLA's memory pool for the workspace).
exec python3 -m benchmarks.gpu_run "$@"
