#!/usr/bin/env node
// The MCP server the official conformance suite (@modelcontextprotocol/conformance) is run
// against: every tool, resource, prompt and utility its `server` scenarios call, written
// with the TypeScript SDK's low-level `Server` so each answer's shape is explicit.
//
//   node conformance-fixture.mjs --stdio          serve one session over stdin/stdout
//                                                 (what Tether fronts)
//   node conformance-fixture.mjs --http PORT      serve Streamable HTTP on 127.0.0.1:PORT,
//                                                 stateful, with DNS-rebinding protection
//                                                 (the reference run, no gateway)
//
// With --http and PORT 0 the chosen port is printed as `listening on URL`.
//
// With --tasks it also lists the fixture tools of the suite's `tasks-*` scenarios (the
// Tasks extension, SEP-2663): greet, slow_compute, failing_job, protocol_error_job,
// confirm_delete, multi_input, test_tool_with_task. This server owns no tasks: it is a
// legacy server that declares `execution.taskSupport` and answers every call as a plain
// call; the gateway in front of it is what makes those calls tasks.

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import {
  CallToolRequestSchema,
  CompleteRequestSchema,
  CreateMessageResultSchema,
  ElicitResultSchema,
  GetPromptRequestSchema,
  ListPromptsRequestSchema,
  ListResourcesRequestSchema,
  ListResourceTemplatesRequestSchema,
  ListRootsResultSchema,
  ListToolsRequestSchema,
  McpError,
  ErrorCode,
  ReadResourceRequestSchema,
  SetLevelRequestSchema,
  SubscribeRequestSchema,
  UnsubscribeRequestSchema,
} from '@modelcontextprotocol/sdk/types.js';

// A 1x1 PNG and a minimal WAV file.
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==';
const WAV = 'UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=';

const text = (t) => ({ content: [{ type: 'text', text: t }] });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const noArgs = { type: 'object', properties: {} };

const TASKS_MODE = process.argv.includes('--tasks');

/** The tasks scenarios' fixture tools (see the header). */
const TASK_TOOLS = [
  {
    name: 'greet',
    description: 'Greets by name (sync only)',
    inputSchema: { type: 'object', properties: { name: { type: 'string' } } },
  },
  {
    name: 'slow_compute',
    description: 'Sleeps `seconds`, then answers',
    inputSchema: { type: 'object', properties: { seconds: { type: 'number' }, label: { type: 'string' } } },
    execution: { taskSupport: 'optional' },
  },
  { name: 'failing_job', description: 'A tool error after about 1 s', inputSchema: noArgs, execution: { taskSupport: 'required' } },
  { name: 'protocol_error_job', description: 'A JSON-RPC error', inputSchema: noArgs, execution: { taskSupport: 'optional' } },
  {
    name: 'confirm_delete',
    description: 'Asks for confirmation (elicitation), then answers',
    inputSchema: { type: 'object', properties: { filename: { type: 'string' } } },
    execution: { taskSupport: 'optional' },
  },
  { name: 'multi_input', description: 'Asks two things at once (elicitation)', inputSchema: noArgs, execution: { taskSupport: 'optional' } },
  {
    name: 'test_tool_with_task',
    description: 'Asks for user_name, then works for 1 s',
    inputSchema: noArgs,
    execution: { taskSupport: 'required' },
  },
];

