#!/bin/bash
# Bystander figures A/B: revision REV's agent (A) and this checkout's (B), interleaved
# A/B/A/B in one sitting, each run with the loop probe counting passes over 2 ms of CPU.
#
#   bench/bystander_ab.sh REV ROUNDS PHASE...     e.g.  bench/bystander_ab.sh 20adafc 3 cpu_burn conn_flood giant_service
#
# Prints each run's table, then each phase's figures over all of a side's runs pooled (one
# p99 of every call, and the share of calls over 3 ms): steadier than a run's own p99,
# which moves by a millisecond between runs of the same code here.
#
# Runs from a scratch directory so that neither side's `softlb` is shadowed by the current
# directory (an agent started with `python -m` puts it first on sys.path). Output and probe
# logs stay in that directory (printed at the start).
set -euo pipefail
rev=$1; rounds=$2; shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bystander-ab.XXXXXX)
mkdir "$work/base"
git -C "$repo" archive "$rev" | tar -x -C "$work/base"
ln -s agent "$work/base/softlb_agent"
echo "A = $rev, B = $repo; logs in $work"
cd "$work"
for r in $(seq 1 "$rounds"); do
  for side in A B; do
    out=$work/$side.$r
    pp=$repo/bench/loop_probe
    if [ "$side" = A ]; then pp=$work/base:$pp; fi
    SOFTLB_PROBE=$out.probe SOFTLB_PROBE_PASS_MS=2 PYTHONPATH=$pp \
      "$repo/.venv/bin/python" "$repo/bench/bystander.py" --only "$@" --json --samples "$out.samples" \
      > "$out.json" 2> "$out.err" || true  # exits 1 when a phase misses 5 ms
    slow=$(grep -c -E 'PASS [0-9.]+ ms cpu ([2-9]|[1-9][0-9]+)\.[0-9] ms' "$out.probe" || true)
    echo "== $side round $r $(date +%T), passes over 2 ms CPU: $slow"
    "$repo/.venv/bin/python" "$repo/bench/bystander_pool.py" "$out"
  done
done
echo "== pooled over the rounds (every call of each side's runs in one distribution)"
"$repo/.venv/bin/python" "$repo/bench/bystander_pool.py" --pool "$work/A" "$work/B" "$rounds"
