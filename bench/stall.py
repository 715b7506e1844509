#!/usr/bin/env python3
"""Stalled connections and non-reading SSE clients against one attache (issue 10, item 5 and 6).

Starts `attache serve` on a free loopback port with a fresh data dir, fills one binary stream,
then for --seconds holds:
  - --stalled connections that never finish a request header (half send nothing, half send half
    a header); each one closed by the server is opened again at once, so the count stays up;
  - --sse SSE readers of that stream from its start that never read (a 4 KiB receive buffer);
    each is replaced by a new one after --sse-hold seconds, so the count stays up even after
    the server's slow-reader timeout closes them;
and meanwhile asks GET /healthz on a fresh connection every 200 ms (latency of each) and samples
the server's VmRSS every second. Prints a summary (and writes it to --report when given).
Stops by itself; loopback only. Standard library only.

  bench/stall.sh                                   # 2,000 stalled + 200 SSE, 60 s
  ATTACHE_BIN=target/release/attache bench/stall.py --seconds 90 --stalled 2000 --sse 200
  bench/stall.py --server-arg=--slow-reader-timeout=10s   # any extra `attache serve` flag
"""

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def request(port, method, path, body=b"", headers=None, timeout=10.0):
    """One request on a fresh connection; returns (status, body bytes, seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data.split(b"\r\n\r\n", 1)[-1], time.perf_counter() - started


def probe(port, pid, seconds):
    """Runs in its own process, so the load's event loop cannot delay it: /healthz on a fresh
    connection every 200 ms, the server's RSS every second. Prints one JSON line."""
    import json
    latencies, failures, samples, slow = [], [], [], []
    started = time.monotonic()
    next_sample = started
    while time.monotonic() - started < seconds:
        t0 = time.perf_counter()
        try:
            with socket.create_connection((HOST, port), timeout=5) as c:
                c.sendall(f"GET /healthz HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    got = c.recv(4096)
                    if not got:
                        break
                    data += got
            took = time.perf_counter() - t0
            if data.startswith(b"HTTP/1.1 200"):
                latencies.append(took)
                slow.append((took, time.monotonic() - started))
            else:
                failures.append(data[:12].decode(errors="replace"))
        except OSError as err:
            failures.append(type(err).__name__)
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - started, rss_kib(pid)))
            next_sample += 1.0
        time.sleep(0.2)
    slow = sorted(slow, reverse=True)[:5]
    print(json.dumps({"latencies": latencies, "failures": failures, "samples": samples, "slowest": slow}))


class Counts:
    def __init__(self):
        self.stalled_open = 0
        self.stalled_closed_by_server = 0
        self.stalled_refused = 0
        self.sse_open = 0
        self.sse_opened = 0