const TOOLS = [
  { name: 'test_simple_text', description: 'Returns one text block', inputSchema: noArgs },
  { name: 'test_image_content', description: 'Returns one image block', inputSchema: noArgs },
  { name: 'test_audio_content', description: 'Returns one audio block', inputSchema: noArgs },
  { name: 'test_embedded_resource', description: 'Returns an embedded resource', inputSchema: noArgs },
  { name: 'test_multiple_content_types', description: 'Returns text, image and resource', inputSchema: noArgs },
  { name: 'test_tool_with_logging', description: 'Logs three messages while running', inputSchema: noArgs },
  { name: 'test_tool_with_progress', description: 'Reports progress 0, 50, 100', inputSchema: noArgs },
  { name: 'test_error_handling', description: 'Always fails with isError', inputSchema: noArgs },
  { name: 'test_reconnection', description: 'Answers after the client had to reconnect (SEP-1699)', inputSchema: noArgs },
  {
    name: 'test_sampling',
    description: 'Asks the client for an LLM completion',
    inputSchema: { type: 'object', properties: { prompt: { type: 'string' } }, required: ['prompt'] },
  },
  {
    name: 'test_elicitation',
    description: 'Asks the user for input',
    inputSchema: { type: 'object', properties: { message: { type: 'string' } }, required: ['message'] },
  },
  { name: 'test_elicitation_sep1034_defaults', description: 'Elicitation with defaults (SEP-1034)', inputSchema: noArgs },
  { name: 'test_elicitation_sep1330_enums', description: 'Elicitation with enum variants (SEP-1330)', inputSchema: noArgs },
  ...[
    'test_missing_capability',
    'test_streaming_elicitation',
    'test_logging_tool',
    'test_trigger_tool_change',
    'test_trigger_prompt_change',
    'test_input_required_result_elicitation',
    'test_input_required_result_sampling',
    'test_input_required_result_list_roots',
    'test_input_required_result_request_state',
    'test_input_required_result_tampered_state',
    'test_input_required_result_multiple_inputs',
    'test_input_required_result_multi_round',
    'test_input_required_result_capabilities',
  ].map((name) => ({ name, description: '2026-07-28 scenario tool (asks the client the legacy way)', inputSchema: noArgs })),
  {
    name: 'json_schema_2020_12_tool',
    description: 'Input schema using JSON Schema 2020-12 keywords (SEP-1613)',
    inputSchema: {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      $defs: {
        address: { $anchor: 'address', type: 'object', properties: { street: { type: 'string' }, city: { type: 'string' } } },
      },
      properties: { name: { type: 'string' }, address: { $ref: '#/$defs/address' } },
      allOf: [{ anyOf: [{ required: ['name'] }, { required: ['address'] }] }],
      if: { properties: { name: { const: 'x' } } },
      then: { required: ['address'] },
      else: {},
      additionalProperties: false,
    },
  },
];

const RESOURCES = [
  { uri: 'test://static-text', name: 'static-text', title: 'Static Text Resource', mimeType: 'text/plain' },
  { uri: 'test://static-binary', name: 'static-binary', title: 'Static Binary Resource', mimeType: 'image/png' },
  { uri: 'test://watched-resource', name: 'watched-resource', title: 'Watched Resource', mimeType: 'text/plain' },
];

const PROMPTS = [
  { name: 'test_simple_prompt', description: 'No arguments' },
  {
    name: 'test_prompt_with_arguments',
    description: 'Two required arguments',
    arguments: [
      { name: 'arg1', description: 'First argument', required: true },
      { name: 'arg2', description: 'Second argument', required: true },
    ],
  },
  {
    name: 'test_prompt_with_embedded_resource',
    description: 'Embeds the resource named by resourceUri',
    arguments: [{ name: 'resourceUri', description: 'URI to embed', required: true }],
  },
  { name: 'test_prompt_with_image', description: 'Includes an image' },
  { name: 'test_input_required_result_prompt', description: 'Asks the client for context first (elicitation)' },
];

const NAME_FORM = { type: 'object', properties: { name: { type: 'string' } }, required: ['name'] };

const FORM_DEFAULTS = {
  type: 'object',
  properties: {
    name: { type: 'string', description: 'User name', default: 'John Doe' },
    age: { type: 'integer', description: 'User age', default: 30 },
    score: { type: 'number', description: 'User score', default: 95.5 },
    status: { type: 'string', description: 'User status', enum: ['active', 'inactive', 'pending'], default: 'active' },
    verified: { type: 'boolean', description: 'Verification status', default: true },
  },
  required: [],
};

const FORM_ENUMS = {
  type: 'object',
  properties: {
    untitledSingle: { type: 'string', enum: ['option1', 'option2', 'option3'] },
    titledSingle: {
      type: 'string',
      oneOf: [
        { const: 'value1', title: 'First Option' },
        { const: 'value2', title: 'Second Option' },
        { const: 'value3', title: 'Third Option' },
      ],
    },
    legacyEnum: { type: 'string', enum: ['opt1', 'opt2', 'opt3'], enumNames: ['Option One', 'Option Two', 'Option Three'] },
    untitledMulti: { type: 'array', minItems: 1, maxItems: 3, items: { type: 'string', enum: ['option1', 'option2', 'option3'] } },
    titledMulti: {
      type: 'array',
      minItems: 1,
      maxItems: 3,
      items: {
        anyOf: [
          { const: 'value1', title: 'First Choice' },
          { const: 'value2', title: 'Second Choice' },
          { const: 'value3', title: 'Third Choice' },
        ],
      },
    },
  },
  required: [],
};

/**
 * One server per session: subscriptions are session state. `closeStream(extra)` ends the
 * SSE stream of the request in progress where the transport has one (HTTP); behind stdio
 * the stream belongs to the gateway, so `test_reconnection` just answers late.
 */
