#!/usr/bin/env bash
# Soak: a long mixed load against attache's release binary, with the server's memory sampled
# every 10 s (issue 10, deliverable 6). See bench/README.md, section "Soak".
#
#   bench/soak.sh                      # 30 minutes, 1,000 live readers, 100 slow readers; verdict after a 10 min warm-up
#                                      # (redb's 4 MiB page cache fills for ~10 min of this load: bench/RESULTS.md)
#   bench/soak.sh --duration 15m --warmup 5m   # shorter (the warm-up stays 10 min unless --warmup is given)
#   bench/soak.sh --quick              # ~2 min smoke run: 200 live readers, 20 slow readers, 30 s warm-up
#
# Writes bench/soak-latest.md (RSS samples, status counts per kind of request, the verdict) and
# prints the verdict line. Exit status: 0 PASS, 1 FAIL, 2 could not run.
# Env: ATTACHE_BIN (target/release/attache), SOAK_READERS, SOAK_SLOW_READERS, SOAK_LOAD_ARGS (more
#   flags for the load generator, see `attache-bench-fanout soak --help`), ATTACHE_EXTRA_ARGS (more
#   flags for `attache serve`), BENCH_TARGET_DIR (<repo>/../bench-target), SOAK_REPORT.
# Builds nothing of attache; builds the load generator (bench/fanout) when it is missing or stale.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
DURATION=30m
WARMUP=""
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="${2:?--duration needs a value, e.g. 30m}"; shift 2 ;;
    --warmup) WARMUP="${2:?--warmup needs a value, e.g. 5m}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DURATION=2m
  : "${WARMUP:=30s}" "${SOAK_READERS:=200}" "${SOAK_SLOW_READERS:=20}"
  QUICK_ARGS=(--slow-hold 30s --note "quick run: a smoke test of the load and the report. Its RSS verdict judges the first minutes, while the embedded store's page caches (4 MiB + 8 MiB) are still filling; only a full-length run judges a plateau")
else
  QUICK_ARGS=()
fi
WARMUP="${WARMUP:-10m}"
SOAK_READERS="${SOAK_READERS:-1000}"
SOAK_SLOW_READERS="${SOAK_SLOW_READERS:-100}"
BENCH_TARGET_DIR="${BENCH_TARGET_DIR:-$(cd "$REPO/.." && pwd)/bench-target}"
SOAK_REPORT="${SOAK_REPORT:-$HERE/soak-latest.md}"

log() { echo "[soak] $*" >&2; }
command -v curl >/dev/null 2>&1 || { log "missing curl (apt-get install -y curl)"; exit 2; }
command -v python3 >/dev/null 2>&1 || { log "missing python3 (apt-get install -y python3)"; exit 2; }
[ -x "$ATTACHE_BIN" ] || { log "no attache binary at $ATTACHE_BIN: cargo build --release -p attache-cli (or set ATTACHE_BIN)"; exit 2; }

TOOL="$BENCH_TARGET_DIR/release/attache-bench-fanout"
if [ ! -x "$TOOL" ] || [ -n "$(find "$HERE/fanout/src" "$HERE/fanout/Cargo.toml" -newer "$TOOL" 2>/dev/null | head -1)" ]; then
  command -v cargo >/dev/null 2>&1 || { log "missing cargo (needed once to build bench/fanout)"; exit 2; }
  log "building the load generator into $BENCH_TARGET_DIR"
  cargo build --release --quiet --manifest-path "$HERE/fanout/Cargo.toml" --target-dir "$BENCH_TARGET_DIR" >&2
fi

# Every reader holds a socket on both sides: raise the open-file limit (inherited by the server).
NEED_FDS=$(( (SOAK_READERS + SOAK_SLOW_READERS) * 2 + 1024 ))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NEED_FDS" ]; then
  log "open-file limit $(ulimit -n) is below the $NEED_FDS this load needs"; exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/attache-soak.XXXXXX")"
# The data dir grows by a few hundred MiB in 30 minutes (uploads are deleted as they go). A disk
# that fills up during the run turns appends into 503s: that would be the disk, not the soak.
free_mib() { df -Pm "$WORK" | awk 'NR == 2 {print $4}'; }
FREE_BEFORE="$(free_mib)"
if [ "$FREE_BEFORE" -lt 2048 ]; then
  log "WARNING: only $FREE_BEFORE MiB free where the data dir lives ($WORK); a full disk fails the run"
