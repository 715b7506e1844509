#!/usr/bin/env bash
# One-command benchmark: attache vs its peers, same load generators, same machine, one run,
# one server at a time: Electric's Rust Durable Streams server (crate `durable-streams`,
# installed by `cargo install` into a cache directory on first use) and the Node reference
# server (@durable-streams/server, in memory and file-backed). See bench/README.md.
#
#   bench/run.sh                 # all servers (attache needs $ATTACHE_BIN or target/release/attache)
#   bench/run.sh --only-peers    # only the peers
#   bench/run.sh --quick         # short smoke run (2s wrk, 100 streams, 100 readers x 3 rounds)
#
# Env overrides: ATTACHE_BIN, BENCH_SERVERS ("attache ds-rust attache-nofsync node-mem node-file"),
#   WRK_THREADS (2), WRK_CONNS (32), WRK_DURATION (10s), CATCHUP_MESSAGES (1000),
#   CATCHUP_MSG_BYTES (60), MANY_STREAMS (1000), MANY_CONNS (64), CU_MESSAGES (250),
#   CU_MSG_BYTES (150), CU_BATCH (25), BIG_BYTES (1048576), BIG_CHUNK (65536),
#   BIG_TYPE (application/octet-stream; or application/json), BIG_CONNS (8),
#   FANOUT_READERS (1000), FANOUT_ROUNDS (20), FANOUT_SETTLE_MS (1000), SSE_READERS (1000),
#   SSE_ROUNDS (20), DS_RUST_VERSION (0.1.5), DS_RUST_BIN (<cache>/durable-streams-<v>/bin/...),
#   BENCH_CACHE_DIR (${XDG_CACHE_HOME:-$HOME/.cache}/attache-bench), BENCH_SETTLE_S (3),
#   BENCH_TARGET_DIR (<repo>/../bench-target, where the fan-out tool is built),
#   BENCH_RESULTS (bench/results-latest.md).
# Builds nothing of attache. Builds the small fan-out tool (bench/fanout) if it is missing or
# stale, and installs the Rust peer with cargo if it is missing (once, into BENCH_CACHE_DIR).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
ONLY_PEERS=0
QUICK=0
# What to print as the command that reproduces this run: the arguments and any knob set.
CMDLINE="$(for v in ATTACHE_BIN BENCH_SERVERS WRK_THREADS WRK_CONNS WRK_DURATION CATCHUP_MESSAGES CATCHUP_MSG_BYTES \
  MANY_STREAMS MANY_CONNS CU_MESSAGES CU_MSG_BYTES CU_BATCH BIG_BYTES BIG_CHUNK BIG_TYPE BIG_CONNS FANOUT_READERS \
  FANOUT_ROUNDS FANOUT_SETTLE_MS SSE_READERS SSE_ROUNDS DS_RUST_VERSION DS_RUST_BIN BENCH_SETTLE_S; do
  [ -n "${!v:-}" ] && printf '%s=%q ' "$v" "${!v}"; done; printf 'bench/run.sh'; [ $# -eq 0 ] || printf ' %q' "$@")"
for arg in "$@"; do
  case "$arg" in
    --only-peers) ONLY_PEERS=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$QUICK" = 1 ]; then
  : "${WRK_DURATION:=2s}" "${FANOUT_READERS:=100}" "${FANOUT_ROUNDS:=3}" "${FANOUT_SETTLE_MS:=300}"
  : "${MANY_STREAMS:=100}" "${SSE_READERS:=100}" "${SSE_ROUNDS:=3}" "${BENCH_SETTLE_S:=1}"
