#!/usr/bin/env bash
# Peer comparison, one run: the same fast stdio echo server (tether's bundled demo server,
# tool `echo`) called directly over its pipes, and behind Tether (stdio upstream, SQLite),
# supergateway (npm, streamable HTTP, stateful), mcp-proxy (PyPI) and mcp-proxy (npm), at 1
# and 16 sessions. Each cell is run REPS times and the median is reported: calls/s, p50 and
# p99 latency, CPU microseconds per call of the gateway process tree (gateway plus the
# echo servers it started) and its peak resident memory. Two more baselines: the echo server
# serving Streamable HTTP itself, and the floor (`tether __floor`: a bare relay, Streamable
# HTTP in and the child's pipes out, on Tether's HTTP stack), what any HTTP gateway in front
# of stdio costs on this machine.
#
#   scripts/bench-peers.sh                      # 10s per cell, 3 repetitions
#   DURATION=5s REPS=3 scripts/bench-peers.sh   # quicker
#   SESSIONS=16 IN_FLIGHT=4 scripts/bench-peers.sh   # several calls in flight per session
#   ONLY='floor|tether' scripts/bench-peers.sh        # only some gateway rows
#
# Peers are installed, pinned, under target/bench-peers/ (npm and a Python venv). Results go
# to target/bench-peers/results.md (a table for BENCHMARKS.md) and results.jsonl (raw).
set -euo pipefail
set -m # background jobs get their own process group, so a gateway's whole tree can be stopped
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
REPS="${REPS:-3}"
SESSIONS="${SESSIONS:-1 16}"
IN_FLIGHT="${IN_FLIGHT:-1}" # calls in flight per session
SUPERGATEWAY_VERSION=4.0.0
MCP_PROXY_NPM_VERSION=6.7.19
MCP_PROXY_PYPI_VERSION=0.13.0

OUT=target/bench-peers
mkdir -p "$OUT"
cargo build --release -q -p tether
T="$PWD/target/release/tether"
ECHO=("$T" demo-server)

if [ ! -x "$OUT/npm/node_modules/.bin/supergateway" ] || [ ! -x "$OUT/npm/node_modules/.bin/mcp-proxy" ]; then
  echo "installing supergateway@$SUPERGATEWAY_VERSION and mcp-proxy@$MCP_PROXY_NPM_VERSION (npm)" >&2
  mkdir -p "$OUT/npm"
  (cd "$OUT/npm" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error \
    "supergateway@$SUPERGATEWAY_VERSION" "mcp-proxy@$MCP_PROXY_NPM_VERSION")
fi
if [ ! -x "$OUT/venv/bin/mcp-proxy" ]; then
  echo "installing mcp-proxy==$MCP_PROXY_PYPI_VERSION (PyPI)" >&2
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q "mcp-proxy==$MCP_PROXY_PYPI_VERSION"
fi

. scripts/lib.sh

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT

record() { # name sessions json
  python3 -c 'import json,sys; r=json.loads(sys.argv[3]); r["name"]=sys.argv[1]; r["n"]=int(sys.argv[2]); print(json.dumps(r))' "$1" "$2" "$3" >>"$RESULTS"
}

# A gateway in front of the echo server: started fresh for every cell, so every run starts
# from the same state and peak memory is the cell's own.
gateway_cell() { # name url-path start-command...
  local name=$1 path=$2
  shift 2
  # ONLY=REGEX runs only the gateway rows whose name matches (the direct row always runs).
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  for n in $SESSIONS; do
    local port
    port=$(free_port)
    local cmd=("${@//PORT/$port}")
    "${cmd[@]}" >"$STATE/$name.log" 2>&1 &
    local pid=$!
    wait_port "$port"
    local json
    # shellcheck disable=SC2086 # BENCH_EXTRA is a list of words
    json=$("$T" bench "http://127.0.0.1:$port$path" --sessions "$n" --in-flight "$IN_FLIGHT" --duration "$DURATION" \
      --warmup "$WARMUP" --watch-pid "$pid" --json ${BENCH_EXTRA:-}) || { echo "$name failed; log:" >&2; cat "$STATE/$name.log" >&2; }
    [ -n "${json:-}" ] && record "$name" "$n" "$json"
    kill -- -"$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$name n=$n rep=$rep done" >&2
  done
}

