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

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

SERVER_PID=""
DATA_DIR=""
LOG_FILE=""
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  [ -n "$DATA_DIR" ] && rm -rf "$DATA_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${ATTACHE_URL:-}" ]; then
  if [ ! -x "$ATTACHE_BIN" ]; then
    echo "[conformance] attache binary not found or not executable: $ATTACHE_BIN" >&2
    echo "[conformance] build it with 'cargo build --release' or set ATTACHE_BIN" >&2
    exit 2
  fi
  PORT="${PORT:-$(free_port)}"
  DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/attache-conformance.XXXXXX")"
  LOG_FILE="$DATA_DIR.log"
  echo "[conformance] starting $ATTACHE_BIN on 127.0.0.1:$PORT (data dir $DATA_DIR, log $LOG_FILE)" >&2
  "$ATTACHE_BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" \
    --long-poll-timeout "$LONG_POLL_TIMEOUT" >"$LOG_FILE" 2>&1 &
  SERVER_PID=$!
  ATTACHE_URL="http://127.0.0.1:$PORT"

  deadline=$((SECONDS + HEALTH_TIMEOUT_S))
  until curl -fsS -o /dev/null --max-time 2 "$ATTACHE_URL/healthz" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "[conformance] attache exited before becoming healthy; log follows:" >&2
      cat "$LOG_FILE" >&2 || true
      SERVER_PID=""
      exit 2
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "[conformance] attache not healthy after ${HEALTH_TIMEOUT_S}s; log follows:" >&2
      tail -n 50 "$LOG_FILE" >&2 || true
      exit 2
    fi
    sleep 0.2
  done
  echo "[conformance] attache is healthy at $ATTACHE_URL" >&2
fi

export ATTACHE_URL
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
if [ -n "$LOG_FILE" ]; then
  if [ "$status" -eq 0 ] && [ -z "${KEEP_SERVER_LOG:-}" ]; then
    rm -f "$LOG_FILE"
  else
    echo "[conformance] server log kept: $LOG_FILE" >&2
  fi
fi
exit "$status"
