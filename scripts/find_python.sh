#!/usr/bin/env bash
# Prints the command of the first Python >= 3.10 (pyproject's requires-python) and, on stderr, why
# it was taken. Order: $PYTHON when set (then nothing else is tried), python3, python3.14 ... python3.10,
# python. A candidate counts only if it runs: a pyenv shim for a version that is not selected exits
# non-zero, and is skipped with pyenv's reason. Exit 1, listing every candidate and what it was,
# when none fits.
set -uo pipefail

MIN_MAJOR=3 MIN_MINOR=10
tried=()

check() {  # check CMD: sets ver and returns 0 when CMD is a Python >= 3.10 (no subshell: tried must persist)
  local cmd=$1 path out
  ver=
  if ! path=$(command -v -- "$cmd" 2>/dev/null); then tried+=("$cmd: not on PATH"); return 1; fi
  local rc=0 line first=""
  out=$("$path" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    while IFS= read -r line; do [ -n "$line" ] && { first=$line; break; }; done <<< "$out"
    tried+=("$cmd ($path): exits $rc${first:+: $first}"); return 1
  fi
  local major=${out%%.*} rest=${out#*.}; local minor=${rest%%.*}
  if ! [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]]; then
    tried+=("$cmd ($path): printed '$out', not a version"); return 1
  fi
  if (( major < MIN_MAJOR || (major == MIN_MAJOR && minor < MIN_MINOR) )); then
    tried+=("$cmd ($path): Python $out, older than $MIN_MAJOR.$MIN_MINOR"); return 1
  fi
  ver=$out
}

if [ -n "${PYTHON:-}" ]; then
  if check "$PYTHON"; then
    echo "python: $PYTHON (Python $ver, from PYTHON=$PYTHON)" >&2
    echo "$PYTHON"; exit 0
  fi
  echo "error: PYTHON=$PYTHON cannot be used: ${tried[0]}" >&2
  echo "       this project needs Python >= $MIN_MAJOR.$MIN_MINOR; unset PYTHON to search PATH" >&2
  exit 1
fi

for cand in python3 python3.14 python3.13 python3.12 python3.11 python3.10 python; do
  if check "$cand"; then
    if [ ${#tried[@]} -gt 0 ]; then
      skipped=$(printf '%s; ' "${tried[@]}")
      echo "python: $cand (Python $ver); skipped: ${skipped%; }" >&2
    else
      echo "python: $cand (Python $ver, the first Python >= $MIN_MAJOR.$MIN_MINOR on PATH)" >&2
    fi
    echo "$cand"; exit 0
  fi
done

echo "error: no Python >= $MIN_MAJOR.$MIN_MINOR found on PATH. Tried:" >&2
for t in "${tried[@]}"; do echo "  - $t" >&2; done
echo "Install one (e.g. apt-get install python3 python3-venv), or name it: make test PYTHON=/path/to/python3.12" >&2
exit 1
