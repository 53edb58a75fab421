#!/usr/bin/env bash
# Before/after on one machine in one run: two tether binaries (A = before, B = after), each
# serving the bundled demo server over stdio (SQLite, default limits), loaded by B's
# `tether bench` at 1 and 16 sessions; rounds interleave A and B so drift favours neither.
# Prints one line per run and a median table (calls/s, p50, p99, gateway tree CPU per call).
#
#   scripts/bench-ab.sh OLD_TETHER NEW_TETHER            # 5s per cell, 3 rounds
#   DURATION=10s ROUNDS=5 scripts/bench-ab.sh OLD NEW
#   UPSTREAM=http scripts/bench-ab.sh OLD NEW            # the demo over HTTP instead (one
#                                                        # per run, legacy sessions to it),
#                                                        # and a row D: the demo called
#                                                        # directly, the baseline
#   TOOL=large scripts/bench-ab.sh OLD NEW               # calls carry 100 KB each way
#
# With the stdio upstream, row D is the demo driven directly over its pipes (`tether bench
# --stdio`, the demo's own CPU watched). The CPU columns: the gateway's process tree (with
# its upstream children), the gateway process alone (children excluded, from /proc), and the
# tree minus D (what the gateway adds over the demo driven directly).
#
# Build the old binary from a worktree of the commit to compare, e.g.
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release -p tether)
set -euo pipefail
set -m
A="$1"
B="$2"
DURATION="${DURATION:-5s}"
ROUNDS="${ROUNDS:-3}"
UPSTREAM="${UPSTREAM:-stdio}"
TOOL="${TOOL:-echo}"
SESSIONS="${SESSIONS:-1 16}"
OUT=$(mktemp -d)
. "$(dirname "$0")/lib.sh"
# Appends one `tether bench --json` result (stdin) to the runs, tagged with its build and
# session count.
record() {
  python3 -c "
import json,sys; r=json.load(sys.stdin)
print(json.dumps({'build':'$1','sessions':$2,**r}))" >>"$OUT/runs.jsonl"
}
run() { # label binary sessions
  local port state pid up_port up_pid=
  port=$(free_port)
  state=$(mktemp -d)
  local tool_args=()
  if [ "$TOOL" = large ]; then
    tool_args=(--tool echo --args "{\"text\":\"$(head -c 102400 /dev/zero | tr '\0' x)\"}")
  fi
  if [ "$UPSTREAM" = http ]; then
    up_port=$(free_port)
    "$B" demo-server --http "127.0.0.1:$up_port" >/dev/null 2>&1 &
    up_pid=$!
    wait_port "$up_port"
  fi
  if [ "$1" = D ] && [ "$UPSTREAM" != http ]; then
    "$B" bench --stdio -n "$3" --duration "$DURATION" --warmup 1s --json "${tool_args[@]}" \
      -- "$B" demo-server | record D "$3"
    rm -rf "$state"
    return
  fi
  if [ "$1" = D ]; then
    "$B" bench "http://127.0.0.1:$up_port/mcp" -n "$3" --duration "$DURATION" --warmup 1s \
      --json "${tool_args[@]}" | record D "$3"
    kill -TERM -- -"$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
    rm -rf "$state"
    return
  fi
  if [ "$UPSTREAM" = http ]; then
    "$2" serve --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --state-dir "$state" \
      --log warn --upstream-url "http://127.0.0.1:$up_port/mcp" --upstream-protocol legacy \
      >/dev/null 2>&1 &
  else
    "$2" serve --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --state-dir "$state" \
      --log warn -- "$2" demo-server >/dev/null 2>&1 &
  fi
  pid=$!
  wait_port "$port"
  "$B" bench "http://127.0.0.1:$port/mcp" -n "$3" --duration "$DURATION" --warmup 1s \
    --watch-pid "$pid" --json "${tool_args[@]}" | record "$1" "$3"
  kill -TERM -- -"$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$up_pid" ]; then
    kill -TERM -- -"$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  rm -rf "$state"
}
for round in $(seq 1 "$ROUNDS"); do
  for n in $SESSIONS; do
    run A "$A" "$n"
    run B "$B" "$n"
    run D "" "$n"
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
print("| build | sessions | calls/s | p50 µs | p99 µs | tree CPU µs/call | gateway alone µs/call | tree − D µs/call |")
print("|---|---|---|---|---|---|---|---|")
for b in ("A", "B", "D"):
    for n in sorted({r["sessions"] for r in runs}):
        rs = [r for r in runs if r["build"] == b and r["sessions"] == n]
        if not rs:
            continue
        med = lambda *k: statistics.median([pick(r, *k) or 0 for r in rs])
        rng = lambda *k: "%d–%d" % (min(pick(r, *k) or 0 for r in rs), max(pick(r, *k) or 0 for r in rs))
        direct = [r for r in runs if r["build"] == "D" and r["sessions"] == n and pick(r, 'watched.cpu_us_per_call')]
        tree = med('watched.cpu_us_per_call')
        own = '–'
        if b != 'D' and direct:
            own = format(tree - statistics.median([pick(r, 'watched.cpu_us_per_call') for r in direct]), '.0f')
        alone = med('watched.self_cpu_us_per_call')
        print(f"| {b} | {n} | {med('calls_per_s'):,.0f} ({rng('calls_per_s')}) | {med('latency_us.p50'):.0f} | {med('latency_us.p99'):.0f} | {format(tree, '.0f') if tree else '–'} | {format(alone, '.0f') if alone else '–'} | {own} |")
PY
