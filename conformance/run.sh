#!/usr/bin/env bash
# Run the Durable Streams server conformance suite (@durable-streams/server-conformance-tests)
# against a freshly started `attache serve`.
#
#   conformance/run.sh                      # uses $ATTACHE_BIN or <repo>/target/release/attache
#   ATTACHE_BIN=/path/to/attache conformance/run.sh
#   ATTACHE_URL=http://127.0.0.1:4437 conformance/run.sh   # test an already-running server instead
#   conformance/run.sh -t "JSON Mode"       # extra args are passed to `vitest run` (e.g. name filter)
#
# Builds nothing. Exits with vitest's exit status.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
LONG_POLL_TIMEOUT="${LONG_POLL_TIMEOUT:-2s}"
HEALTH_TIMEOUT_S="${HEALTH_TIMEOUT_S:-30}"

cd "$HERE"

if [ ! -d node_modules ] || [ ! -e node_modules/.bin/vitest ]; then
  echo "[conformance] installing npm dependencies (npm ci)" >&2
  npm ci --no-audit --no-fund >&2
fi

TAG=conformance
. "$HERE/server.sh"
# The suite sends one CORS preflight from https://example.com; dev mode refuses
# every foreign origin unless it is listed (docs/SECURITY.md).
start_attache --long-poll-timeout "$LONG_POLL_TIMEOUT" --cors-origin https://example.com

# Plain output when not on a terminal (CI logs).
if [ ! -t 1 ] && [ -z "${FORCE_COLOR:-}" ]; then export NO_COLOR=1; fi
RESULTS_JSON="$(mktemp "${TMPDIR:-/tmp}/attache-conformance-results.XXXXXX.json")"
set +e
npx --no-install vitest run --config vitest.config.mjs \
  --reporter=default --reporter=json --outputFile.json="$RESULTS_JSON" "$@"
status=$?
set -e
# One plain closing line ("conformance: N passed, N failed, N skipped") from the JSON report.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = (r.numPendingTests || 0) + (r.numTodoTests || 0);
  console.log(`conformance: ${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped`);
' "$RESULTS_JSON" 2>/dev/null || true
rm -f "$RESULTS_JSON"
finish_attache "$status"
exit "$status"
