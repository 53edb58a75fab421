// The official Tasks extension client library (@modelcontextprotocol/ext-tasks) on the
// TypeScript SDK v2 client, 2026-07-28, through Tether (which owns the tasks):
//
//   node client-ext-tasks.mjs URL settle          call `slow` as a task and settle it
//   node client-ext-tasks.mjs URL handoff FILE    call `slow` (4 s), hand the task off to
//                                                 FILE (a serialized reference), exit
//   node client-ext-tasks.mjs URL resume FILE     resume the task from FILE and settle it
//
// The library needs a host-owned raw request path for 2026-07-28 task traffic
// (`rawDispatch`, with the request's `_meta` framing): here a plain fetch that mirrors
// the method and name into `Mcp-Method` / `Mcp-Name` as the spec asks. Prints one JSON
// line; exits non-zero on any failure.
import { readFileSync, writeFileSync } from 'node:fs';
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';
import { createTaskSessionFromClient, resultFromTaskOutcome } from '@modelcontextprotocol/ext-tasks/client';

const [url, mode, file] = process.argv.slice(2);
if (!url || !mode) {
  console.error('usage: node client-ext-tasks.mjs URL settle|handoff FILE|resume FILE');
  process.exit(2);
}
const VERSION = '2026-07-28';
const clientInfo = { name: 'ext-tasks-e2e', version: '1.0.0' };
const clientCapabilities = { extensions: { 'io.modelcontextprotocol/tasks': {} } };

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

/** One JSON-RPC request over HTTP, its answer (a JSON body or the SSE stream's) in the
 * library's shape: `{kind: "result", result}` or `{kind: "error", error}`. */
async function rawDispatch(request, options) {
  const answer = await post(request, options);
  return 'error' in answer ? { kind: 'error', error: answer.error } : { kind: 'result', result: answer.result };
}

let nextId = 1;

/** The library hands over a request's method and params; the host frames it (id, version). */
async function post(bare, options) {
  const request = { ...bare, jsonrpc: '2.0', id: nextId++ };
  const params = request.params ?? {};
  const name = request.method === 'tools/call' ? params.name : params.taskId;
  const headers = {
    'content-type': 'application/json',
    accept: 'application/json, text/event-stream',
    'mcp-protocol-version': VERSION,
    'mcp-method': request.method,
    ...(name ? { 'mcp-name': name } : {}),
    ...(options?.headers ?? {}),
  };
  const r = await fetch(url, { method: 'POST', headers, body: JSON.stringify(request), signal: options?.signal });
  const text = await r.text();
  if ((r.headers.get('content-type') ?? '').includes('text/event-stream')) {
    const messages = text
      .split('\n')
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).trim())
      .filter((d) => d)
      .map((d) => JSON.parse(d));
    const answer = messages.find((m) => m.id === request.id && ('result' in m || 'error' in m));
    check(answer, `an answer to ${request.method} in the stream`);
    return answer;
  }
  return JSON.parse(text);
}

const client = new Client(clientInfo, { capabilities: {}, versionNegotiation: { mode: { pin: VERSION } } });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
check(client.getNegotiatedProtocolVersion() === VERSION, 'negotiated 2026-07-28');
const discovered = client.getServerCapabilities();
check(discovered?.extensions?.['io.modelcontextprotocol/tasks'], `the gateway advertises the extension: ${JSON.stringify(discovered)}`);

const session = createTaskSessionFromClient(client, {
  endpointId: 'tether-e2e',
  rawDispatch,
  v2RequestFraming: { protocolVersion: VERSION, clientInfo, clientCapabilities },
});

const report = { ok: false, mode };
try {
  if (mode === 'settle' || mode === 'handoff') {
    const ms = mode === 'settle' ? 1500 : 4000;
    const execution = await session.callTool('slow', { ms });
    report.kind = execution.kind;
    check(execution.kind === 'task', `the call became a task (got ${execution.kind})`);
    if (mode === 'handoff') {
      await execution.handoff((reference) => writeFileSync(file, JSON.stringify(reference)));
      report.handedOff = true;
    } else {
      const { outcome } = await execution.settle();
      report.status = outcome.status;
      report.text = resultFromTaskOutcome(outcome).content?.[0]?.text;
      check(report.text === `waited ${ms} ms`, `the task's result: ${JSON.stringify(outcome)}`);
    }
  } else if (mode === 'resume') {
    const reference = JSON.parse(readFileSync(file, 'utf8'));
    const execution = await session.resumeTask(reference);
    const { outcome } = await execution.settle();
    report.status = outcome.status;
    report.text = resultFromTaskOutcome(outcome).content?.[0]?.text;
    check(report.text === 'waited 4000 ms', `the resumed task's result: ${JSON.stringify(outcome)}`);
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  report.ok = true;
} finally {
  await session.close();
  console.log(JSON.stringify(report));
}
process.exit(report.ok ? 0 : 1);
