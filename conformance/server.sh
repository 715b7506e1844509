# Sourced by the conformance runners: starts a fresh `attache serve` on a free
# loopback port with a temporary data dir (unless ATTACHE_URL names a running
# server), exports ATTACHE_URL, and stops and cleans up on exit.
#
#   TAG=state; . "$(dirname "$0")/../server.sh"; start_attache [extra serve args...]
#   ... run the tests ...; finish_attache $status   (keeps the server log when status != 0)
# Needs ATTACHE_BIN and TAG set; honours HEALTH_TIMEOUT_S (30) and KEEP_SERVER_LOG.

SERVER_PID=""
DATA_DIR=""
LOG_FILE=""

_stop_attache() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
  [ -n "$DATA_DIR" ] && rm -rf "$DATA_DIR"
  DATA_DIR=""
}
trap '_stop_attache' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_attache() {
  if [ -n "${ATTACHE_URL:-}" ]; then
    export ATTACHE_URL
    return 0
  fi
  if [ ! -x "$ATTACHE_BIN" ]; then
    echo "[$TAG] attache binary not found or not executable: $ATTACHE_BIN" >&2
    echo "[$TAG] build it with 'cargo build --release' or set ATTACHE_BIN" >&2
    exit 2
  fi
  local port
  port="${PORT:-$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')}"
  DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/attache-$TAG.XXXXXX")"
  LOG_FILE="$DATA_DIR.log"
  echo "[$TAG] starting $ATTACHE_BIN on 127.0.0.1:$port (data dir $DATA_DIR, log $LOG_FILE)" >&2
  "$ATTACHE_BIN" serve --listen "127.0.0.1:$port" --data-dir "$DATA_DIR" "$@" >"$LOG_FILE" 2>&1 &
  SERVER_PID=$!
  ATTACHE_URL="http://127.0.0.1:$port"
  local deadline=$((SECONDS + ${HEALTH_TIMEOUT_S:-30}))
  until curl -fsS -o /dev/null --max-time 2 "$ATTACHE_URL/healthz" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "[$TAG] attache exited before becoming healthy; log follows:" >&2
      cat "$LOG_FILE" >&2 || true
      SERVER_PID=""
      exit 2
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "[$TAG] attache not healthy after ${HEALTH_TIMEOUT_S:-30}s; log follows:" >&2
      tail -n 50 "$LOG_FILE" >&2 || true
      exit 2
    fi
    sleep 0.2
  done
  echo "[$TAG] attache is healthy at $ATTACHE_URL" >&2
  export ATTACHE_URL
}

# Stops the server; keeps its log only when the tests failed (or KEEP_SERVER_LOG is set).
finish_attache() {
  _stop_attache
  if [ -n "$LOG_FILE" ]; then
    if [ "$1" -eq 0 ] && [ -z "${KEEP_SERVER_LOG:-}" ]; then
      rm -f "$LOG_FILE"
    else
      echo "[$TAG] server log kept: $LOG_FILE" >&2
    fi
  fi
}
