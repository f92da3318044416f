#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter. When none is found, tools/bootstrap.sh installs
# one (uv + a managed 3.12, steps on stderr) and prints its path; PYTHON312_NO_BOOTSTRAP=1 fails
# instead with a message saying where it looked.
# The default python3 on our machines is 3.11, where pip resolves an old JAX, so we never use it.
set -u
candidates=()
[ -n "${PYTHON312:-}" ] && candidates+=("$PYTHON312")
candidates+=(python3.12)
if command -v pyenv >/dev/null 2>&1; then
  for p in $(ls -d "$(pyenv root)"/versions/3.12.*/bin/python 2>/dev/null | sort -r -V); do candidates+=("$p"); done
fi
candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12 python3)
for c in "${candidates[@]}"; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    command -v "$c"; exit 0
  fi
done
if [ -n "${PYTHON312_NO_BOOTSTRAP:-}" ]; then
  echo "error: no Python 3.12 interpreter found (looked at: ${candidates[*]}); set PYTHON312=/path/to/python3.12 (PYTHON312_NO_BOOTSTRAP is set, so tools/bootstrap.sh was not run)" >&2
  exit 1
fi
echo "bootstrap: no Python 3.12 interpreter found (looked at: ${candidates[*]})" >&2
exec "${BASH:-bash}" "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
