#!/usr/bin/env node
// A Streamable HTTP MCP server written the way the official server-everything's HTTP mode
// is: the TypeScript SDK's McpServer and transport behind a session map, and a request
// with a session id it does not know (after a restart) answered with
//   400 {"error": {"code": -32000, "message": "Bad Request: No valid session ID provided"}}
// where the spec says 404. Clients and bridges must still recover from it.
//
//   node forgetful-server.mjs PORT     (0 picks a port; prints `listening on URL`)
//
// Tools: `echo` (text) and `counter` (calls made in this server session, so a test can
// tell a new session from an old one).

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import * as z from 'zod/v4';

const port = Number(process.argv[2] ?? 0);
const transports = new Map();

function newServer() {
  const server = new McpServer({ name: 'forgetful-server', version: '1.0.0' });
  let calls = 0;
  server.registerTool('echo', { inputSchema: { text: z.string() } }, async ({ text }) => ({
    content: [{ type: 'text', text }],
  }));
  server.registerTool('counter', {}, async () => {
    calls += 1;
    return { content: [{ type: 'text', text: String(calls) }] };
  });
  return server;
}

async function readJson(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

const httpServer = http.createServer(async (req, res) => {
  try {
    const sid = req.headers['mcp-session-id'];
    const body = req.method === 'POST' ? await readJson(req) : undefined;
    let transport = sid ? transports.get(sid) : undefined;
    if (!transport && !sid && req.method === 'POST' && isInitializeRequest(body)) {
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
      await newServer().connect(transport);
    }
    if (!transport) {
      // server-everything's answer, word for word.
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({
        jsonrpc: '2.0',
        error: { code: -32000, message: 'Bad Request: No valid session ID provided' },
        id: null,
      }));
      return;
    }
    await transport.handleRequest(req, res, body);
  } catch (e) {
    if (!res.headersSent) {
      res.writeHead(500);
      res.end(String(e));
    }
  }
});

httpServer.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${httpServer.address().port}/mcp`);
});
