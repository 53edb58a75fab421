#!/usr/bin/env bash
# A session whose upstream floods it while its client reads nothing (issue 26), for each
# tether binary given (before/after in one run): the stdio server `scripts/flood_server.py`
# writes BYTES of 64 KiB log notifications to a session whose GET stream and flooding POST
# come from sockets that take nothing, while a bystander session (another address) calls
# `echo` in a loop. Prints, per binary: the gateway's peak RSS, the database and WAL's peak
# size, the bystander's slowest call, and how long the flood took to pass.
#
#   scripts/bench-flood.sh OLD_TETHER NEW_TETHER          # BYTES=1GiB
#   BYTES=$((256<<20)) scripts/bench-flood.sh target/release/tether
set -euo pipefail
set -m
BYTES="${BYTES:-$((1 << 30))}"
SERVER="$(cd "$(dirname "$0")" && pwd)/flood_server.py"
. "$(dirname "$0")/lib.sh"
echo "| build | flood | gateway RSS peak | database + WAL peak | bystander's slowest call | flood passed in |"
echo "|---|---|---|---|---|---|"
for bin in "$@"; do
  port=$(free_port)
  state=$(mktemp -d)
  admin=$(free_port)
  "$bin" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --state-dir "$state" \
    --log warn --session-rate 1000 --write-timeout 600s -- python3 "$SERVER" >/dev/null 2>>"${FLOOD_LOG:-/dev/null}" &
  pid=$!
  wait_port "$port"
  echo "$admin" >"$state/admin.port"
  python3 - "$port" "$pid" "$state" "$BYTES" "$bin" <<'PY'
import json, os, socket, sys, time, http.client
port, pid, state, nbytes, label = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
HDR = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
def post(conn, body, sid=None):
    h = dict(HDR)
    if sid:
        h.update({"Mcp-Session-Id": sid, "Mcp-Protocol-Version": "2025-11-25"})
    conn.request("POST", "/mcp", json.dumps(body), h)
    r = conn.getresponse()
    data = r.read()
    return r, data
def session(name, src):
    c = http.client.HTTPConnection("127.0.0.1", port, source_address=(src, 0), timeout=60)
    r, _ = post(c, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": name, "version": "1"}}})
    sid = r.getheader("mcp-session-id")
    post(c, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
    return c, sid
def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
def size(f):
    p = os.path.join(state, f)
    return os.path.getsize(p) if os.path.exists(p) else 0
admin_port = int(open(os.path.join(state, "admin.port")).read())
token = open(os.path.join(state, "admin.token")).read().strip()
by, by_sid = session("bystander", "127.0.0.2")
_, sid = session("never-reads", "127.0.0.1")
def deaf(request):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request.encode())
    return s
get = deaf(f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n")
time.sleep(0.3)
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "flood", "arguments": {"bytes": nbytes}}})
flood = deaf(f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\nContent-Length: {len(body)}\r\n\r\n{body}")
started = time.time()
rss_peak, db_peak, wal_peak, slowest, n = 0, 0, 0, 0.0, 0
admin = None
while time.time() - started < 600:
    rss_peak = max(rss_peak, rss_kib())
    db_peak, wal_peak = max(db_peak, size("tether.db")), max(wal_peak, size("tether.db-wal"))
    n += 1
    t = time.time()
    post(by, {"jsonrpc": "2.0", "id": n, "method": "tools/call",
              "params": {"name": "echo", "arguments": {"text": "here"}}}, by_sid)
    slowest = max(slowest, time.time() - t)
    # The flood has passed once the server answered it: its process waits on its pipe
    # until then (the call's record in the ledger says so).
    # (Asked of the admin API, as a dashboard would, not of the file: a reader of our own
    # would hold the WAL open.)
    if n % 10 == 0:
        a = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
        a.request("GET", f"/api/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})
        if json.loads(a.getresponse().read())["session"]["tool_calls"] > 0:
            break
    time.sleep(0.1)
took = time.time() - started
print(f"| {label} | {nbytes >> 20} MiB | {rss_peak // 1024} MiB | {db_peak >> 20} + {wal_peak >> 20} MiB | {slowest * 1000:.0f} ms | {took:.1f} s |")
PY
  kill -TERM -- -"$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$state"
done
