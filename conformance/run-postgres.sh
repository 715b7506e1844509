#!/usr/bin/env bash
# The conformance suite against the scale-out backend (--store postgres://...):
# starts a throwaway PostgreSQL cluster from the installed binaries (initdb +
# pg_ctl in a temporary directory on a free loopback port; as the `postgres`
# user when run as root), runs conformance/run.sh with ATTACHE_STORE pointing
# at it, then stops and removes the cluster. Without PostgreSQL binaries it
# says so and exits 0 (1 when ATTACHE_REQUIRE_SERVICES is set, as in CI).
# Arguments go to run.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  if command -v initdb >/dev/null 2>&1; then BIN="$(dirname "$(command -v initdb)")"; else
    if [ -n "${ATTACHE_REQUIRE_SERVICES:-}" ]; then
      echo "[conformance/postgres] FAILED: no PostgreSQL binaries (initdb) installed, and ATTACHE_REQUIRE_SERVICES is set" >&2
      exit 1
    fi
    echo "[conformance/postgres] SKIPPED: no PostgreSQL binaries (initdb) installed" >&2
    exit 0
  fi
fi

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

DIR="$(mktemp -d "${TMPDIR:-/tmp}/attache-conformance-pg.XXXXXX")"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
stop() {
  local rc=$?
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$DIR"
  exit "$rc"
}
trap stop EXIT

PORT="$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$DIR" start >/dev/null
echo "[conformance/postgres] PostgreSQL on 127.0.0.1:$PORT" >&2

ATTACHE_STORE="postgres://postgres@127.0.0.1:$PORT/postgres" \
  ATTACHE_OBJECT_STORE="file://$DIR/objects" \
  bash "$HERE/run.sh" "$@"
