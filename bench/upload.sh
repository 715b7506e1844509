#!/usr/bin/env bash
# Attachment throughput, side by side in one run (issue 4's targets):
#   dd bs=1M conv=fdatasync of a file to the data disk   vs   a durable multipart upload of the same file,
#   and a read of that attachment back over loopback, with the server's peak RSS.
#
#   bench/upload.sh            # 1 GiB (SIZE_MB=1024); needs target/release/attache (or $ATTACHE_BIN)
#   SIZE_MB=256 bench/upload.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ATTACHE_BIN="${ATTACHE_BIN:-$REPO/target/release/attache}"
SIZE_MB="${SIZE_MB:-1024}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/attache-upload-bench.XXXXXX")"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
secs() { python3 -c "import sys;print(f'{float(sys.argv[1]):.3f}')" "$1"; }

echo "[upload] generating ${SIZE_MB} MiB of random bytes" >&2
head -c "$((SIZE_MB * 1048576))" /dev/urandom > "$WORK/src.bin"
mkdir -p "$WORK/data"

# dd to the same disk as the data dir
sync
start=$(date +%s.%N)
dd if="$WORK/src.bin" of="$WORK/data/dd.bin" bs=1M conv=fdatasync status=none
dd_s=$(python3 -c "import time,sys;print(time.time()-float(sys.argv[1]))" "$start")
rm -f "$WORK/data/dd.bin"

P=$(port)
"$ATTACHE_BIN" serve --listen "127.0.0.1:$P" --data-dir "$WORK/data" --max-attachment-bytes $((SIZE_MB * 1048576 + 1)) >"$WORK/server.log" 2>&1 &
PID=$!
B="http://127.0.0.1:$P"
for _ in $(seq 1 100); do curl -fs "$B/healthz" >/dev/null && break; sleep 0.1; done
curl -fs -X PUT "$B/_electric/entities/bench/up" >/dev/null
sync
up=$(curl -fs -o /dev/null -w '%{time_total}' -X POST "$B/_electric/entities/bench/up/attachments" -F id=big -F 'subject={"type":"context","key":"bench"}' -F "file=@$WORK/src.bin")
up_rss=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
down=$(curl -fs -o /dev/null -w '%{time_total}' "$B/_electric/entities/bench/up/attachments/big")
rss=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
idle=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)

python3 - "$SIZE_MB" "$dd_s" "$up" "$down" "$up_rss" "$rss" "$idle" <<'PY'
import sys
mb, dd, up, down, up_rss, rss, idle = sys.argv[1:]
mb = int(mb); size = mb * 1048576
dd, up, down = float(dd), float(up), float(down)
print(f"| what | time | throughput | ratio |")
print(f"|---|---|---|---|")
print(f"| dd bs=1M conv=fdatasync, {mb} MiB | {dd:.2f} s | {size/dd/1e6:.0f} MB/s | 1.00 |")
print(f"| attache durable multipart upload, {mb} MiB | {up:.2f} s | {size/up/1e6:.0f} MB/s | {dd/up:.2f} of dd (target >= 0.80) |")
print(f"| attache read of that attachment | {down:.2f} s | {size/down/1e9:.2f} GB/s | (target >= 1 GiB/s) |")
print(f"| server peak RSS (VmHWM) after upload / after read | {int(up_rss)/1024:.1f} MiB / {int(rss)/1024:.1f} MiB | | (target < 64 MiB) |")
PY