fi
WRK_THREADS="${WRK_THREADS:-2}"
WRK_CONNS="${WRK_CONNS:-32}"
WRK_DURATION="${WRK_DURATION:-10s}"
CATCHUP_MESSAGES="${CATCHUP_MESSAGES:-1000}"
CATCHUP_MSG_BYTES="${CATCHUP_MSG_BYTES:-60}"
FANOUT_READERS="${FANOUT_READERS:-1000}"
FANOUT_ROUNDS="${FANOUT_ROUNDS:-20}"
FANOUT_SETTLE_MS="${FANOUT_SETTLE_MS:-1000}"
MANY_STREAMS="${MANY_STREAMS:-1000}"
MANY_CONNS="${MANY_CONNS:-64}"
CU_MESSAGES="${CU_MESSAGES:-250}"
CU_MSG_BYTES="${CU_MSG_BYTES:-150}"
CU_BATCH="${CU_BATCH:-25}"
BIG_BYTES="${BIG_BYTES:-1048576}"
BIG_CHUNK="${BIG_CHUNK:-65536}"
BIG_TYPE="${BIG_TYPE:-application/octet-stream}"
BIG_CONNS="${BIG_CONNS:-8}"
SSE_READERS="${SSE_READERS:-1000}"
SSE_ROUNDS="${SSE_ROUNDS:-20}"
BENCH_SETTLE_S="${BENCH_SETTLE_S:-3}"
DS_RUST_VERSION="${DS_RUST_VERSION:-0.1.5}"
BENCH_CACHE_DIR="${BENCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attache-bench}"
DS_RUST_ROOT="$BENCH_CACHE_DIR/durable-streams-$DS_RUST_VERSION"
DS_RUST_BIN="${DS_RUST_BIN:-$DS_RUST_ROOT/bin/durable-streams-server}"
BENCH_TARGET_DIR="${BENCH_TARGET_DIR:-$(cd "$REPO/.." && pwd)/bench-target}"
BENCH_RESULTS="${BENCH_RESULTS:-$HERE/results-latest.md}"
SERVERS="${BENCH_SERVERS:-attache ds-rust attache-nofsync node-mem node-file}"