fi
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  [ -n "$SERVER_PID" ] && wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
cleanup() {
  local rc=$?
  stop_server
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A private copy, so a concurrent `cargo build` cannot swap the binary mid-run.
cp "$ATTACHE_BIN" "$WORK/attache"
VERSION="$("$WORK/attache" --version 2>/dev/null || echo unknown)"
REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

# The load keeps its connections under the server's cap. If this binary has a connection cap
# whose default is below what the load opens (readers + slow readers + writers and workers,
# plus room for reconnects), raise it, so no 503 is expected.
SERVER_ARGS=(serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data")
NEED_CONNS=$(( SOAK_READERS + SOAK_SLOW_READERS + 512 ))
SERVE_HELP="$("$WORK/attache" serve --help 2>/dev/null | tr -s ' \n' ' ' || true)"
if [[ "$SERVE_HELP" == *--max-connections* ]]; then
  # The first match is the flag's own entry (other flags' help may name it too).
  CAP="$(grep -o -- '--max-connections[^[]*\[default: [0-9]*' <<<"$SERVE_HELP" | head -1 | grep -o '[0-9]*$' || true)"
  if [ -z "$CAP" ]; then  # default not found in the help: set one that is surely enough
    SERVER_ARGS+=(--max-connections "$(( NEED_CONNS > 4096 ? NEED_CONNS : 4096 ))")
  elif [ "$CAP" -lt "$NEED_CONNS" ]; then
    SERVER_ARGS+=(--max-connections "$NEED_CONNS")
  fi
fi
# shellcheck disable=SC2206 # word splitting is the point
SERVER_ARGS+=(${ATTACHE_EXTRA_ARGS:-})
mkdir -p "$WORK/data"
"$WORK/attache" "${SERVER_ARGS[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
deadline=$((SECONDS + 30))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE/healthz" || true)" = 200 ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then log "attache exited during startup:"; cat "$WORK/server.log" >&2; exit 2; fi
  [ "$SECONDS" -lt "$deadline" ] || { log "attache not ready after 30 s"; tail -20 "$WORK/server.log" >&2; exit 2; }
  sleep 0.2
done
log "attache $VERSION (rev $REV) pid $SERVER_PID on $BASE: ${SERVER_ARGS[*]:1}"
log "load: $DURATION, warm-up $WARMUP, $SOAK_READERS live readers, $SOAK_SLOW_READERS slow readers"

set +e
# shellcheck disable=SC2086 # SOAK_LOAD_ARGS is a list of flags
"$TOOL" soak --url "$BASE" --pid "$SERVER_PID" --duration "$DURATION" --warmup "$WARMUP" \
  --readers "$SOAK_READERS" --slow-readers "$SOAK_SLOW_READERS" "${QUICK_ARGS[@]}" ${SOAK_LOAD_ARGS:-} \
  --report "$SOAK_REPORT" --server-log "$WORK/server.log" \
  --note "server: \`$VERSION\` (checkout at git rev $REV), \`attache ${SERVER_ARGS[*]}\` (fresh data dir, dev auth)" \
  --note "free disk where the data dir lives, before the run: $FREE_BEFORE MiB" \
  --note "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), load average before the run $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r)" \
  --note "command: \`bench/soak.sh --duration $DURATION --warmup $WARMUP$([ "$QUICK" = 1 ] && echo ' (--quick)')\`" \
  | tee "$WORK/verdict.txt"
RC=${PIPESTATUS[0]}
set -e

# How the server stops, and how much it wrote.
DATA_MB="$(du -sm "$WORK/data" 2>/dev/null | cut -f1)"
FREE_AFTER="$(free_mib)"
T0=$SECONDS
ALIVE=0
kill -0 "$SERVER_PID" 2>/dev/null && ALIVE=1
stop_server
if [ -f "$SOAK_REPORT" ]; then
  {
    echo
    echo "## After the run"
    echo
    echo "- data dir: ${DATA_MB:-?} MiB; free disk there: $FREE_BEFORE MiB before, ${FREE_AFTER:-?} MiB at the end"
    if [ "$ALIVE" = 1 ]; then echo "- SIGTERM to exit: $((SECONDS - T0)) s"; fi
  } >>"$SOAK_REPORT"
fi
if [ "$RC" != 0 ]; then
  KEEP="${TMPDIR:-/tmp}/attache-soak-server-$(date +%Y%m%d-%H%M%S).log"
  cp "$WORK/server.log" "$KEEP" 2>/dev/null && log "server log kept at $KEEP"
fi
log "wrote $SOAK_REPORT"
exit "$RC"
