#!/usr/bin/env bash
# GPU checks the lead runs on the GPU machine (JAX 0.11.2 + CUDA + Triton there):
#     bash tools/gpu_check.sh            # every section
#     bash tools/gpu_check.sh csa        # only the named sections
#     bash tools/gpu_check.sh tests bench   # both kernels' compiled tests, then the full benchmark
# Each kernel owns one section (a function below); add yours to SECTIONS. Compiled, not
# interpreted: JAX_PLATFORMS=cuda. Logs go to $OUT (the device tool's output folder) or
# ./gpu_check_out. Exit status: non-zero if any section failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LOG_DIR=${OUT:-$REPO/gpu_check_out}
mkdir -p "$LOG_DIR"

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PYTHON" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
}

# --- CSA token-sparse attention (kernels_pallas/sparse_attention) ------------------------------
# Compiled Pallas-Triton kernels vs the reference, forward and gradients (fp32 1e-5, bf16 2e-2).
# --noconftest: tests/conftest.py pulls in model presets (ml_collections), not needed here.
csa() {
  if [ "$JAX_PLATFORMS" != cpu ] && ! "$PYTHON" -c 'import jax, sys; sys.exit(not any(
      d.platform == "gpu" for d in jax.devices()))' 2>/dev/null; then
    echo "no GPU visible to JAX (JAX_PLATFORMS=$JAX_PLATFORMS): the compiled tests would only skip"
    return 1
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs \
    tests/kernels/test_sparse_attention_gpu.py 2>&1 | tee "$LOG_DIR/csa_pytest.log"
  local rc=${PIPESTATUS[0]}
  if [ -f experiments/bench_attention.py ]; then
    # CSA arms of the shared benchmark (CSA_PRESET / CSA_SEQ / CSA_RUNS size it).
    local preset=${CSA_PRESET:-flash}
    "$PYTHON" -m experiments.bench_attention --preset "$preset" \
      --seq "${CSA_SEQ:-8192,32768,131072}" --runs "${CSA_RUNS:-20}" \
      --arms dense_core,csa_core,csa_layer --json "$LOG_DIR/bench_csa_${preset}.json" 2>&1 \
      | tee "$LOG_DIR/bench_csa.log"
    rc=$(( rc || PIPESTATUS[0] ))
  else
    echo "experiments/bench_attention.py not present: benchmark skipped"
  fi
  return "$rc"
}

# --- Block-sparse HCA/SWA attention (kernels_pallas/block_sparse_attention) -------------------
# Compiled Pallas-Triton kernels vs the model reference, forward and gradients (fp32 1e-5, bf16
# 2e-2), then the HCA/dense part of the benchmark with the cuDNN sanity check of the dense
# baseline (head dim 256, twice the heads). BSA_SEQ / BSA_RUNS / BSA_PRESET size the benchmark
# (defaults: 8K,32K,128K, 20 runs, flash); its JSON lands in $LOG_DIR. The benchmark needs
# ml-collections (configs/model_presets.py) besides JAX.
block_sparse() {
  if [ "$JAX_PLATFORMS" != cpu ] && ! "$PYTHON" -c 'import jax, sys; sys.exit(not any(
      d.platform == "gpu" for d in jax.devices()))' 2>/dev/null; then
    echo "no GPU visible to JAX (JAX_PLATFORMS=$JAX_PLATFORMS): the compiled tests would only skip"
    return 1
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs \
    tests/kernels/test_block_sparse_attention_gpu.py 2>&1 | tee "$LOG_DIR/block_sparse_pytest.log"
  local rc=${PIPESTATUS[0]}
  local preset=${BSA_PRESET:-flash}
  "$PYTHON" -m experiments.bench_attention --preset "$preset" \
    --seq "${BSA_SEQ:-8192,32768,131072}" --runs "${BSA_RUNS:-20}" \
    --arms dense_core,hca_core,hca_layer --cudnn-check \
    --json "$LOG_DIR/bench_block_sparse_${preset}.json" 2>&1 \
    | tee "$LOG_DIR/bench_block_sparse.log"
  rc=$(( rc || PIPESTATUS[0] ))
  return "$rc"
}

# --- Both kernels' compiled tests in one pytest process (no benchmark) --------------------------
tests() {
  if [ "$JAX_PLATFORMS" != cpu ] && ! "$PYTHON" -c 'import jax, sys; sys.exit(not any(
      d.platform == "gpu" for d in jax.devices()))' 2>/dev/null; then
    echo "no GPU visible to JAX (JAX_PLATFORMS=$JAX_PLATFORMS): the compiled tests would only skip"
    return 1
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs --durations=5 \
    tests/kernels/test_sparse_attention_gpu.py tests/kernels/test_block_sparse_attention_gpu.py \
    2>&1 | tee "$LOG_DIR/tests_pytest.log"
  return "${PIPESTATUS[0]}"
}

# --- The whole attention benchmark, every arm, dense_core once per S ----------------------------
# BENCH_SEQ (8K,32K) at BENCH_RUNS (20) with the cuDNN check, then BENCH_LONG_SEQ (128K) at
# BENCH_LONG_RUNS (5) after 1 warm-up: dense_core at 128K takes seconds per call (S^2), so 20
# runs there cost minutes of device time. BENCH_PRESET: flash (default) or pro. The tables land
# in $LOG_DIR as bench_<preset>_main.json and bench_<preset>_long.json.
bench() {
  local preset=${BENCH_PRESET:-flash} rc=0
  "$PYTHON" -m experiments.bench_attention --preset "$preset" --seq "${BENCH_SEQ:-8192,32768}" \
    --runs "${BENCH_RUNS:-20}" --cudnn-check --json "$LOG_DIR/bench_${preset}_main.json" 2>&1 \
    | tr '\r' '\n' | grep -v '^bench_attention' | tee "$LOG_DIR/bench_${preset}_main.log"
  rc=${PIPESTATUS[0]}
  if [ -n "${BENCH_LONG_SEQ-131072}" ]; then
    "$PYTHON" -m experiments.bench_attention --preset "$preset" --seq "${BENCH_LONG_SEQ-131072}" \
      --runs "${BENCH_LONG_RUNS:-5}" --warmup 1 --json "$LOG_DIR/bench_${preset}_long.json" 2>&1 \
      | tr '\r' '\n' | grep -v '^bench_attention' | tee "$LOG_DIR/bench_${preset}_long.log"
    rc=$(( rc || PIPESTATUS[0] ))
  fi
  return "$rc"
}

SECTIONS=(csa block_sparse)   # `tests` and `bench` run only when named: bash tools/gpu_check.sh tests bench

main() {
  local wanted=("$@") failed=()
  [ ${#wanted[@]} -eq 0 ] && wanted=("${SECTIONS[@]}")
  environment 2>&1 | tee "$LOG_DIR/environment.log"
  for s in "${wanted[@]}"; do
    if ! declare -F "$s" >/dev/null; then
      echo "unknown section '$s': known sections are ${SECTIONS[*]}" >&2; exit 2
    fi
    echo "=== $s ==="
    "$s" || failed+=("$s")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED sections: ${failed[*]} (logs in $LOG_DIR)"; exit 1
  fi
  echo "all sections passed (logs in $LOG_DIR)"
}

main "$@"
