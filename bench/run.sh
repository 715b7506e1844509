#!/usr/bin/env bash
# One-command benchmark: attache vs the Durable Streams Node reference server
# (@durable-streams/server, in-memory and file-backed), same load generator, same machine,
# one server at a time. See bench/README.md.
#
#   bench/run.sh                 # all servers (attache needs $ATTACHE_BIN or target/release/attache)
#   bench/run.sh --only-peers    # only the Node reference servers
#   bench/run.sh --quick         # short smoke run (2s wrk, 100 readers x 3 rounds)
#
# Env overrides: ATTACHE_BIN, BENCH_SERVERS ("attache attache-nofsync node-mem node-file"),
#   WRK_THREADS (2), WRK_CONNS (32), WRK_DURATION (10s), CATCHUP_MESSAGES (1000),
#   CATCHUP_MSG_BYTES (60), FANOUT_READERS (1000), FANOUT_ROUNDS (20), FANOUT_SETTLE_MS (1000),
#   BENCH_TARGET_DIR (<repo>/../bench-target, where the fan-out tool is built),
#   BENCH_RESULTS (bench/results-latest.md).
# Builds nothing of attache. Builds the small fan-out tool (bench/fanout) if it is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
ONLY_PEERS=0
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --only-peers) ONLY_PEERS=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$QUICK" = 1 ]; then
  : "${WRK_DURATION:=2s}" "${FANOUT_READERS:=100}" "${FANOUT_ROUNDS:=3}" "${FANOUT_SETTLE_MS:=300}"
fi
WRK_THREADS="${WRK_THREADS:-2}"
WRK_CONNS="${WRK_CONNS:-32}"
WRK_DURATION="${WRK_DURATION:-10s}"
CATCHUP_MESSAGES="${CATCHUP_MESSAGES:-1000}"
CATCHUP_MSG_BYTES="${CATCHUP_MSG_BYTES:-60}"
FANOUT_READERS="${FANOUT_READERS:-1000}"
FANOUT_ROUNDS="${FANOUT_ROUNDS:-20}"
FANOUT_SETTLE_MS="${FANOUT_SETTLE_MS:-1000}"
BENCH_TARGET_DIR="${BENCH_TARGET_DIR:-$(cd "$REPO/.." && pwd)/bench-target}"
BENCH_RESULTS="${BENCH_RESULTS:-$HERE/results-latest.md}"
SERVERS="${BENCH_SERVERS:-attache attache-nofsync node-mem node-file}"

log() { echo "[bench] $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "missing '$1' (try: apt-get install -y ${2:-$1})"; exit 2; }; }
need wrk
need curl
need node nodejs
need npm

# ---- prerequisites ---------------------------------------------------------------------------
if [ ! -d "$HERE/node_modules/@durable-streams/server" ]; then
  log "installing the Node reference server (npm ci in bench/)"
  (cd "$HERE" && npm ci --no-audit --no-fund >&2)
fi
FANOUT="$BENCH_TARGET_DIR/release/attache-bench-fanout"
if [ ! -x "$FANOUT" ] || [ "$HERE/fanout/src/main.rs" -nt "$FANOUT" ]; then
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
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((FANOUT_READERS * 2 + 256)) ]; then
  log "open-file limit $(ulimit -n) is too low for $FANOUT_READERS readers"; exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/attache-bench.XXXXXX")"
RESULTS_JSONL="$WORK/results.jsonl"
if [[ "$SERVERS" == *attache* ]]; then
  # Run a private copy so a concurrent `cargo build` cannot swap the binary mid-run.
  cp "$ATTACHE_BIN" "$WORK/attache"
  ATTACHE_VERSION="$("$WORK/attache" --version 2>/dev/null || true)"
  ATTACHE_BIN="$WORK/attache"
fi
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

