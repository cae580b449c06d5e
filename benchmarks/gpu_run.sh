#!/usr/bin/env bash
# Everything a lent GPU should run, in one call; results under $OUT (default benchmarks/results/gpu).
#
#   on the device machine, from the repository root, with .whl/ carried:
#   bash benchmarks/gpu_run.sh                  # every step
#   bash benchmarks/gpu_run.sh pytest_gpu gemm_gpt3   # only these steps, in this order
#
# Installs the carried jax-triton wheel (the machine has no network), checks that every kernel
# compiles, runs the GPU tests (world size 1 through jax-triton; 8 ranks emulated on the one GPU),
# then the signalling-cost (emulated 8 ranks), status-check, GEMM, op and model benchmarks. Each
# step's output is kept even when a step fails; each step is cut after STEP_TIMEOUT_S (default
# 300 s; the device tool allows 600 s a call, so split a full run over calls by naming steps); the
# exit status is that of the first failing step. Steps: env compile pytest_gpu emulated
# emulated_fp8 status_check gemm_gpt3 gemm_gpt3_bT gemm_gpt3_fp8 gemm_llama70b gemm_llama70b_w8
# ops_gpt3 ops_gpt3_fp8 model_7b model_7b_wT model_7b_remat (tune with TUNE=1; tune_backward with
# TUNE=1 too).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  pip install -q --no-deps --target .site .whl/*.whl
  export PYTHONPATH="$PWD/.site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# Lazy module loading can deadlock spin-waiting kernels: load every module up front.
export CUDA_MODULE_LOADING=EAGER
export TRITON_DEFAULT_FP_FUSION=1
# jax_flux's workspace and the rank emulation allocate outside XLA's pool: leave room.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
status=0
wanted=" $* "
step() {  # step NAME COMMAND...: run (if wanted), tee to $OUT/NAME.txt, remember the first failure
  local name=$1; shift
  if [ "$wanted" != "  " ] && [[ "$wanted" != *" $name "* ]]; then return 0; fi
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local start=$SECONDS
  timeout -k 10 "${STEP_TIMEOUT_S:-300}" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}
step env bash -c "nvidia-smi; python -c 'import jax, triton; print(jax.__version__, triton.__version__, jax.devices())'"
step compile python -m tests.compile_for_gpu 90
step pytest_gpu env JAX_FLUX_TEST_PLATFORM=gpu python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_fused.py
step emulated python -m benchmarks.emulated --out "$OUT"
step emulated_fp8 python -m benchmarks.emulated --dtype float8_e4m3fn --out "$OUT"
step status_check python -m benchmarks.status_check --out "$OUT"
step gemm_gpt3 python -m benchmarks.gemm --sweep gpt3-175b --out "$OUT"
step gemm_gpt3_bT python -m benchmarks.gemm --sweep gpt3-175b --b-transposed --out "$OUT"
step gemm_gpt3_fp8 python -m benchmarks.gemm --sweep gpt3-175b --dtype float8_e4m3fn --b-transposed --out "$OUT"
step gemm_llama70b python -m benchmarks.gemm --sweep llama2-70b --out "$OUT"
step gemm_llama70b_w8 python -m benchmarks.gemm --sweep llama2-70b --b-dtype float8_e4m3fn --b-transposed --out "$OUT"
step ops_gpt3 python -m benchmarks.ops --sweep gpt3-175b --out "$OUT"
step ops_gpt3_fp8 python -m benchmarks.ops --sweep gpt3-175b --dtype float8_e4m3fn --w-transposed --impls xla,fused --out "$OUT"
step model_7b python -m benchmarks.model --preset llama2-7b --layers 2 --impls xla,ring,fused --float8-weights --out "$OUT"
step model_7b_wT python -m benchmarks.model --preset llama2-7b --layers 2 --impls xla,fused --float8-weights --kernels-transposed --out "$OUT"
step model_7b_remat python -m benchmarks.model --preset llama2-7b --layers 2 --scan-layers --remat collective_matmuls --impls xla,fused --out "$OUT"
# Optional (GPU time): autotune the GPT-3 sweep at this world size; add --ship to keep the winners.
if [ "${TUNE:-0}" = "1" ] || [[ "$wanted" == *" tune"* ]]; then
  step tune python -m benchmarks.tune --sweep gpt3-175b --max-configs "${TUNE_MAX_CONFIGS:-16}" --out "$OUT"
  step tune_backward python -m benchmarks.tune --sweep gpt3-175b --backward --max-configs "${TUNE_MAX_CONFIGS:-16}" --out "$OUT"
fi
exit $status
