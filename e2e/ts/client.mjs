// End-to-end check with the official TypeScript SDK client: node client.mjs URL
// Prints one JSON line with what it observed; exits non-zero on any failure.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client.mjs URL");
  process.exit(2);
}

function check(cond, what) {
  if (!cond) {
    throw new Error(`check failed: ${what}`);
  }
}

const client = new Client({ name: "ts-e2e", version: "1.0.0" }, { capabilities: { sampling: {} } });
let sampled = 0;
client.setRequestHandler(CreateMessageRequestSchema, async () => {
  sampled += 1;
  return { role: "assistant", content: { type: "text", text: "from typescript" }, model: "ts-model" };
});
const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const sessionId = transport.sessionId;
check(typeof sessionId === "string" && sessionId.length >= 32, "session id issued");

const { tools } = await client.listTools();
check(tools.some((t) => t.name === "echo"), "echo listed");

const echo = await client.callTool({ name: "echo", arguments: { text: "hello ts" } });
check(echo.content[0].text === "hello ts", `echo answered: ${JSON.stringify(echo)}`);

const sample = await client.callTool({ name: "sample", arguments: { prompt: "hi" } });
check(sample.content[0].text === "model said: from typescript", `sampling round trip: ${JSON.stringify(sample)}`);

let progress = 0;
const slow = await client.callTool({ name: "slow", arguments: { ms: 300, steps: 3 } }, undefined, {
  onprogress: () => {
    progress += 1;
  },
});
check(slow.content[0].text === "waited 300 ms", "slow answered");
check(progress === 3, `three progress notifications, got ${progress}`);

await transport.terminateSession();
await client.close();
console.log(JSON.stringify({ ok: true, sessionId, sampled, progress }));
