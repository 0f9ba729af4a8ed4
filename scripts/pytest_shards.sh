#!/usr/bin/env bash
# pytest_shards.sh N PYTEST-ARGS...: N pytest processes side by side, process i running every N-th
# collected test from the i-th (LORAXS_TEST_SHARD, tests/conftest.py); prints each log, fails if any
# process failed. For GPU machines, where Triton's compiles (CPU-bound, one thread each) dominate.
set -uo pipefail
n=$1; shift
PY=${PYTHON:-python3}
logs=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; exit 143' TERM INT
for ((i = 0; i < n; i++)); do
  LORAXS_TEST_SHARD="$i/$n" "$PY" -m pytest "$@" >"$logs/$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"; rc=$?
  # 5: no test collected in this shard (fewer tests than processes)
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
  echo "--- shard $i/$n (exit $rc)"; tail -n 25 "$logs/$i.log"
done
exit $status
