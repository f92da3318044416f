#!/usr/bin/env bash
# Regenerate the transformers-side logit-parity reference data in tests/parity_data/.
# Creates (if missing) a Python 3.11 virtualenv .venv-parity with torch (CPU) + transformers,
# then runs tools/parity/make_references.py and tools/parity/make_saved_checkpoints.py.
# The regular test run never needs torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-parity"

TORCH_PIN="torch==2.13.0"            # only this pin: a local CPU wheel exists for it
TRANSFORMERS_PIN="transformers==5.23.0"

find_python311() {
  local cand
  if command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/3.11.*/bin/python; do
      if [ -x "$cand" ]; then echo "$cand"; return 0; fi
    done
  fi
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && \
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2]==(3,11) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python311)" || { echo "refresh.sh: no Python 3.11 found (pyenv or python3.11)" >&2; exit 1; }
  echo "refresh.sh: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" - "$TORCH_PIN" "$TRANSFORMERS_PIN" <<'PYEOF' 2>/dev/null
import sys, importlib.metadata as md
for pin in sys.argv[1:]:
    name, ver = pin.split("==")
    if md.version(name).split("+")[0] != ver:
        sys.exit(1)
for name in ("safetensors", "numpy"):
    md.version(name)
PYEOF
then
  echo "refresh.sh: installing $TORCH_PIN $TRANSFORMERS_PIN safetensors numpy"
  # torch first and alone, so pip can never resolve a different (CUDA) build.
  "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN"
  "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" "$TRANSFORMERS_PIN" safetensors numpy
fi

"$VENV/bin/python" tools/parity/make_references.py --out tests/parity_data "$@"
# Checkpoints in the naming schemes transformers' own save_pretrained writes (from small_window).
"$VENV/bin/python" tools/parity/make_saved_checkpoints.py --out tests/parity_data