async def stalled_client(port, n, counts, stop):
    """Holds one connection that never completes a header; reopens it when the server closes it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            counts.stalled_refused += 1
            await asyncio.sleep(0.5)
            continue
        counts.stalled_open += 1
        try:
            if n % 2:
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-stall: ")
                await writer.drain()
            read = asyncio.ensure_future(reader.read(65536))
            done, _ = await asyncio.wait({read, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                counts.stalled_closed_by_server += 1
                if read.result().startswith(b"HTTP/1.1 503"):
                    counts.stalled_refused += 1
                    await asyncio.sleep(0.5)
            else:
                read.cancel()
        except OSError:
            counts.stalled_closed_by_server += 1
        finally:
            counts.stalled_open -= 1
            writer.close()


async def sse_client(port, path, hold, counts, stop):
    """Holds one SSE reader that reads nothing; replaces it every `hold` seconds."""
    while not stop.is_set():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            _reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            await asyncio.sleep(0.5)
            continue
        counts.sse_open += 1
        counts.sse_opened += 1
        try:
            writer.write(f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), hold)
            except asyncio.TimeoutError:
                pass
        finally:
            counts.sse_open -= 1
            writer.close()


async def run(args):
    binary = os.environ.get("ATTACHE_BIN") or os.path.join(os.path.dirname(__file__), "..", "target", "release", "attache")
    if not os.access(binary, os.X_OK):
        print(f"no attache binary at {binary}: cargo build --release first, or set ATTACHE_BIN", file=sys.stderr)
        return 2
    data_dir = tempfile.mkdtemp(prefix="attache-stall-")
    copy = os.path.join(data_dir, "attache")
    shutil.copy(binary, copy)
    port = free_port()
    log = open(os.path.join(data_dir, "server.log"), "w")
    cmd = [copy, "serve", "--listen", f"{HOST}:{port}", "--data-dir", os.path.join(data_dir, "data"), "--no-fsync"]
    cmd += args.server_arg
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    out = []

    def say(line=""):
        print(line, flush=True)
        out.append(line)

    try:
        for _ in range(200):
            try:
                if (await request(port, "GET", "/healthz", timeout=1))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.05)
        else:
            say("the server did not start; see its log: " + log.name)
            return 2
        path = "/bench/stall"
        status, _, _ = await request(port, "PUT", path, headers={"content-type": "application/octet-stream"})
        assert status == 201, status
        chunk = os.urandom(args.append_kib << 10)
        for _ in range(max(1, (args.stream_mib << 10) // args.append_kib)):
            status, _, _ = await request(port, "POST", path, chunk, {"content-type": "application/octet-stream"})
            assert status == 204, status
        await asyncio.sleep(1)
        idle_rss = rss_kib(server.pid)
        say(f"server: {' '.join(cmd[1:])}")
        say(f"stream: {args.stream_mib} MiB of random bytes in appends of {args.append_kib} KiB (SSE sends them base64)")
        say(f"idle RSS after filling the stream: {idle_rss / 1024:.1f} MiB")

        import json
        # The probe starts first, at the priority this script was started with; the load then
        # runs --load-nice lower, as the clients of a real server run on other machines and do
        # not take its cores (on this 2-core machine Python's 2,200 clients otherwise compete
        # with the server and the probe for CPU, which is not the server's latency).
        prober = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--probe", str(port), str(server.pid), str(args.seconds),
            stdout=asyncio.subprocess.PIPE)
        if args.load_nice:
            os.nice(args.load_nice)
        counts = Counts()
        stop = asyncio.Event()
        clients = []
        for n in range(args.stalled):
            clients.append(asyncio.ensure_future(stalled_client(port, n, counts, stop)))
            if n % 100 == 99:
                await asyncio.sleep(0.01)
        for n in range(args.sse):
            clients.append(asyncio.ensure_future(sse_client(port, path, args.sse_hold, counts, stop)))
            if n % 50 == 49:
                await asyncio.sleep(0.01)
        held = []
        started = time.monotonic()
        while prober.returncode is None:
            held.append((time.monotonic() - started, counts.stalled_open, counts.sse_open))
            try:
                await asyncio.wait_for(prober.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        probed = json.loads((await prober.stdout.read()).decode())
        latencies, failures = probed["latencies"], probed["failures"]
        samples = []
        for t, rss in probed["samples"]:
            near = min(held, key=lambda h: abs(h[0] - t)) if held else (t, 0, 0)
            samples.append((t, rss, near[1], near[2]))
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)

        _, metrics, _ = await request(port, "GET", "/metrics")
        peak = max(s[1] for s in samples if s[1] is not None)
        say(f"load: {args.stalled} stalled connections, {args.sse} SSE readers that never read "
            f"(each replaced after {args.sse_hold:g} s), {args.seconds:g} s; the load's process at nice +{args.load_nice}")
        say("RSS (MiB) every 5 s, with the connections held then:")
        for t, rss, st, sse in samples[::5]:
            say(f"  t={t:5.1f}s  RSS {rss / 1024:7.1f}  stalled {st:5d}  sse {sse:4d}")
        say(f"RSS peak {peak / 1024:.1f} MiB (idle {idle_rss / 1024:.1f} MiB)")
        if latencies:
            lat = sorted(x * 1000 for x in latencies)
            p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
            say(f"/healthz on a fresh connection: {len(lat)} answered 200, {len(failures)} not "
                f"({sorted(set(map(str, failures)))}); ms p50 {p(0.5):.2f}  p99 {p(0.99):.2f}  max {lat[-1]:.2f}  "
                f"mean {statistics.mean(lat):.2f}")
            say("slowest /healthz: " + ", ".join(f"{took * 1000:.1f} ms at t={t:.1f}s" for took, t in probed["slowest"]))
        else:
            say(f"/healthz never answered 200: {failures[:10]}")
        say(f"stalled connections closed by the server: {counts.stalled_closed_by_server}; "
            f"refused (503 or connect error): {counts.stalled_refused}; SSE readers opened: {counts.sse_opened}")
        for line in metrics.decode(errors="replace").splitlines():
            if line.startswith("attache_connections"):
                say("  " + line)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        if args.report and out:
            with open(args.report, "w") as f:
                f.write("\n".join(out) + "\n")
        if args.keep:
            print(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stalled", type=int, default=2000)
    ap.add_argument("--sse", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--sse-hold", type=float, default=40, help="seconds before an SSE reader is replaced")
    ap.add_argument("--stream-mib", type=int, default=32)
    ap.add_argument("--append-kib", type=int, default=64, help="size of each append filling the stream")
    ap.add_argument("--server-arg", action="append", default=[], help="one more `attache serve` flag (repeat)")
    ap.add_argument("--load-nice", type=int, default=10,
                    help="niceness added to the load's process (the server and the probe keep theirs); 0: none")
    ap.add_argument("--report", help="also write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server log, data)")
    ap.add_argument("--probe", nargs=3, metavar=("PORT", "PID", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(int(args.probe[0]), int(args.probe[1]), float(args.probe[2]))
        return
    limit = args.stalled + args.sse + 256
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(limit, soft)), hard))
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
