# Shell helpers shared by the benchmark scripts (sourced, not run).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (up to 10 s) until something accepts connections on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

# Prints the median table of a runs.jsonl (one `tether bench --json` result per line, with
# `row` and `sessions` added): per row and session count, median calls/s with the min–max
# of the rounds, p50, p99, and the watched process's CPU per call (column title: $2).
median_table() {
  python3 - "$1" "$2" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def pick(r, k):
    cur = r
    for part in k.split('.'):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur or 0
rows = []
for r in runs:
    if r["row"] not in rows:
        rows.append(r["row"])
print(f"| path | sessions | calls/s (min–max) | p50 µs | p99 µs | {sys.argv[2]} µs/call |")
print("|---|---|---|---|---|---|")
for n in sorted({r["sessions"] for r in runs}):
    for row in rows:
        rs = [r for r in runs if r["row"] == row and r["sessions"] == n]
        med = lambda k: statistics.median([pick(r, k) for r in rs])
        lo, hi = min(pick(r, "calls_per_s") for r in rs), max(pick(r, "calls_per_s") for r in rs)
        print(f"| {row} | {n} | {med('calls_per_s'):,.0f} ({lo:,.0f}–{hi:,.0f}) | {med('latency_us.p50'):.0f} | {med('latency_us.p99'):.0f} | {med('watched.cpu_us_per_call'):.0f} |")
PY
}