function createServer(closeStream = () => {}) {
  const server = new Server(
    { name: 'tether-conformance-fixture', version: '1.0.0' },
    {
      capabilities: {
        tools: { listChanged: true },
        resources: { subscribe: true, listChanged: true },
        prompts: { listChanged: true },
        logging: {},
        completions: {},
      },
    },
  );
  const subscriptions = new Set();
  const log = (extra, data) =>
    extra.sendNotification({ method: 'notifications/message', params: { level: 'info', logger: 'fixture', data } });

  const elicit = async (extra, message, requestedSchema) => {
    const r = await extra.sendRequest(
      { method: 'elicitation/create', params: { mode: 'form', message, requestedSchema } },
      ElicitResultSchema,
    );
    return `action=${r.action}, content=${JSON.stringify(r.content ?? {})}`;
  };

  const sample = (extra, prompt) =>
    extra.sendRequest(
      { method: 'sampling/createMessage', params: { messages: [{ role: 'user', content: { type: 'text', text: prompt } }], maxTokens: 100 } },
      CreateMessageResultSchema,
    );

  const tools = {
    test_simple_text: async () => text('This is a simple text response for testing.'),
    test_image_content: async () => ({ content: [{ type: 'image', data: PNG, mimeType: 'image/png' }] }),
    test_audio_content: async () => ({ content: [{ type: 'audio', data: WAV, mimeType: 'audio/wav' }] }),
    test_embedded_resource: async () => ({
      content: [
        {
          type: 'resource',
          resource: { uri: 'test://embedded-resource', mimeType: 'text/plain', text: 'This is an embedded resource content.' },
        },
      ],
    }),
    test_multiple_content_types: async () => ({
      content: [
        { type: 'text', text: 'Multiple content types test:' },
        { type: 'image', data: PNG, mimeType: 'image/png' },
        {
          type: 'resource',
          resource: { uri: 'test://mixed-content-resource', mimeType: 'application/json', text: '{"test":"data","value":123}' },
        },
      ],
    }),
    test_tool_with_logging: async (_args, extra) => {
      for (const step of ['Tool execution started', 'Tool processing data', 'Tool execution completed']) {
        await log(extra, step);
        await sleep(20);
      }
      return text('Tool with logging executed successfully');
    },
    test_tool_with_progress: async (_args, extra) => {
      const progressToken = extra._meta?.progressToken ?? 0;
      for (const progress of [0, 50, 100]) {
        await extra.sendNotification({
          method: 'notifications/progress',
          params: { progressToken, progress, total: 100, message: `Completed step ${progress} of 100` },
        });
        await sleep(20);
      }
      return text(String(progressToken));
    },
    test_error_handling: async () => ({
      isError: true,
      content: [{ type: 'text', text: 'This tool intentionally returns an error for testing' }],
    }),
    test_reconnection: async (_args, extra) => {
      closeStream(extra);
      await sleep(100);
      return text('Reconnection test completed successfully.');
    },
    test_sampling: async (args, extra) => {
      const r = await extra.sendRequest(
        {
          method: 'sampling/createMessage',
          params: { messages: [{ role: 'user', content: { type: 'text', text: String(args.prompt ?? '') } }], maxTokens: 100 },
        },
        CreateMessageResultSchema,
      );
      return text(`LLM response: ${r.content?.text ?? 'No response'}`);
    },
    test_elicitation: async (args, extra) =>
      text(
        `User response: ${await elicit(extra, String(args.message ?? ''), {
          type: 'object',
          properties: { response: { type: 'string', description: "User's response" } },
          required: ['response'],
        })}`,
      ),
    test_elicitation_sep1034_defaults: async (_args, extra) =>
      text(`Elicitation completed: ${await elicit(extra, 'Please review the form fields with defaults', FORM_DEFAULTS)}`),
    test_elicitation_sep1330_enums: async (_args, extra) =>
      text(`Elicitation completed: ${await elicit(extra, 'Please select options from the enum fields', FORM_ENUMS)}`),
    json_schema_2020_12_tool: async (args) => text(`JSON Schema 2020-12 tool called with: ${JSON.stringify(args)}`),

    // The 2026-07-28 scenarios' tools, written as a legacy server writes them: they ask the
    // client with server-initiated requests, which the gateway turns into MRTR input
    // requests for a modern client (the bridge).
    test_missing_capability: async (_args, extra) => text(`LLM said: ${(await sample(extra, 'needs sampling')).content?.text}`),
    test_streaming_elicitation: async (_args, extra) => {
      await log(extra, 'about to ask');
      return text(`User response: ${await elicit(extra, 'Streaming elicitation', NAME_FORM)}`);
    },
    test_logging_tool: async (_args, extra) => {
      for (const step of ['one', 'two', 'three']) await log(extra, step);
      return text('logged three messages');
    },
    test_trigger_tool_change: async (_args, extra) => {
      await extra.sendNotification({ method: 'notifications/tools/list_changed' });
      return text('tools changed');
    },
    test_trigger_prompt_change: async (_args, extra) => {
      await extra.sendNotification({ method: 'notifications/prompts/list_changed' });
      return text('prompts changed');
    },
    test_input_required_result_elicitation: async (_args, extra) =>
      text(`Hello, ${await elicit(extra, 'What is your name?', NAME_FORM)}`),
    test_input_required_result_sampling: async (_args, extra) =>
      text(`LLM said: ${(await sample(extra, 'What is the capital of France?')).content?.text}`),
    test_input_required_result_list_roots: async (_args, extra) => {
      const r = await extra.sendRequest({ method: 'roots/list', params: {} }, ListRootsResultSchema);
      return text(`roots: ${r.roots.map((x) => x.uri).join(', ')}`);
    },
    test_input_required_result_request_state: async (_args, extra) =>
      text(`confirmed: ${await elicit(extra, 'Confirm?', { type: 'object', properties: { ok: { type: 'boolean' } } })}`),
    test_input_required_result_tampered_state: async (_args, extra) =>
      text(`confirmed: ${await elicit(extra, 'Confirm?', { type: 'object', properties: { ok: { type: 'boolean' } } })}`),
    test_input_required_result_multiple_inputs: async (_args, extra) => {
      const [name, answer, roots] = await Promise.all([
        elicit(extra, 'What is your name?', NAME_FORM),
        sample(extra, 'Say hello'),
        extra.sendRequest({ method: 'roots/list', params: {} }, ListRootsResultSchema),
      ]);
      return text(`name ${name}; model ${answer.content?.text}; ${roots.roots.length} roots`);
    },
    test_input_required_result_multi_round: async (_args, extra) => {
      const name = await elicit(extra, 'What is your name?', NAME_FORM);
      const color = await elicit(extra, 'Favourite color?', { type: 'object', properties: { color: { type: 'string' } } });
      return text(`${name} likes ${color}`);
    },
    test_input_required_result_capabilities: async (_args, extra) => {
      const caps = server.getClientCapabilities() ?? {};
      const asks = [];
      if (caps.sampling) asks.push(sample(extra, 'sampling only if declared'));
      if (caps.elicitation) asks.push(elicit(extra, 'elicitation only if declared', NAME_FORM));
      await Promise.all(asks);
      return text(`asked ${asks.length}`);
    },
  };

  if (TASKS_MODE) {
    const confirm = { type: 'object', properties: { confirm: { type: 'boolean' } }, required: ['confirm'] };
    Object.assign(tools, {
      greet: async (args) => text(`Hello, ${args.name ?? 'World'}!`),
      slow_compute: async (args, extra) => {
        const seconds = Number(args.seconds ?? 0);
        await Promise.race([sleep(seconds * 1000), new Promise((r) => extra.signal.addEventListener('abort', r))]);
        return text(`computed ${args.label ?? ''} in ${seconds} s`);
      },
      failing_job: async () => {
        await sleep(1000);
        return { isError: true, content: [{ type: 'text', text: 'the job failed' }] };
      },
      protocol_error_job: async () => {
        await sleep(200);
        throw new McpError(ErrorCode.InternalError, 'the job broke');
      },
      confirm_delete: async (args, extra) =>
        text(`delete ${args.filename ?? ''}: ${await elicit(extra, `Delete ${args.filename ?? ''}?`, confirm)}`),
      multi_input: async (_args, extra) => {
        const [a, b] = await Promise.all([
          elicit(extra, 'First answer?', confirm),
          elicit(extra, 'Second answer?', confirm),
        ]);
        return text(`first: ${a}; second: ${b}`);
      },
      test_tool_with_task: async (_args, extra) => {
        const name = await elicit(extra, 'Your name?', NAME_FORM);
        await sleep(1000);
        return text(`Hello ${name}`);
      },
    });
  }
  const listed = TASKS_MODE ? [...TOOLS, ...TASK_TOOLS] : TOOLS;
  server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: listed }));
  server.setRequestHandler(CallToolRequestSchema, async (req, extra) => {
    const tool = tools[req.params.name];
    if (!tool) throw new McpError(ErrorCode.InvalidParams, `Unknown tool: ${req.params.name}`);
    return tool(req.params.arguments ?? {}, extra);
  });

  server.setRequestHandler(ListResourcesRequestSchema, async () => ({ resources: RESOURCES }));
  server.setRequestHandler(ListResourceTemplatesRequestSchema, async () => ({
    resourceTemplates: [
      { uriTemplate: 'test://template/{id}/data', name: 'template', title: 'Resource Template', mimeType: 'application/json' },
    ],
  }));
  server.setRequestHandler(ReadResourceRequestSchema, async (req) => {
    const uri = req.params.uri;
    if (uri === 'test://static-text')
      return { contents: [{ uri, mimeType: 'text/plain', text: 'This is the content of the static text resource.' }] };
    if (uri === 'test://static-binary') return { contents: [{ uri, mimeType: 'image/png', blob: PNG }] };
    if (uri === 'test://watched-resource') return { contents: [{ uri, mimeType: 'text/plain', text: 'Watched resource content' }] };
    const m = /^test:\/\/template\/([^/]+)\/data$/.exec(uri);
    if (m)
      return {
        contents: [{ uri, mimeType: 'application/json', text: JSON.stringify({ id: m[1], templateTest: true, data: `Data for ID: ${m[1]}` }) }],
      };
    throw new McpError(-32002, `Resource not found: ${uri}`, { uri });
  });
  server.setRequestHandler(SubscribeRequestSchema, async (req) => {
    subscriptions.add(req.params.uri);
    return {};
  });
  server.setRequestHandler(UnsubscribeRequestSchema, async (req) => {
    subscriptions.delete(req.params.uri);
    return {};
  });

  server.setRequestHandler(ListPromptsRequestSchema, async () => ({ prompts: PROMPTS }));
  server.setRequestHandler(GetPromptRequestSchema, async (req, extra) => {
    const a = req.params.arguments ?? {};
    const user = (content) => ({ role: 'user', content });
    switch (req.params.name) {
      case 'test_simple_prompt':
        return { messages: [user({ type: 'text', text: 'This is a simple prompt for testing.' })] };
      case 'test_prompt_with_arguments':
        return { messages: [user({ type: 'text', text: `Prompt with arguments: arg1='${a.arg1}', arg2='${a.arg2}'` })] };
      case 'test_prompt_with_embedded_resource':
        return {
          messages: [
            user({ type: 'resource', resource: { uri: a.resourceUri, mimeType: 'text/plain', text: 'Embedded resource content for testing.' } }),
            user({ type: 'text', text: 'Please process the embedded resource above.' }),
          ],
        };
      case 'test_prompt_with_image':
        return {
          messages: [user({ type: 'image', data: PNG, mimeType: 'image/png' }), user({ type: 'text', text: 'Please analyze the image above.' })],
        };
      case 'test_input_required_result_prompt': {
        const context = await elicit(extra, 'What context should the prompt use?', {
          type: 'object',
          properties: { context: { type: 'string' } },
          required: ['context'],
        });
        return { messages: [user({ type: 'text', text: `Prompt with context: ${context}` })] };
      }
      default:
        throw new McpError(ErrorCode.InvalidParams, `Unknown prompt: ${req.params.name}`);
    }
  });

  server.setRequestHandler(SetLevelRequestSchema, async () => ({}));
  server.setRequestHandler(CompleteRequestSchema, async () => ({ completion: { values: [], total: 0, hasMore: false } }));
  return server;
}

