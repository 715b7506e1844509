#!/usr/bin/env bash
# The task face against Redis, side by side in one run (issue #5's targets):
#   task.create_attachment (small JSON value, durable, 32 connections)  vs  redis-benchmark -t hset -c 32
#   task.get_attachment                                                   vs  redis-benchmark -t get  -c 32
# Redis runs without persistence on a free port; attache with its defaults (every write
# synced before it is acknowledged). One server under load at a time.
#
#   bench/rpc.sh            # 10s per wrk run
#   bench/rpc.sh --quick    # 3s per wrk run
#
# Env: ATTACHE_BIN (target/release/attache), WRK_THREADS (2), WRK_CONNS (32), WRK_DURATION (10s),
#      REDIS_REQUESTS (300000), ROUNDS (3), ATTACHE_EXTRA_ARGS (e.g. --no-fsync).
# Builds nothing. Exits 2 when a tool is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
[ "${1:-}" = "--quick" ] && : "${WRK_DURATION:=3s}" "${REDIS_REQUESTS:=100000}" "${ROUNDS:=1}"
WRK_THREADS="${WRK_THREADS:-2}"
WRK_CONNS="${WRK_CONNS:-32}"
WRK_DURATION="${WRK_DURATION:-10s}"
REDIS_REQUESTS="${REDIS_REQUESTS:-300000}"
ROUNDS="${ROUNDS:-3}"

log() { echo "[rpc-bench] $*" >&2; }
for tool in wrk curl redis-server redis-benchmark; do
  command -v "$tool" >/dev/null 2>&1 || { log "missing $tool (apt-get install -y wrk curl redis-server)"; exit 2; }
done
[ -x "$ATTACHE_BIN" ] || { log "no attache binary at $ATTACHE_BIN: cargo build --release -p attache-cli"; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/attache-rpc-bench.XXXXXX")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() { # URL-or-port check command, name
  local deadline=$((SECONDS + 30))
  until eval "$1" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { log "$2 did not start"; exit 1; }
    sleep 0.2
  done
}

# wrk → "rps p50_ms p99_ms errors"
run_wrk() {
  local script="$1" url="$2" out
  out="$WORK/wrk-$(basename "$script" .lua).txt"
  TASK="$TASK_ID" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$script" "$url" >"$out" 2>&1 || true
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /unexpected answer/ { err += 1 }
    /^Requests\/sec:/ { rps = $2 }
    END { printf "%s %s %s %d\n", (rps == "" ? 0 : rps), p50, p99, err }
  ' "$out"
}

# ---- Redis, no persistence ----
RPORT="$(free_port)"
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_for "redis-cli -p $RPORT ping" redis
redis_rps() { # test
  redis-benchmark -p "$RPORT" -t "$1" -c "$WRK_CONNS" -n "$REDIS_REQUESTS" -q 2>/dev/null | tr '\r' '\n' \
    | awk -v t="$(echo "$1" | tr a-z A-Z)" 'index($0, t":") == 1 && /requests per second/ { print $2; exit }'
}
# ---- attache, durable ----
APORT="$(free_port)"
"$ATTACHE_BIN" serve --listen "127.0.0.1:$APORT" --data-dir "$WORK/data" ${ATTACHE_EXTRA_ARGS:-} >"$WORK/attache.log" 2>&1 &
PIDS+=($!)
BASE="http://127.0.0.1:$APORT"
wait_for "curl -sf $BASE/healthz" attache
rpc() { curl -sf -H 'content-type: application/json' -d "$1" "$BASE/rpc"; }
TASK_ID="$(rpc '{"jsonrpc":"2.0","method":"task.create","params":{"text":"bench"},"id":1}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"]["id"])')"
rpc "{\"jsonrpc\":\"2.0\",\"method\":\"task.create_attachment\",\"params\":{\"taskId\":\"$TASK_ID\",\"key\":\"k1\",\"type\":\"json\",\"value\":{\"n\":1,\"ok\":true}},\"id\":2}" >/dev/null

# Each round measures Redis and attache back to back, so a change in what else
# this shared machine is doing moves both sides of a ratio together; the verdict
# is on the median ratio of the rounds.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "n/a" }'; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
CREATE_RATIOS=""
GET_RATIOS=""
echo
echo "task face vs Redis, $(nproc) cores, load avg $(cut -d' ' -f1 /proc/loadavg), wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION, $ROUNDS rounds"
printf '%-5s %-24s %12s %9s %9s %7s | %-22s %12s | %6s\n' round operation "attache rps" "p50 ms" "p99 ms" errors "redis" "redis rps" ratio
for round in $(seq 1 "$ROUNDS"); do
  log "round $round: redis-benchmark -t hset, then wrk task.create_attachment ($WRK_DURATION, task $TASK_ID)"
  R_HSET="$(redis_rps hset)"
  read -r A_CREATE C50 C99 CERR < <(run_wrk "$HERE/wrk/rpc_create_attachment.lua" "$BASE/rpc")
  log "round $round: redis-benchmark -t get, then wrk task.get_attachment"
  R_GET="$(redis_rps get)"
  read -r A_GET G50 G99 GERR < <(run_wrk "$HERE/wrk/rpc_get_attachment.lua" "$BASE/rpc")
  printf '%-5s %-24s %12.0f %9s %9s %7s | %-22s %12.0f | %6s\n' "$round" task.create_attachment "$A_CREATE" "$C50" "$C99" "$CERR" \
    "hset (no persistence)" "$R_HSET" "$(ratio "$A_CREATE" "$R_HSET")"
  printf '%-5s %-24s %12.0f %9s %9s %7s | %-22s %12.0f | %6s\n' "$round" task.get_attachment "$A_GET" "$G50" "$G99" "$GERR" \
    "get" "$R_GET" "$(ratio "$A_GET" "$R_GET")"
  CREATE_RATIOS="$CREATE_RATIOS $(awk -v a="$A_CREATE" -v b="$R_HSET" 'BEGIN { print (b > 0) ? a / b : 0 }')"
  GET_RATIOS="$GET_RATIOS $(awk -v a="$A_GET" -v b="$R_GET" 'BEGIN { print (b > 0) ? a / b : 0 }')"
done
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { printf "%.0f%% %s >=%.0f%%\n", 100 * r, (r >= t) ? "meets" : "MISSES", 100 * t }'; }
echo "median task.create_attachment / HSET: $(verdict "$(echo "$CREATE_RATIOS" | median)" 0.25)"
echo "median task.get_attachment / GET:     $(verdict "$(echo "$GET_RATIOS" | median)" 0.50)"
