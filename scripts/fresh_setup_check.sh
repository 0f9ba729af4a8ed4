#!/usr/bin/env bash
# The README's promise off this machine: a fresh clone, a Python with no torch, and pip seeing only the public
# index (no local wheel folder, no pip configuration or constraints of this machine), then `make test`.
#
#   scripts/fresh_setup_check.sh PYTHON [WORKDIR]      e.g. ~/.pyenv/versions/3.12.1/bin/python
#
# Clones HEAD of this repository into WORKDIR/repo, runs `PYTHON=... make test` there with an empty pip cache
# of its own, and prints the wall time, the bytes the machine received meanwhile (every interface's rx counter
# in /proc/net/dev: the downloads, plus whatever else the machine fetched in that time) and the venv's size.
# Exit status: make's.
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
rx() { awk 'NR > 2 && $1 != "lo:" { s += $2 } END { printf "%.0f\n", s }' /proc/net/dev; }
rx0=$(rx)
start=$(date +%s)
PYTHON="$py" make test > "$work/make-test.log" 2>&1
rc=$?
end=$(date +%s)
rx1=$(rx)
tail -n 3 "$work/make-test.log"
echo "fresh_setup_check: $("$py" --version) commit $(git rev-parse --short HEAD): make test exit $rc in $((end - start)) s;" \
     "received $(( (rx1 - rx0) / 1000000 )) MB, venv $(du -sh .venv | cut -f1); log $work/make-test.log"
exit $rc
