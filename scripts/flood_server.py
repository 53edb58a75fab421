"""A stdio MCP server that is not Tether: its `flood` tool writes `bytes` of 64 KiB log
notifications as fast as its pipe takes them, then answers; every other request is answered
at once (`echo` with its text). Used by tests/abuse_round2.rs and scripts/bench-flood.sh."""
import sys, json
out = sys.stdout.buffer
note = (json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                    "params": {"level": "info", "data": "x" * 65536}}) + "\n").encode()
def send(v):
    out.write((json.dumps(v) + "\n").encode()); out.flush()
for raw in sys.stdin.buffer:
    msg = json.loads(raw)
    m = msg.get("method")
    if m == "initialize":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"protocolVersion": "2025-11-25",
              "capabilities": {"tools": {}, "logging": {}}, "serverInfo": {"name": "flood", "version": "1"}}})
    elif m == "tools/call":
        args = msg["params"].get("arguments", {})
        if msg["params"]["name"] == "flood":
            for _ in range(args["bytes"] // 65536):
                out.write(note)
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": args.get("text", "done")}]}})
    elif m is not None and "id" in msg:
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
