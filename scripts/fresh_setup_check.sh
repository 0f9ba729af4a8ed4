#!/usr/bin/env bash
# The README's promise off this machine: a fresh clone, a Python with no torch, and pip seeing only the public
# index (no local wheel folder, no pip configuration or constraints of this machine), then `make test`.
#
#   scripts/fresh_setup_check.sh PYTHON [WORKDIR]      e.g. ~/.pyenv/versions/3.12.1/bin/python
#
# Clones HEAD of this repository into WORKDIR/repo, runs `PYTHON=... make test` there with its own pip cache
# (WORKDIR/pip-cache, so that its size is what was downloaded), and prints the wall time, the bytes downloaded
# and the venv's size. Exit status: make's.
set -uo pipefail
py=${1:?usage: fresh_setup_check.sh PYTHON [WORKDIR]}
work=${2:-$(mktemp -d /tmp/loraxs-fresh.XXXXXX)}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
rm -rf "$work/repo" && git clone -q "$repo" "$work/repo" || exit 1
if "$py" -c 'import torch' 2>/dev/null; then echo "fresh_setup_check: $py already has torch; pick one without" >&2; exit 2; fi
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX
export PIP_CONFIG_FILE=/dev/null PIP_CACHE_DIR="$work/pip-cache"
cd "$work/repo"
start=$(date +%s)
PYTHON="$py" make test > "$work/make-test.log" 2>&1
rc=$?
end=$(date +%s)
tail -n 3 "$work/make-test.log"
echo "fresh_setup_check: $("$py" --version) commit $(git rev-parse --short HEAD): make test exit $rc in $((end - start)) s;" \
     "downloaded $(du -sh "$work/pip-cache" | cut -f1) (pip cache), venv $(du -sh .venv | cut -f1); log $work/make-test.log"
exit $rc