async function serveHttp(port) {
  const transports = new Map();
  const srv = http.createServer(async (req, res) => {
    if (!req.url.startsWith('/mcp')) {
      res.writeHead(404).end();
      return;
    }
    const sid = req.headers['mcp-session-id'];
    let transport = sid ? transports.get(sid) : undefined;
    if (!transport && !sid && req.method === 'POST') {
      const { port: p } = srv.address();
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        enableDnsRebindingProtection: true,
        allowedHosts: [`127.0.0.1:${p}`, `localhost:${p}`],
        allowedOrigins: [`http://127.0.0.1:${p}`, `http://localhost:${p}`],
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
      await createServer((extra) => transport.closeSSEStream(extra.requestId)).connect(transport);
    }
    if (!transport) {
      res.writeHead(sid ? 404 : 400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32000, message: sid ? 'Session not found' : 'Missing session' } }));
      return;
    }
    await transport.handleRequest(req, res);
  });
  srv.listen(port, '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${srv.address().port}/mcp`);
  });
  const stop = () => srv.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

const [mode, port] = process.argv.slice(2);
if (mode === '--stdio') {
  await createServer().connect(new StdioServerTransport());
} else if (mode === '--http') {
  await serveHttp(Number(port ?? 0));
} else {
  console.error('usage: conformance-fixture.mjs --stdio | --http PORT [--tasks]');
  process.exit(2);
}
