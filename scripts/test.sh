#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real processes,
# real SQLite, the official Rust and TypeScript MCP clients).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d e2e/ts/node_modules/@modelcontextprotocol/sdk ]; then
  (cd e2e/ts && npm ci --no-audit --no-fund --loglevel=error)
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
