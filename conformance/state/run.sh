#!/usr/bin/env bash
# Materializes an entity's main stream with the real @durable-streams/state
# (conformance/state/state.test.mjs) against a freshly started `attache serve`.
#
#   conformance/state/run.sh                       # uses $ATTACHE_BIN or <repo>/target/release/attache
#   ATTACHE_BIN=/path/to/attache conformance/state/run.sh
#   ATTACHE_URL=http://127.0.0.1:4437 conformance/state/run.sh   # test an already-running server (dev auth)
#
# Builds nothing. Exits with node --test's exit status.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
HEALTH_TIMEOUT_S="${HEALTH_TIMEOUT_S:-30}"

cd "$HERE"

if [ ! -e node_modules/@durable-streams/state/package.json ]; then
  echo "[state] installing npm dependencies (npm ci)" >&2
  npm ci --no-audit --no-fund >&2
fi

TAG=state
. "$HERE/../server.sh"
start_attache

set +e
node --test state.test.mjs
status=$?
set -e
finish_attache "$status"
exit "$status"