# run_wrk OUTFILE ARGS... ; prints "rps p50_ms p99_ms errors bytes_per_req"
run_wrk() {
  local out="$1"; shift
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency "$@" >"$out" 2>&1 || true
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    function bytes(v) { if (v ~ /GB$/) return v*1073741824; if (v ~ /MB$/) return v*1048576; if (v ~ /KB$/) return v*1024; return v+0 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /requests in/ { reqs = $1; sub(/,$/, "", $5); rd = bytes($5) }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { for (i = 3; i <= NF; i++) { v = $i; sub(/,/, "", v); if (v ~ /^[0-9]+$/) err += v } }
    /^Requests\/sec:/ { rps = $2 }
    END { printf "%s %s %s %d %s\n", (rps == "" ? "null" : rps), (p50 == "" ? "null" : p50), (p99 == "" ? "null" : p99), err, (reqs > 0 ? int(rd / reqs) : "null") }
  ' "$out"
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

  # (a) appends
  curl -sf -o /dev/null -X PUT "$base/bench/append" -H 'Content-Type: application/json'
  read -r rps p50 p99 err bpr < <(run_wrk "$WORK/$name-append.txt" -s "$HERE/wrk/append.lua" "$base/bench/append")
  log "$name: appends ${rps}/s p50 ${p50}ms p99 ${p99}ms errors ${err}"
  record "$name" append_rps "$rps"; record "$name" append_p50_ms "$p50"; record "$name" append_p99_ms "$p99"; record "$name" append_errors "$err"

  # (b) catch-up reads of a stream pre-filled with CATCHUP_MESSAGES appends
  local fill mid
  fill="$("$FANOUT" fill --url "$base" --path /bench/catchup --count "$CATCHUP_MESSAGES" --msg-bytes "$CATCHUP_MSG_BYTES")"
  mid="$(sed -n 's/^mid=\([^ ]*\) .*/\1/p' <<<"$fill")"
  local n
  n="$(curl -s "$base/bench/catchup?offset=-1" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s).length)}catch{console.log("null")}})')"
  record "$name" catchup_messages "$n"
  read -r rps p50 p99 err bpr < <(run_wrk "$WORK/$name-catchup.txt" "$base/bench/catchup?offset=-1")
  log "$name: catch-up (-1, $n msgs) ${rps}/s p50 ${p50}ms p99 ${p99}ms ${bpr} B/resp errors ${err}"
  record "$name" catchup_rps "$rps"; record "$name" catchup_p50_ms "$p50"; record "$name" catchup_p99_ms "$p99"
  record "$name" catchup_bytes "$bpr"; record "$name" catchup_errors "$err"
  read -r rps p50 p99 err bpr < <(run_wrk "$WORK/$name-catchup-mid.txt" "$base/bench/catchup?offset=$mid")
  log "$name: catch-up (mid) ${rps}/s p50 ${p50}ms p99 ${p99}ms ${bpr} B/resp errors ${err}"
  record "$name" catchup_mid_rps "$rps"; record "$name" catchup_mid_p50_ms "$p50"; record "$name" catchup_mid_p99_ms "$p99"
  record "$name" catchup_mid_bytes "$bpr"; record "$name" catchup_mid_errors "$err"

  # (c) live fan-out
  local fj="$WORK/$name-fanout.json"
  if "$FANOUT" fanout --url "$base" --path /bench/fanout --readers "$FANOUT_READERS" --rounds "$FANOUT_ROUNDS" \
      --settle-ms "$FANOUT_SETTLE_MS" --pid "$SERVER_PID" --json-out "$fj" >/dev/null 2>"$WORK/$name-fanout.log"; then
    grep -E 'round +(1|5|10|15|20):' "$WORK/$name-fanout.log" >&2 || true
    node -e '
      const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      for (const k of ["p50_ms","p99_ms","max_ms","mean_ms","misses","rss_before_kb","rss_wait_kb_max"]) console.log(k, r[k] ?? "null");
      const d = r.rss_wait_kb_max != null && r.rss_before_kb != null ? r.rss_wait_kb_max - r.rss_before_kb : "null";
      console.log("rss_readers_delta_kb", d);
    ' "$fj" | while read -r k v; do record "$name" "fanout_$k" "$v"; done
  else
    log "$name: fan-out FAILED:"; tail -5 "$WORK/$name-fanout.log" >&2
    record "$name" fanout_failed 1
  fi
  record "$name" peak_rss_kb "$(hwm_kb "$SERVER_PID")"  # report.mjs takes max(VmHWM, sampled VmRSS)
  stop_server
  rm -rf "$dir"
}

log "servers: $SERVERS"
log "load: wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION; catch-up $CATCHUP_MESSAGES x ${CATCHUP_MSG_BYTES}B msgs; fan-out $FANOUT_READERS readers x $FANOUT_ROUNDS rounds"
for s in $SERVERS; do bench_one "$s"; done

META="$WORK/meta.json"
node -e '
  const os = require("os");
  const [, rev, ...rest] = process.argv;
  console.log(JSON.stringify({
    date: new Date().toISOString(), gitRev: rev, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model,
    memGiB: +(os.totalmem() / 2 ** 30).toFixed(1), kernel: os.release(), node: process.version,
    params: rest.join(" "),
  }))
' "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION; catch-up: $CATCHUP_MESSAGES appends of ${CATCHUP_MSG_BYTES}B JSON;" \
  "fan-out: $FANOUT_READERS long-poll readers x $FANOUT_ROUNDS rounds, settle ${FANOUT_SETTLE_MS}ms" >"$META"
node "$HERE/report.mjs" "$RESULTS_JSONL" "$META" "$BENCH_RESULTS"
log "wrote $BENCH_RESULTS"
