#!/usr/bin/env bash
# What serving several servers from one process costs a call, in one run: the demo server
# (tool `echo`) driven directly over its pipes (the baseline: no gateway), behind Tether
# with one upstream (`-- CMD`, at /mcp), and behind Tether serving a three-server
# mcpServers file (each server a demo server) at /servers/two/mcp: the hub's dispatch
# (server lookup, path rewrite) and the per-server limits are the difference. Then the
# three servers loaded at once (one bench per server, N sessions each), against three
# one-upstream gateways loaded at once: one process for three servers versus three
# processes. Rounds interleave the rows so drift favours none; a fresh gateway per cell.
# Prints a median table (calls/s, p50, p99, gateway tree CPU per call).
#
#   cargo build --release -p tether && scripts/bench-servers.sh
#   DURATION=10s ROUNDS=5 scripts/bench-servers.sh
set -euo pipefail
set -m
BIN="${BIN:-target/release/tether}"
DURATION="${DURATION:-5s}"
ROUNDS="${ROUNDS:-3}"
SESSIONS="${SESSIONS:-1 16}"
OUT=$(mktemp -d)
. "$(dirname "$0")/lib.sh"
DEMO=("$BIN" demo-server)
ALL=()
trap 'for p in "${ALL[@]}"; do kill -TERM -- -"$p" 2>/dev/null || true; done' EXIT
cat >"$OUT/servers.json" <<JSON
{"mcpServers": {
  "one": {"command": "$BIN", "args": ["demo-server"]},
  "two": {"command": "$BIN", "args": ["demo-server"]},
  "three": {"command": "$BIN", "args": ["demo-server"]}}}
JSON

emit() { # label sessions json
  python3 -c "
import json,sys; r=json.loads(sys.argv[1])
print(json.dumps({'row':'$1','sessions':$2,**r}))" "$3" >>"$OUT/runs.jsonl"
}

gateway() { # port state args... ; sets GW_PID (its own process group: set -m)
  local port=$1 state=$2
  shift 2
  "$BIN" serve --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --state-dir "$state" \
    --log warn --session-rate 100000 --session-burst 100000 "$@" >/dev/null 2>&1 &
  GW_PID=$!
  ALL+=("$GW_PID")
}

stop() { kill -TERM -- -"$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

one_cell() { # label sessions url-path gateway-args...
  local label=$1 n=$2 path=$3 port state pid
  shift 3
  port=$(free_port)
  state=$(mktemp -d)
  gateway "$port" "$state" "$@"
  pid=$GW_PID
  wait_port "$port"
  emit "$label" "$n" "$("$BIN" bench "http://127.0.0.1:$port$path" -n "$n" --duration "$DURATION" --warmup 1s --watch-pid "$pid" --json)"
  stop "$pid"
  rm -rf "$state"
}

# Three benches at once; the row is their sum (calls/s) and their worst p50/p99. The first
# bench watches `pid`: with `whole` = 1 that process serves all three benches, so its CPU
# is divided by all their calls; else it serves the first bench's calls only.
three_at_once() { # label sessions url1 url2 url3 pid whole
  local label=$1 n=$2 u1=$3 u2=$4 u3=$5 watch=$6 whole=$7
  "$BIN" bench "$u1" -n "$n" --duration "$DURATION" --warmup 1s --watch-pid "$watch" --json >"$OUT/a.json" &
  local a=$!
  "$BIN" bench "$u2" -n "$n" --duration "$DURATION" --warmup 1s --json >"$OUT/b.json" &
  local b=$!
  "$BIN" bench "$u3" -n "$n" --duration "$DURATION" --warmup 1s --json >"$OUT/c.json" &
  wait "$a" "$b" $!
  emit "$label" "$n" "$(python3 - "$OUT" "$whole" <<'PY'
import json, sys
rs = [json.load(open(f"{sys.argv[1]}/{x}.json")) for x in "abc"]
out = dict(rs[0])
out["calls_per_s"] = sum(r["calls_per_s"] for r in rs)
if sys.argv[2] == "1" and out.get("watched"):
    out["watched"] = dict(out["watched"])
    out["watched"]["cpu_us_per_call"] *= rs[0]["calls_per_s"] / out["calls_per_s"]
out["latency_us"] = {k: max(r["latency_us"][k] for r in rs) for k in ("p50", "p99")}
print(json.dumps(out))
PY
)"
}

for round in $(seq 1 "$ROUNDS"); do
  for n in $SESSIONS; do
    emit "direct stdio (no gateway)" "$n" "$("$BIN" bench --stdio -n "$n" --duration "$DURATION" --warmup 1s --json -- "${DEMO[@]}")"
    one_cell "Tether, one upstream, /mcp" "$n" /mcp -- "${DEMO[@]}"
    one_cell "Tether, 3-server file, /servers/two/mcp" "$n" /servers/two/mcp --servers "$OUT/servers.json"
    # One process serving three servers, all loaded at once.
    port=$(free_port); state=$(mktemp -d)
    gateway "$port" "$state" --servers "$OUT/servers.json"; pid=$GW_PID; wait_port "$port"
    base="http://127.0.0.1:$port/servers"
    three_at_once "3 servers loaded at once: one gateway (sum)" "$n" "$base/one/mcp" "$base/two/mcp" "$base/three/mcp" "$pid" 1
    stop "$pid"; rm -rf "$state"
    # Three one-upstream gateways, loaded at once (CPU is the first one's only).
    ports=(); pids=(); states=()
    for i in 1 2 3; do
      p=$(free_port); s=$(mktemp -d)
      gateway "$p" "$s" -- "${DEMO[@]}"
      ports+=("$p"); states+=("$s"); pids+=("$GW_PID")
    done
    for p in "${ports[@]}"; do wait_port "$p"; done
    three_at_once "3 servers loaded at once: three gateways (sum)" "$n" \
      "http://127.0.0.1:${ports[0]}/mcp" "http://127.0.0.1:${ports[1]}/mcp" "http://127.0.0.1:${ports[2]}/mcp" "${pids[0]}" 0
    for p in "${pids[@]}"; do stop "$p"; done
    rm -rf "${states[@]}"
  done
done
median_table "$OUT/runs.jsonl" "gateway CPU"
