#!/usr/bin/env bash
# Stalled connections and SSE readers that never read, against attache's release binary
# (issue 10: "with 2,000 stalled connections and 200 non-reading SSE clients, /healthz answers
# in under 50 ms and RSS stays under 128 MiB"). Loopback only; stops by itself (~70 s).
#
#   bench/stall.sh                          # 2,000 stalled + 200 SSE for 60 s; writes bench/stall-latest.md
#   bench/stall.sh --seconds 120 --sse 400  # any flag of bench/stall.py (see --help)
#
# Env: ATTACHE_BIN (target/release/attache). Builds nothing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ATTACHE_BIN="${ATTACHE_BIN:-$HERE/../target/release/attache}"
exec python3 "$HERE/stall.py" --report "$HERE/stall-latest.md" "$@"