# Repetitions are the outer loop: each round runs every cell once, so a drift of the
# machine's speed during the run (this VM drifts by ±15% between minutes) spreads over all
# rows instead of favouring whichever ran first.
for rep in $(seq 1 "$REPS"); do
  for n in $SESSIONS; do
    json=$("$T" bench --stdio --sessions "$n" --in-flight "$IN_FLIGHT" --duration "$DURATION" --warmup "$WARMUP" --json -- "${ECHO[@]}")
    record "direct stdio (no gateway)" "$n" "$json"
    echo "direct n=$n rep=$rep done" >&2
  done

  # The floor of any HTTP gateway: the same echo server answering Streamable HTTP itself
  # (rmcp's server transport, stateful, SSE answers), no gateway and no durability.
  gateway_cell "echo server's own HTTP (no gateway)" /mcp \
    "$T" demo-server --http 127.0.0.1:PORT
  # The floor of any HTTP gateway in front of stdio: a bare relay on Tether's own HTTP stack
  # (Streamable HTTP in, a child per session, ids matched; no durability, ledger or metrics).
  # Every gateway row is read against it.
  gateway_cell "floor: bare relay (tether __floor)" /mcp \
    "$T" __floor --listen 127.0.0.1:PORT -- "${ECHO[@]}"
  gateway_cell "tether (stdio upstream, SQLite)" /mcp \
    "$T" serve --listen 127.0.0.1:PORT --admin-listen 127.0.0.1:0 --state-dir "$STATE/tether-PORT" --log warn -- "${ECHO[@]}"
  # The same with the Redis live store (REDIS_URL, default the local server; each cell its
  # own key prefix; the ledger stays SQLite).
  gateway_cell "tether (stdio upstream, Redis live store)" /mcp \
    "$T" serve --listen 127.0.0.1:PORT --admin-listen 127.0.0.1:0 --state-dir "$STATE/tether-redis-PORT" --log warn \
    --store "${REDIS_URL:-redis://127.0.0.1:6379}" --store-prefix "bench-peers-PORT-$$" -- "${ECHO[@]}"
  # Stateless 2026-07-28 clients through the same gateway: each of N clients calls on its
  # own; the bridge serves them from pooled upstream sessions (4 by default; 16 = one per
  # client, like the legacy rows' one upstream per session).
  BENCH_EXTRA="--protocol-version 2026-07-28" gateway_cell "tether, 2026-07-28 clients (bridge, pool 4)" /mcp \
    "$T" serve --listen 127.0.0.1:PORT --admin-listen 127.0.0.1:0 --state-dir "$STATE/tether-modern-PORT" --log warn -- "${ECHO[@]}"
  BENCH_EXTRA="--protocol-version 2026-07-28" gateway_cell "tether, 2026-07-28 clients (bridge, pool 16)" /mcp \
    "$T" serve --listen 127.0.0.1:PORT --admin-listen 127.0.0.1:0 --state-dir "$STATE/tether-modern16-PORT" --log warn \
    --pool-size 16 -- "${ECHO[@]}"
  gateway_cell "supergateway $SUPERGATEWAY_VERSION (streamableHttp, stateful)" /mcp \
    "$OUT/npm/node_modules/.bin/supergateway" --stdio "${ECHO[*]}" --outputTransport streamableHttp --stateful \
    --port PORT --logLevel none
  gateway_cell "mcp-proxy $MCP_PROXY_PYPI_VERSION (PyPI)" /mcp \
    "$OUT/venv/bin/mcp-proxy" --host 127.0.0.1 --port PORT --log-level WARNING -- "${ECHO[@]}"
  gateway_cell "mcp-proxy $MCP_PROXY_NPM_VERSION (npm)" /mcp \
    "$OUT/npm/node_modules/.bin/mcp-proxy" --host 127.0.0.1 --port PORT -- "${ECHO[@]}"
done

python3 - "$RESULTS" "$DURATION" "$REPS" "$IN_FLIGHT" >"$OUT/results.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = []
for r in rows:
    if r["name"] not in order:
        order.append(r["name"])
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
print(f"Each cell: median of {sys.argv[3]} runs of {sys.argv[2]} measured (`tether bench`, {sys.argv[4]} call(s) in flight per session, tool `echo`).\n")
print("| path | sessions | calls/s | p50 µs | p99 µs | gateway CPU µs/call | peak RSS MiB | errors |")
print("|---|---|---|---|---|---|---|---|")
for name in order:
    for n in sorted({r["n"] for r in rows if r["name"] == name}):
        rs = [r for r in rows if r["name"] == name and r["n"] == n]
        cps = med([r["calls_per_s"] for r in rs])
        p50 = med([r["latency_us"]["p50"] for r in rs])
        p99 = med([r["latency_us"]["p99"] for r in rs])
        cpu = med([r.get("watched", {}).get("cpu_us_per_call") for r in rs])
        rss = med([r.get("watched", {}).get("peak_rss_kib") for r in rs])
        errs = sum(sum(v for k, v in r["outcomes"].items() if k != "ok") for r in rs)
        f = lambda v, fmt: (fmt % v) if v is not None else "–"
        print(f"| {name} | {n} | {f(cps, '%.0f')} | {f(p50, '%.0f')} | {f(p99, '%.0f')} | {f(cpu, '%.0f')} | {f(rss and rss / 1024, '%.1f')} | {errs} |")
PY
cat "$OUT/results.md"
