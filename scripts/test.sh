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

need cargo || { echo "[test] cargo (Rust toolchain) is required: https://rustup.rs" >&2; exit 1; }
# jemalloc (the server's allocator) is built from C source by its crate.
need cc || apt_install gcc
need make || apt_install make
need node || apt_install nodejs
need npm || apt_install npm

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] cargo build --release" >&2
cargo build --release --quiet
echo "[test] cargo test" >&2
ATTACHE_BIN="$PWD/target/release/attache" cargo test --workspace --quiet
echo "[test] conformance suite" >&2
ATTACHE_BIN="$PWD/target/release/attache" bash conformance/run.sh
echo "[test] conformance suite on the postgres backend (throwaway cluster)" >&2
ATTACHE_BIN="$PWD/target/release/attache" bash conformance/run-postgres.sh
echo "[test] State Protocol materializer against the server" >&2
ATTACHE_BIN="$PWD/target/release/attache" bash conformance/state/run.sh