log() { echo "[bench] $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "missing '$1' (try: apt-get install -y ${2:-$1})"; exit 2; }; }
need wrk
need curl
need node nodejs
need npm

# ---- prerequisites ---------------------------------------------------------------------------
if [[ " $SERVERS " == *" node-"* ]] && [ ! -d "$HERE/node_modules/@durable-streams/server" ]; then
  log "installing the Node reference server (npm ci in bench/)"
  (cd "$HERE" && npm ci --no-audit --no-fund >&2)
fi
# Electric's Rust server: built once from its published crate into a cache directory
# outside the repository (cargo install --root), pinned with --locked.
if [[ " $SERVERS " == *" ds-rust "* ]] && [ ! -x "$DS_RUST_BIN" ]; then
  need cargo
  log "installing the Rust Durable Streams server $DS_RUST_VERSION into $DS_RUST_ROOT (cargo install; several minutes, once)"
  mkdir -p "$DS_RUST_ROOT"
  if ! cargo install durable-streams --version "$DS_RUST_VERSION" --locked --root "$DS_RUST_ROOT" >&2; then
    log "could not install durable-streams $DS_RUST_VERSION; set DS_RUST_BIN, or leave ds-rust out of BENCH_SERVERS"
    exit 2
  fi
  [ -x "$DS_RUST_BIN" ] || { log "cargo install left no binary at $DS_RUST_BIN"; exit 2; }
fi
FANOUT="$BENCH_TARGET_DIR/release/attache-bench-fanout"
if [ ! -x "$FANOUT" ] || [ -n "$(find "$HERE/fanout/src" "$HERE/fanout/Cargo.toml" -newer "$FANOUT" 2>/dev/null | head -1)" ]; then
  need cargo
  log "building the fan-out tool into $BENCH_TARGET_DIR"
  cargo build --release --quiet --manifest-path "$HERE/fanout/Cargo.toml" --target-dir "$BENCH_TARGET_DIR" >&2
fi

if [ "$ONLY_PEERS" = 1 ]; then
  SERVERS="$(printf '%s\n' $SERVERS | grep -v '^attache' | tr '\n' ' ')"
elif [ ! -x "$ATTACHE_BIN" ]; then
  log "SKIPPING attache: binary not found at $ATTACHE_BIN (build with 'cargo build --release' or set ATTACHE_BIN); benchmarking peers only"
  SERVERS="$(printf '%s\n' $SERVERS | grep -v '^attache' | tr '\n' ' ')"
fi
[ -n "${SERVERS// /}" ] || { log "no servers to benchmark"; exit 2; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
MAX_READERS=$(( FANOUT_READERS > SSE_READERS ? FANOUT_READERS : SSE_READERS ))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((MAX_READERS * 2 + 256)) ]; then
  log "open-file limit $(ulimit -n) is too low for $MAX_READERS readers"; exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/attache-bench.XXXXXX")"
RESULTS_JSONL="$WORK/results.jsonl"
if [[ "$SERVERS" == *attache* ]]; then
  # Run a private copy so a concurrent `cargo build` cannot swap the binary mid-run.
  cp "$ATTACHE_BIN" "$WORK/attache"
  ATTACHE_VERSION="$("$WORK/attache" --version 2>/dev/null || true)"
  ATTACHE_BIN="$WORK/attache"
fi
ATTACHE_SHA="$(sha256sum "$WORK/attache" 2>/dev/null | cut -c1-12 || true)"
: >"$RESULTS_JSONL"
SERVER_PID=""
cleanup() {
  local rc=$?
  stop_server
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
# Whole-machine CPU busy %, sampled over 2 s from /proc/stat.
cpu_busy_pct() {
  local a b
  a="$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)"
  sleep 2
  b="$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)"
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; i = y[2] - x[2];
    printf "%.0f", (t > 0 ? 100 * (t - i) / t : 0) }'
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo ""; }
# Anonymous memory (heap, stacks): RSS without the pages of the binary and its libraries
# mapped from the page cache, which count in RSS and are shared with it.
anon_kb() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo ""; }
# anon_max_while PID WATCHED: the most RssAnon of PID, sampled every 0.2 s while WATCHED runs.
anon_max_while() {
  local max=0 kb
  while kill -0 "$2" 2>/dev/null; do
    kb="$(anon_kb "$1")"; [ -n "$kb" ] && [ "$kb" -gt "$max" ] && max=$kb
    sleep 0.2
  done
  echo "$max"
}
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo ""; }
record() { # server metric value
  printf '{"server":"%s","metric":"%s","value":%s}\n' "$1" "$2" "${3:-null}" >>"$RESULTS_JSONL"
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

# start_server NAME PORT DATADIR LOG  -> sets SERVER_PID; server process itself (not a wrapper)
start_server() {
  local name="$1" port="$2" dir="$3" logf="$4"
  case "$name" in
    attache)
      "$ATTACHE_BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir" --long-poll-timeout 30s >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    attache-nofsync)
      "$ATTACHE_BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir" --long-poll-timeout 30s --no-fsync >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    ds-rust)
      # Its defaults: durable `wal` mode (group-commit fdatasync before an append is acknowledged).
      "$DS_RUST_BIN" --host 127.0.0.1 --port "$port" --data-dir "$dir" --long-poll-timeout-ms 30000 >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    node-mem)
      node "$HERE/node-ref-server.mjs" --port "$port" --long-poll-timeout-ms 30000 >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    node-file)
      node "$HERE/node-ref-server.mjs" --port "$port" --long-poll-timeout-ms 30000 --data-dir "$dir" >"$logf" 2>&1 &
      SERVER_PID=$! ;;
    *) log "unknown server '$name'"; exit 2 ;;
  esac
  local base="http://127.0.0.1:$port" deadline=$((SECONDS + 30)) code
  while :; do
    if [[ "$name" == attache* ]]; then
      code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$base/healthz" || true)"
      [ "$code" = 200 ] && break
    else
      code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$base/bench/ready-probe" || true)"
      [ "$code" != 000 ] && [ -n "$code" ] && break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then log "$name exited during startup:"; cat "$logf" >&2; exit 1; fi
    if [ "$SECONDS" -ge "$deadline" ]; then log "$name not ready after 30s"; tail -20 "$logf" >&2; exit 1; fi
    sleep 0.2
  done
}

# run_wrk OUTFILE CONNS ARGS... ; prints "rps p50_ms p99_ms errors bytes_per_req bytes_per_s"
# (bytes as wrk counts them: response heads and bodies)
run_wrk() {
  local out="$1" conns="$2"; shift 2
  wrk -t"$WRK_THREADS" -c"$conns" -d"$WRK_DURATION" --latency "$@" >"$out" 2>&1 || true
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /m$/) return v*60000; if (v ~ /s$/) return v*1000; return v }
    function bytes(v) { if (v ~ /GB$/) return v*1073741824; if (v ~ /MB$/) return v*1048576; if (v ~ /KB$/) return v*1024; return v+0 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /requests in/ { reqs = $1; d = $4; sub(/,$/, "", d); secs = ms(d) / 1000; sub(/,$/, "", $5); rd = bytes($5) }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { for (i = 3; i <= NF; i++) { v = $i; sub(/,/, "", v); if (v ~ /^[0-9]+$/) err += v } }
    /^Requests\/sec:/ { rps = $2 }
    END { printf "%s %s %s %d %s %s\n", (rps == "" ? "null" : rps), (p50 == "" ? "null" : p50), (p99 == "" ? "null" : p99), err,
            (reqs > 0 ? int(rd / reqs) : "null"), (secs > 0 ? int(rd / secs) : "null") }
  ' "$out"
}

