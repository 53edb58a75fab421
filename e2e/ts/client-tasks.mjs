// The official TypeScript SDK client (1.x) running a tool as a 2025-11-25 task through the
// gateway, which owns the task (the demo upstream has none): node client-tasks.mjs URL
// Prints one JSON line with what it observed; exits non-zero on any failure.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client-tasks.mjs URL");
  process.exit(2);
}

function check(cond, what) {
  if (!cond) {
    throw new Error(`check failed: ${what}`);
  }
}

const client = new Client(
  { name: "ts-tasks", version: "1.0.0" },
  { capabilities: { tasks: { list: {}, cancel: {} } } },
);
const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const caps = client.getServerCapabilities();
check(caps?.tasks?.requests?.tools?.call, "the gateway offers tasks for tools/call");

// Listing teaches the client which tools may run as tasks.
const { tools } = await client.listTools();
const slow = tools.find((t) => t.name === "slow");
check(slow?.execution?.taskSupport === "optional", "slow may run as a task");

const kinds = [];
let taskId;
let text;
for await (const message of client.experimental.tasks.callToolStream(
  { name: "slow", arguments: { ms: 1200 } },
  undefined,
  { task: { ttl: 60000 } },
)) {
  kinds.push(message.type);
  if (message.type === "taskCreated") {
    taskId = message.task.taskId;
  } else if (message.type === "result") {
    text = message.result.content?.[0]?.text;
  } else if (message.type === "error") {
    throw message.error;
  }
}
check(typeof taskId === "string" && taskId.startsWith("t_"), `a task was created (${kinds})`);
check(text === "waited 1200 ms", `the task's result arrived (${text})`);

const got = await client.experimental.tasks.getTask(taskId);
check(got.status === "completed", `the task is completed (${got.status})`);
const listed = await client.experimental.tasks.listTasks();
check(listed.tasks.some((t) => t.taskId === taskId), "the task is listed");

await transport.terminateSession();
await client.close();
console.log(JSON.stringify({ ok: true, taskId, kinds }));
