#!/usr/bin/env bash
# Runs every test attache has: formatting, lints, the Rust tests (unit,
# property, integration, crash) and the Durable Streams conformance suite
# against a freshly built server. Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if need apt-get; then
    echo "[test] installing $*" >&2
    (apt-get update -qq || true) >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
  else
    echo "[test] please install: $*" >&2
    exit 1
  fi
}

need cargo || { echo "[test] cargo (Rust toolchain, 1.90 or newer) is required: https://rustup.rs" >&2; exit 1; }
# fmt and clippy are rustup components a minimal toolchain leaves out.
if need rustup; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >&2
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy >&2
fi
# jemalloc (the server's allocator) is built from C source by its crate.
need cc || apt_install gcc libc6-dev
# The conformance scripts wait for the server's /healthz with curl.
need curl || apt_install curl
need make || apt_install make
need node || apt_install nodejs
need npm || apt_install npm
# The conformance suite's vitest needs Node >= 20.19 (Debian 12 packages 18):
# an older Node gets a newer one beside it, from the npm registry.
node_ok() { node -e 'const [a,b]=process.versions.node.split(".").map(Number);process.exit(a>20||(a===20&&b>=19)?0:1)'; }
if ! node_ok; then
  NODE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/attache-node"
  echo "[test] node $(node --version) is too old for the conformance suite; installing node 22 into $NODE_DIR" >&2
  # npm and npx come along: the distribution's own npm loads modules only its own node finds.
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --silent node@22 npm@10 >&2
  export PATH="$NODE_DIR/node_modules/.bin:$PATH"
  node_ok || { echo "[test] could not get node >= 20.19" >&2; exit 1; }
fi
# PostgreSQL and Redis binaries: the tests start throwaway instances of their own.
if [ -z "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] && ! need initdb; then apt_install postgresql; fi
need redis-server || apt_install redis-server

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The binary the tests and the conformance suites run: where cargo puts it.
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/attache"
echo "[test] cargo build --release" >&2
cargo build --release --quiet
echo "[test] cargo test" >&2
ATTACHE_BIN="$BIN" cargo test --workspace --quiet
echo "[test] conformance suite" >&2
ATTACHE_BIN="$BIN" bash conformance/run.sh
echo "[test] conformance suite on the postgres backend (throwaway cluster)" >&2
ATTACHE_BIN="$BIN" bash conformance/run-postgres.sh
echo "[test] State Protocol materializer against the server" >&2
ATTACHE_BIN="$BIN" bash conformance/state/run.sh