# fanout_json NAME PREFIX FILE: records the fan-out tool's JSON result as NAME's PREFIX_* metrics
fanout_json() {
  node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    for (const k of ["p50_ms","p99_ms","max_ms","mean_ms","misses","reconnects","rss_before_kb","rss_wait_kb_max"])
      if (k in r) console.log(k, r[k] ?? "null");
    const d = r.rss_wait_kb_max != null && r.rss_before_kb != null ? r.rss_wait_kb_max - r.rss_before_kb : "null";
    console.log("rss_readers_delta_kb", d);
  ' "$3" | while read -r k v; do record "$1" "${2}_$k" "$v"; done
}

bench_one() {
  local name="$1" port dir logf base
  port="$(free_port)"
  dir="$WORK/data-$name"; mkdir -p "$dir"
  logf="$WORK/$name.log"
  base="http://127.0.0.1:$port"
  # Nothing of ours runs now: CPU busy here is other work on the machine (e.g. a cargo build).
  local busy; busy="$(cpu_busy_pct)"
  log "=== $name on $base (CPU busy from other work before start: ${busy}%) ==="
  record "$name" other_cpu_busy_pct "$busy"
  if awk -v b="$busy" 'BEGIN { exit !(b > 20) }'; then
    log "WARNING: other processes use ${busy}% CPU; results for $name may be disturbed"
  fi
  start_server "$name" "$port" "$dir" "$logf"
  sleep 1
  local idle; idle="$(rss_kb "$SERVER_PID")"
  log "$name: idle RSS ${idle} kB (pid $SERVER_PID)"
  record "$name" idle_rss_kb "$idle"
  record "$name" idle_anon_kb "$(anon_kb "$SERVER_PID")"
  local rps p50 p99 err bpr bps

  # (a) appends to one stream
  curl -sf -o /dev/null -X PUT "$base/bench/append" -H 'Content-Type: application/json'
  read -r rps p50 p99 err bpr bps < <(run_wrk "$WORK/$name-append.txt" "$WRK_CONNS" -s "$HERE/wrk/append.lua" "$base/bench/append")
  log "$name: appends ${rps}/s p50 ${p50}ms p99 ${p99}ms errors ${err}"
  record "$name" append_rps "$rps"; record "$name" append_p50_ms "$p50"; record "$name" append_p99_ms "$p99"; record "$name" append_errors "$err"

  # (a2) appends spread over MANY_STREAMS streams, a random one per request
  "$FANOUT" fill-many --url "$base" --path /bench/many --streams "$MANY_STREAMS" --count 0 >/dev/null
  read -r rps p50 p99 err bpr bps < <(BENCH_PREFIX=/bench/many BENCH_STREAMS="$MANY_STREAMS" \
    run_wrk "$WORK/$name-append-many.txt" "$MANY_CONNS" -s "$HERE/wrk/append_many.lua" "$base")
  log "$name: appends over $MANY_STREAMS streams ${rps}/s p50 ${p50}ms p99 ${p99}ms errors ${err}"
  record "$name" many_append_rps "$rps"; record "$name" many_append_p50_ms "$p50"; record "$name" many_append_p99_ms "$p99"
  record "$name" many_append_errors "$err"

  # (b) catch-up reads of a stream pre-filled with CATCHUP_MESSAGES appends
  local fill mid
  fill="$("$FANOUT" fill --url "$base" --path /bench/catchup --count "$CATCHUP_MESSAGES" --msg-bytes "$CATCHUP_MSG_BYTES")"
  mid="$(sed -n 's/^mid=\([^ ]*\) .*/\1/p' <<<"$fill")"
  local n
  n="$(curl -s "$base/bench/catchup?offset=-1" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s).length)}catch{console.log("null")}})')"
  record "$name" catchup_messages "$n"
  read -r rps p50 p99 err bpr bps < <(run_wrk "$WORK/$name-catchup.txt" "$WRK_CONNS" "$base/bench/catchup?offset=-1")
  log "$name: catch-up (-1, $n msgs) ${rps}/s p50 ${p50}ms p99 ${p99}ms ${bpr} B/resp errors ${err}"
  record "$name" catchup_rps "$rps"; record "$name" catchup_p50_ms "$p50"; record "$name" catchup_p99_ms "$p99"
  record "$name" catchup_bytes "$bpr"; record "$name" catchup_errors "$err"
  read -r rps p50 p99 err bpr bps < <(run_wrk "$WORK/$name-catchup-mid.txt" "$WRK_CONNS" "$base/bench/catchup?offset=$mid")
  log "$name: catch-up (mid) ${rps}/s p50 ${p50}ms p99 ${p99}ms ${bpr} B/resp errors ${err}"
  record "$name" catchup_mid_rps "$rps"; record "$name" catchup_mid_p50_ms "$p50"; record "$name" catchup_mid_p99_ms "$p99"
  record "$name" catchup_mid_bytes "$bpr"; record "$name" catchup_mid_errors "$err"

  # (b2) catch-up reads (offset=-1) of MANY_STREAMS streams each holding the same CU_MESSAGES
  # messages of CU_MSG_BYTES, a random stream per request; bytes/s is the figure
  fill="$("$FANOUT" fill-many --url "$base" --path /bench/cu --streams "$MANY_STREAMS" --count "$CU_MESSAGES" \
    --msg-bytes "$CU_MSG_BYTES" --batch "$CU_BATCH")"
  n="$(sed -n 's/.*messages=\([^ ]*\).*/\1/p' <<<"$fill")"
  record "$name" cu_messages "$n"
  read -r rps p50 p99 err bpr bps < <(BENCH_PREFIX=/bench/cu BENCH_STREAMS="$MANY_STREAMS" \
    run_wrk "$WORK/$name-catchup-many.txt" "$WRK_CONNS" -s "$HERE/wrk/read_many.lua" "$base")
  log "$name: catch-up of $MANY_STREAMS streams ($n msgs each) ${rps}/s ${bps} B/s p99 ${p99}ms ${bpr} B/resp errors ${err}"
  record "$name" cu_rps "$rps"; record "$name" cu_bps "$bps"; record "$name" cu_p50_ms "$p50"; record "$name" cu_p99_ms "$p99"
  record "$name" cu_bytes "$bpr"; record "$name" cu_errors "$err"

  # (b3) whole reads of one stream holding BIG_BYTES (BIG_CHUNK per append)
  fill="$("$FANOUT" fill-many --url "$base" --path /bench/big --streams 1 --count $(( (BIG_BYTES + BIG_CHUNK - 1) / BIG_CHUNK )) \
    --msg-bytes "$BIG_CHUNK" --batch 1 --content-type "$BIG_TYPE")"
  n="$(sed -n 's/.*first_get_bytes=\([^ ]*\).*/\1/p' <<<"$fill")"
  record "$name" big_first_get_bytes "$n"
  read -r rps p50 p99 err bpr bps < <(run_wrk "$WORK/$name-big.txt" "$BIG_CONNS" "$base/bench/big/0?offset=-1")
  log "$name: 1 MiB reads ($n B in one GET) ${rps}/s ${bps} B/s p99 ${p99}ms errors ${err}"
  record "$name" big_rps "$rps"; record "$name" big_bps "$bps"; record "$name" big_p50_ms "$p50"; record "$name" big_p99_ms "$p99"
  record "$name" big_bytes "$bpr"; record "$name" big_errors "$err"

  sleep "$BENCH_SETTLE_S"
  record "$name" rss_after_wrk_kb "$(rss_kb "$SERVER_PID")"
  record "$name" anon_after_wrk_kb "$(anon_kb "$SERVER_PID")"

  # (c) live fan-out, long-poll
  local fj="$WORK/$name-fanout.json"
  if "$FANOUT" fanout --url "$base" --path /bench/fanout --readers "$FANOUT_READERS" --rounds "$FANOUT_ROUNDS" \
      --settle-ms "$FANOUT_SETTLE_MS" --pid "$SERVER_PID" --json-out "$fj" >/dev/null 2>"$WORK/$name-fanout.log"; then
    grep -E 'round +(1|5|10|15|20):' "$WORK/$name-fanout.log" >&2 || true
    fanout_json "$name" fanout "$fj"
  else
    log "$name: fan-out FAILED:"; tail -5 "$WORK/$name-fanout.log" >&2
    record "$name" fanout_failed 1
  fi

  # (d) live fan-out, SSE_READERS SSE subscribers on one stream
  fj="$WORK/$name-sse.json"
  "$FANOUT" sse-fanout --url "$base" --path /bench/sse --readers "$SSE_READERS" --rounds "$SSE_ROUNDS" \
      --settle-ms "$FANOUT_SETTLE_MS" --pid "$SERVER_PID" --json-out "$fj" >/dev/null 2>"$WORK/$name-sse.log" &
  local sse_pid=$! sse_anon
  sse_anon="$(anon_max_while "$SERVER_PID" "$sse_pid")"
  if wait "$sse_pid"; then
    record "$name" sse_anon_kb_max "$sse_anon"
    grep -E 'round +(1|5|10|15|20):' "$WORK/$name-sse.log" >&2 || true
    fanout_json "$name" sse "$fj"
  else
    log "$name: SSE fan-out FAILED:"; tail -5 "$WORK/$name-sse.log" >&2
    record "$name" sse_failed 1
  fi

  # Memory once the load has stopped and every client has gone.
  sleep "$BENCH_SETTLE_S"
  record "$name" rss_after_load_kb "$(rss_kb "$SERVER_PID")"
  record "$name" anon_after_load_kb "$(anon_kb "$SERVER_PID")"
  record "$name" peak_rss_kb "$(hwm_kb "$SERVER_PID")"  # report.mjs takes max(VmHWM, sampled VmRSS)
  stop_server
  rm -rf "$dir"
}

