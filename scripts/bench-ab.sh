#!/usr/bin/env bash
# Before/after on one machine in one run: two tether binaries (A = before, B = after), each
# serving the bundled demo server over stdio (SQLite, default limits), loaded by B's
# `tether bench` at 1 and 16 sessions; rounds interleave A and B so drift favours neither.
# Prints one line per run and a median table (calls/s, p50, p99, gateway tree CPU per call).
#
#   scripts/bench-ab.sh OLD_TETHER NEW_TETHER            # 5s per cell, 3 rounds
#   DURATION=10s ROUNDS=5 scripts/bench-ab.sh OLD NEW
#
# Build the old binary from a worktree of the commit to compare, e.g.
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release -p tether)
set -euo pipefail
set -m
A="$1"
B="$2"
DURATION="${DURATION:-5s}"
ROUNDS="${ROUNDS:-3}"
SESSIONS="${SESSIONS:-1 16}"
OUT=$(mktemp -d)
. "$(dirname "$0")/lib.sh"
run() { # label binary sessions
  local port state pid
  port=$(free_port)
  state=$(mktemp -d)
  "$2" serve --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --state-dir "$state" \
    --log warn -- "$2" demo-server >/dev/null 2>&1 &
  pid=$!
  wait_port "$port"
  "$B" bench "http://127.0.0.1:$port/mcp" -n "$3" --duration "$DURATION" --warmup 1s \
    --watch-pid "$pid" --json | python3 -c "
import json,sys; r=json.load(sys.stdin)
print(json.dumps({'build':'$1','sessions':$3,**r}))" >>"$OUT/runs.jsonl"
  kill -TERM -- -"$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$state"
}
for round in $(seq 1 "$ROUNDS"); do
  for n in $SESSIONS; do
    run A "$A" "$n"
    run B "$B" "$n"
  done
done
python3 - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def pick(r, *keys):
    for k in keys:
        cur = r
        for part in k.split('.'):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None
print("| build | sessions | calls/s | p50 µs | p99 µs | gateway CPU µs/call |")
print("|---|---|---|---|---|---|")
for b in ("A", "B"):
    for n in sorted({r["sessions"] for r in runs}):
        rs = [r for r in runs if r["build"] == b and r["sessions"] == n]
        med = lambda *k: statistics.median([pick(r, *k) or 0 for r in rs])
        rng = lambda *k: "%d–%d" % (min(pick(r, *k) or 0 for r in rs), max(pick(r, *k) or 0 for r in rs))
        print(f"| {b} | {n} | {med('calls_per_s'):,.0f} ({rng('calls_per_s')}) | {med('latency_us.p50'):.0f} | {med('latency_us.p99'):.0f} | {med('watched.cpu_us_per_call'):.0f} |")
PY
