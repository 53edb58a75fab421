// End-to-end check with the official TypeScript SDK v2 client (@modelcontextprotocol/client)
// in the 2026-07-28 era, through Tether to a legacy stdio server (the demo):
//
//   node client-modern.mjs URL pin    versionNegotiation { pin: '2026-07-28' }
//   node client-modern.mjs URL auto   versionNegotiation 'auto' (must pick modern)
//
// Tools, a sampling and an elicitation round trip (MRTR: the client fulfils the input
// requests with its handlers and retries), progress, and cancellation by aborting a call
// (the stream closes). Prints one JSON line; exits non-zero on any failure.
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';

const [url, mode = 'pin'] = process.argv.slice(2);
if (!url) {
  console.error('usage: node client-modern.mjs URL [pin|auto]');
  process.exit(2);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const client = new Client(
  { name: 'ts-modern-e2e', version: '2.0.0' },
  {
    capabilities: { sampling: {}, elicitation: { form: {} } },
    versionNegotiation: { mode: mode === 'auto' ? 'auto' : { pin: '2026-07-28' } },
  },
);
let sampled = 0;
let elicited = 0;
client.setRequestHandler('sampling/createMessage', async () => {
  sampled += 1;
  return { role: 'assistant', content: { type: 'text', text: 'from typescript v2' }, model: 'ts-model' };
});
client.setRequestHandler('elicitation/create', async () => {
  elicited += 1;
  return { action: 'accept', content: { name: 'Ada' } };
});

const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const era = client.getProtocolEra();
const version = client.getNegotiatedProtocolVersion();
check(version === '2026-07-28', `negotiated 2026-07-28, got ${version} (era ${era})`);
check(transport.sessionId === undefined, 'no session id in the modern era');

const { tools } = await client.listTools();
check(tools.some((t) => t.name === 'echo'), 'echo listed');

const echo = await client.callTool({ name: 'echo', arguments: { text: 'hello modern' } });
check(echo.content[0].text === 'hello modern', `echo answered: ${JSON.stringify(echo)}`);

const sample = await client.callTool({ name: 'sample', arguments: { prompt: 'hi' } });
check(sample.content[0].text === 'model said: from typescript v2', `sampling round trip: ${JSON.stringify(sample)}`);

const ask = await client.callTool({ name: 'ask', arguments: {} });
check(ask.content[0].text === 'hello, Ada', `elicitation round trip: ${JSON.stringify(ask)}`);

let progress = 0;
const slow = await client.callTool({ name: 'slow', arguments: { ms: 300, steps: 3 } }, {
  onprogress: () => {
    progress += 1;
  },
});
check(slow.content[0].text === 'waited 300 ms', `slow answered: ${JSON.stringify(slow)}`);
check(progress === 3, `three progress notifications, got ${progress}`);

// Cancellation: abort a long call once its stream is open (its first progress event).
const abort = new AbortController();
let cancelled = false;
await client
  .callTool({ name: 'slow', arguments: { ms: 30000, steps: 30 } }, {
    signal: abort.signal,
    onprogress: () => abort.abort(),
  })
  .catch(() => {
    cancelled = true;
  });
check(cancelled, 'the aborted call rejected');

await client.close();
console.log(JSON.stringify({ ok: true, mode, era, version, sampled, elicited, progress, cancelled }));