log "servers: $SERVERS"
LOAD="wrk -t$WRK_THREADS -d$WRK_DURATION; appends: one stream -c$WRK_CONNS, $MANY_STREAMS streams -c$MANY_CONNS (~150 B JSON);\
 catch-up: one stream of $CATCHUP_MESSAGES x ${CATCHUP_MSG_BYTES} B JSON -c$WRK_CONNS, $MANY_STREAMS streams of $CU_MESSAGES x $CU_MSG_BYTES B JSON\
 (posted $CU_BATCH per request) -c$WRK_CONNS; big reads: $BIG_BYTES B of $BIG_TYPE in $BIG_CHUNK B appends -c$BIG_CONNS;\
 fan-out: $FANOUT_READERS long-poll readers x $FANOUT_ROUNDS rounds (settle ${FANOUT_SETTLE_MS} ms), $SSE_READERS SSE subscribers x $SSE_ROUNDS rounds"
log "load: $LOAD"
for s in $SERVERS; do bench_one "$s"; done

META="$WORK/meta.json"
DS_RUST_DESC=""
[[ " $SERVERS " == *" ds-rust "* ]] && DS_RUST_DESC="durable-streams $DS_RUST_VERSION ($DS_RUST_BIN, sha256 $(sha256sum "$DS_RUST_BIN" | cut -c1-12))"
node -e '
  const os = require("os");
  const [, rev, attache, dsRust, command, params, manyStreams, sseReaders, fanoutReaders, bigBytes] = process.argv;
  console.log(JSON.stringify({
    date: new Date().toISOString(), gitRev: rev, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model,
    memGiB: +(os.totalmem() / 2 ** 30).toFixed(1), kernel: os.release(), node: process.version,
    attache, dsRust, command, params, manyStreams, sseReaders, fanoutReaders, bigBytes,
  }))
' "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "${ATTACHE_VERSION:-} (binary sha256 ${ATTACHE_SHA:-?})" "$DS_RUST_DESC" "$CMDLINE" "$LOAD" \
  "$MANY_STREAMS" "$SSE_READERS" "$FANOUT_READERS" "$BIG_BYTES" >"$META"
node "$HERE/report.mjs" "$RESULTS_JSONL" "$META" "$BENCH_RESULTS"
log "wrote $BENCH_RESULTS"
