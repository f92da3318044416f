#!/usr/bin/env bash
# Brings a Python 3.12 interpreter to a machine that has none (a stock Cloud TPU VM image ships an
# older system Python) and prints its path on stdout, like tools/python312.sh, which calls it when
# its search finds nothing. The Makefile then builds .venv from it with the same pinned
# requirements.txt (the TPU runtime, libtpu, included), so nothing else changes.
#
# Steps (each printed on stderr as "bootstrap: ..."; every failure is one "error: ..." line):
#   1. a 3.12 installed by an earlier run in $BOOTSTRAP_DIR/python   -> print it, done
#   2. uv: on PATH, or installed by an earlier run in $BOOTSTRAP_DIR/uv, or else
#      `python3 -m pip install --target $BOOTSTRAP_DIR/uv uv` (uv is a PyPI package; pip's index
#      settings, PIP_INDEX_URL / PIP_TIMEOUT / PIP_RETRIES / pip.conf, apply)
#   3. `uv python install 3.12` into $BOOTSTRAP_DIR/python (a managed interpreter downloaded from
#      python-build-standalone; UV_PYTHON_INSTALL_MIRROR points it elsewhere), then `uv python find`
# BOOTSTRAP_DIR defaults to ${SPARSE_LM_BOOTSTRAP_DIR:-${XDG_CACHE_HOME:-~/.cache}/sparse-lm-bootstrap}
# (outside the checkout: shared by checkouts, kept by `make clean-venv`). A second run finds what
# the first installed and says so.
set -u
dir="${SPARSE_LM_BOOTSTRAP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse-lm-bootstrap}"
say() { echo "bootstrap: $*" >&2; }
fail() {
  echo "error: $*; alternatives: set PYTHON312=/path/to/python3.12, install python3.12 (e.g. apt-get install python3.12, pyenv install 3.12), or allow access to a package index (PIP_INDEX_URL)" >&2
  exit 1
}
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
# uv's managed interpreters land in $dir/python/cpython-3.12.<patch>-<platform>/bin/python3.12.
managed() {
  local p
  for p in "$dir"/python/cpython-3.12*/bin/python3.12; do
    if [ -x "$p" ] && is312 "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

if py=$(managed); then
  say "found Python 3.12 installed by an earlier bootstrap: $py (nothing to install)"
  echo "$py"; exit 0
fi
say "no Python 3.12 on this machine: installing one with uv into $dir"
mkdir -p "$dir" || fail "cannot create the bootstrap directory $dir (set SPARSE_LM_BOOTSTRAP_DIR to a writable one)"

if uv=$(command -v uv 2>/dev/null); then
  say "using uv from PATH: $uv"
elif [ -x "$dir/uv/bin/uv" ]; then
  uv="$dir/uv/bin/uv"
  say "using uv installed by an earlier bootstrap: $uv"
else
  pip_py=""
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -m pip --version >/dev/null 2>&1; then pip_py=$(command -v "$c"); break; fi
  done
  [ -n "$pip_py" ] || fail "uv is not installed and no python3 with pip was found to install it (tried python3 -m pip, python -m pip; install python3-pip or uv: https://docs.astral.sh/uv/)"
  log="$dir/pip-install-uv.log"
  say "installing uv: $pip_py -m pip install --target $dir/uv uv (log: $log)"
  rm -rf "$dir/uv.partial"
  if ! "$pip_py" -m pip install --disable-pip-version-check --no-input --target "$dir/uv.partial" uv >"$log" 2>&1 || [ ! -x "$dir/uv.partial/bin/uv" ]; then
    rm -rf "$dir/uv.partial"
    fail "could not install uv from the package index (${PIP_INDEX_URL:-https://pypi.org/simple}): '$pip_py -m pip install uv' failed, see $log"
  fi
  rm -rf "$dir/uv"; mv "$dir/uv.partial" "$dir/uv" || fail "cannot move uv into $dir/uv"
  uv="$dir/uv/bin/uv"
  say "installed uv: $uv"
fi

export UV_PYTHON_INSTALL_DIR="$dir/python"
log="$dir/uv-python-install.log"
say "installing Python 3.12: $uv python install 3.12 (into $UV_PYTHON_INSTALL_DIR, log: $log)"
"$uv" python install 3.12 >"$log" 2>&1 \
  || fail "'uv python install 3.12' failed (it downloads from ${UV_PYTHON_INSTALL_MIRROR:-github.com/astral-sh/python-build-standalone}; set UV_PYTHON_INSTALL_MIRROR for a mirror), see $log"
if ! py=$(managed); then
  py=$("$uv" python find --managed-python 3.12 2>/dev/null || "$uv" python find 3.12 2>/dev/null) && is312 "$py" \
    || fail "'uv python install 3.12' succeeded but no working 3.12 was found in $UV_PYTHON_INSTALL_DIR, see $log"
fi
say "installed Python 3.12: $py"
echo "$py"
