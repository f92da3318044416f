#!/usr/bin/env bash
# GPU checks of the fused lightning indexer and the MoE grouped matmul (issue 9), for the lead to
# run on the GPU machine (JAX 0.11.2 + CUDA + Triton there):
#     bash tools/gpu_check_kernels2.sh                  # every section
#     bash tools/gpu_check_kernels2.sh indexer          # only the named sections
# Sections: indexer (compiled tests, benchmark at 8K/32K/128K incl. the CSA core for the
# indexer's share, measured peak memory at 64K fused vs naive, TPU-AOT figure for comparison),
# moe (compiled tests, grouped-matmul benchmark balanced and skewed). Compiled, not
# interpreted: JAX_PLATFORMS=cuda. Logs and JSON go to $OUT (the device tool's output folder)
# or ./gpu_check_out. Exit status: non-zero if any section failed.
# Knobs: IDX_SEQ (default 8192,32768,131072), IDX_RUNS (20), IDX_PRESET (flash),
#        MOE_TPE (tokens per expert, 128,512,2048), MOE_EXPERTS (default: the preset's 256),
#        MOE_RUNS (20), MOE_PRESET (flash).
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
  "$PYTHON" -c 'import tokamax; print("tokamax", tokamax.__version__)' 2>/dev/null \
    || echo "tokamax not importable (the optional grouped-matmul backend is skipped)"
}

need_gpu() {
  if [ "$JAX_PLATFORMS" != cpu ] && ! "$PYTHON" -c 'import jax, sys; sys.exit(not any(
      d.platform == "gpu" for d in jax.devices()))' 2>/dev/null; then
    echo "no GPU visible to JAX (JAX_PLATFORMS=$JAX_PLATFORMS): the compiled tests would only skip"
    return 1
  fi
}

# --- Fused lightning indexer (kernels_pallas/indexer_topk) ---------------------------------
indexer() {
  need_gpu || return 1
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs \
    tests/kernels/test_indexer_topk_gpu.py 2>&1 | tee "$LOG_DIR/indexer_pytest.log"
  local rc=${PIPESTATUS[0]}
  local preset=${IDX_PRESET:-flash}
  "$PYTHON" -m experiments.bench_indexer --preset "$preset" --seq "${IDX_SEQ:-8192,32768,131072}" \
    --runs "${IDX_RUNS:-20}" --json "$LOG_DIR/bench_indexer_${preset}.json" 2>&1 \
    | tee "$LOG_DIR/bench_indexer.log"
  rc=$(( rc || PIPESTATUS[0] ))
  "$PYTHON" -m kernels_pallas.indexer_topk.aot_memory --seq 65536 --measure 2>&1 \
    | grep -v "^WARNING\|^E0000" | tee "$LOG_DIR/indexer_memory.log"
  rc=$(( rc || PIPESTATUS[0] ))
  return "$rc"
}

# --- MoE grouped matmul (kernels_pallas/grouped_matmul) ------------------------------------
moe() {
  need_gpu || return 1
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest -rs \
    tests/kernels/test_grouped_matmul_gpu.py 2>&1 | tee "$LOG_DIR/moe_pytest.log"
  local rc=${PIPESTATUS[0]}
  local preset=${MOE_PRESET:-flash}
  local experts=()
  [ -n "${MOE_EXPERTS:-}" ] && experts=(--experts "$MOE_EXPERTS")
  for dist in balanced skewed; do
    "$PYTHON" -m experiments.bench_moe --preset "$preset" "${experts[@]}" \
      --tokens-per-expert "${MOE_TPE:-128,512,2048}" --distribution "$dist" \
      --runs "${MOE_RUNS:-20}" --json "$LOG_DIR/bench_moe_${preset}_${dist}.json" 2>&1 \
      | tee "$LOG_DIR/bench_moe_${dist}.log"
    rc=$(( rc || PIPESTATUS[0] ))
  done
  return "$rc"
}

SECTIONS=(indexer moe)

main() {
  local wanted=("$@") failed=()
  [ ${#wanted[@]} -eq 0 ] && wanted=("${SECTIONS[@]}")
  environment 2>&1 | tee "$LOG_DIR/environment_kernels2.log"
  for s in "${wanted[@]}"; do
    if ! declare -F "$s" >/dev/null || [ "$s" = main ]; then
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
