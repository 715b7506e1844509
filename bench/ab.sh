#!/usr/bin/env bash
# A/B of binaries side by side, alternating, on fresh servers: appends spread over 1,000
# streams (wrk -t2 -c64 -d5s) then appends to one stream (-c32 -d5s), three rounds; prints
# appends/s and the server's CPU per append (from /proc/PID/stat) and RSS. A label `peer`
# runs its binary as Electric's Rust Durable Streams server.
#
#   bench/ab.sh old=/path/to/attache new=target/release/attache peer=<cache>/bin/durable-streams-server
#
# Env: BENCH_TARGET_DIR (<repo>/../bench-target: where bench/run.sh builds the fan-out tool), ROUNDS (3).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FANOUT="${BENCH_TARGET_DIR:-$HERE/../../bench-target}/release/attache-bench-fanout"
[ -x "$FANOUT" ] || cargo build --release --quiet --manifest-path "$HERE/fanout/Cargo.toml" \
  --target-dir "${BENCH_TARGET_DIR:-$HERE/../../bench-target}" >&2
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
run_one() { # label binary
  local label=$1 bin=$2 port=$((20000 + RANDOM % 10000)) dir pid
  dir=$(mktemp -d /tmp/attache-ab.XXXX)
  if [ "$label" = peer ]; then
    "$bin" --host 127.0.0.1 --port "$port" --data-dir "$dir" --long-poll-timeout-ms 30000 >/dev/null 2>&1 &
  else
    "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir" --long-poll-timeout 30s >/dev/null 2>&1 &
  fi
  pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.1; done
  sleep 0.3
  "$FANOUT" fill-many --url "http://127.0.0.1:$port" --path /bench/many --streams 1000 --count 0 >/dev/null
  curl -s -o /dev/null -X PUT -H 'content-type: application/json' "http://127.0.0.1:$port/bench/append"
  local t0 t1 t2 many one rss
  t0=$(cpu $pid)
  many=$(BENCH_PREFIX=/bench/many BENCH_STREAMS=1000 wrk -t2 -c64 -d5s -s "$HERE/wrk/append_many.lua" \
    "http://127.0.0.1:$port" | awk '/^Requests\/sec/{print $2}')
  t1=$(cpu $pid)
  one=$(wrk -t2 -c32 -d5s -s "$HERE/wrk/append.lua" "http://127.0.0.1:$port/bench/append" | awk '/^Requests\/sec/{print $2}')
  t2=$(cpu $pid)
  rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  kill $pid; wait $pid 2>/dev/null; rm -rf "$dir"
  awk -v l="$label" -v m="$many" -v o="$one" -v a="$t0" -v b="$t1" -v c="$t2" -v r="$rss" 'BEGIN {
    printf "%-6s 1,000 streams %8.0f/s %5.1f us/append | one stream %8.0f/s %5.1f us/append | RSS %d KiB\n",
      l, m, (b-a)*10000/(m*5), o, (c-b)*10000/(o*5), r }'
}
for _ in $(seq "${ROUNDS:-3}"); do
  for pair in "$@"; do run_one "${pair%%=*}" "${pair#*=}"; done
done
