#!/usr/bin/env bash
# Tether in front of an HTTP upstream that speaks both eras (the demo over HTTP, rmcp 3.11),
# in one run: the upstream loaded directly (legacy sessions, and 2026-07-28 stateless
# requests: the baselines), then through Tether speaking legacy to it
# (--upstream-protocol legacy) and 2026-07-28 (--upstream-protocol modern), each loaded by
# a legacy client (`tether bench`, sessions) and by a 2026-07-28 client (stateless
# requests, through the bridge's pooled sessions) at 1 and 16 sessions. Rounds interleave the
# rows so drift favours none. Prints a median table (calls/s, p50, p99, gateway tree CPU
# per call; the direct rows watch the upstream instead).
#
#   cargo build --release -p tether && scripts/bench-http-upstream.sh
#   DURATION=10s ROUNDS=5 scripts/bench-http-upstream.sh
set -euo pipefail
set -m
BIN="${BIN:-target/release/tether}"
DURATION="${DURATION:-5s}"
ROUNDS="${ROUNDS:-3}"
SESSIONS="${SESSIONS:-1 16}"
OUT=$(mktemp -d)
. "$(dirname "$0")/lib.sh"

up_port=$(free_port)
"$BIN" demo-server --http "127.0.0.1:$up_port" >/dev/null 2>&1 &
up_pid=$!
trap 'kill -TERM -- -"$up_pid" 2>/dev/null || true' EXIT
wait_port "$up_port"
UP="http://127.0.0.1:$up_port/mcp"

record() { # label sessions watched-pid url [bench args...]
  local label=$1 n=$2 pid=$3 url=$4
  shift 4
  "$BIN" bench "$url" -n "$n" --duration "$DURATION" --warmup 1s --watch-pid "$pid" --json "$@" |
    python3 -c "
import json,sys; r=json.load(sys.stdin)
print(json.dumps({'row':'$label','sessions':$n,**r}))" >>"$OUT/runs.jsonl"
}

through() { # label protocol sessions [bench args...]
  local label=$1 proto=$2 n=$3 port state pid
  shift 3
  port=$(free_port)
  state=$(mktemp -d)
  "$BIN" serve --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --state-dir "$state" \
    --log warn --upstream-url "$UP" --upstream-protocol "$proto" >/dev/null 2>&1 &
  pid=$!
  wait_port "$port"
  record "$label" "$n" "$pid" "http://127.0.0.1:$port/mcp" "$@"
  kill -TERM -- -"$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$state"
}

for round in $(seq 1 "$ROUNDS"); do
  for n in $SESSIONS; do
    record "direct, legacy sessions" "$n" "$up_pid" "$UP"
    record "direct, 2026-07-28 requests" "$n" "$up_pid" "$UP" --protocol-version 2026-07-28
    through "Tether, legacy to the upstream" legacy "$n"
    through "Tether, 2026-07-28 to the upstream" modern "$n"
    through "2026-07-28 client, Tether, legacy to the upstream" legacy "$n" --protocol-version 2026-07-28
    through "2026-07-28 client, Tether, 2026-07-28 to the upstream" modern "$n" --protocol-version 2026-07-28
  done
done
median_table "$OUT/runs.jsonl" "watched CPU"
