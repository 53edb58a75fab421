"""End-to-end check with the official Python SDK 2.x client (`mcp` 2.3.0) through Tether
to a legacy stdio server (the demo), in the 2026-07-28 era:

    python client_modern.py URL 2026-07-28    pinned (fails outright if the server cannot)
    python client_modern.py URL auto          probes server/discover (must pick modern)

Tools, a sampling and an elicitation round trip (MRTR: the SDK fulfils the input requests
with its callbacks and retries), progress, and cancellation (the call's task is cancelled
once its stream is open, which closes the stream). Prints one JSON line; exits non-zero on
any failure.
"""

import json
import sys

import anyio
from mcp import Client, types


async def sampling(_context, _params):
    state["sampled"] += 1
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="from python"),
        model="py-model",
    )


async def elicitation(_context, _params):
    state["elicited"] += 1
    return types.ElicitResult(action="accept", content={"name": "Grace"})


state = {"sampled": 0, "elicited": 0, "progress": 0, "cancelled": False}


def check(cond, what):
    if not cond:
        raise SystemExit(f"check failed: {what}")


def text(result):
    return result.content[0].text


async def main(url, mode):
    async with Client(
        url,
        mode=mode,
        sampling_callback=sampling,
        elicitation_callback=elicitation,
        client_info=types.Implementation(name="py-modern-e2e", version="2.0"),
    ) as client:
        version = client.protocol_version
        check(version == "2026-07-28", f"negotiated 2026-07-28, got {version}")
        tools = await client.list_tools()
        check(any(t.name == "echo" for t in tools.tools), "echo listed")
        check(text(await client.call_tool("echo", {"text": "hello py"})) == "hello py", "echo")
        sample = await client.call_tool("sample", {"prompt": "hi"})
        check(text(sample) == "model said: from python", f"sampling round trip: {sample}")
        ask = await client.call_tool("ask", {})
        check(text(ask) == "hello, Grace", f"elicitation round trip: {ask}")

        async def on_progress(_progress, _total, _message):
            state["progress"] += 1

        slow = await client.call_tool("slow", {"ms": 300, "steps": 3}, progress_callback=on_progress)
        check(text(slow) == "waited 300 ms", f"slow: {slow}")
        check(state["progress"] == 3, f"three progress notifications, got {state['progress']}")

        # Cancellation: cancel a long call's task once its first progress arrived.
        async with anyio.create_task_group() as tg:
            started = anyio.Event()

            async def first_progress(_p, _t, _m):
                started.set()

            async def long_call():
                await client.call_tool("slow", {"ms": 30000, "steps": 30}, progress_callback=first_progress)

            tg.start_soon(long_call)
            with anyio.fail_after(10):
                await started.wait()
            tg.cancel_scope.cancel()
        state["cancelled"] = True
        # The client still works afterwards.
        check(text(await client.call_tool("echo", {"text": "after"})) == "after", "echo after cancel")
    print(json.dumps({"ok": True, "mode": mode, "version": version, **state}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python client_modern.py URL [2026-07-28|auto]")
    anyio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "2026-07-28")
