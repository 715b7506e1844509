"""Opens N /ws sockets on a dev-mode server at 127.0.0.1:PORT, each with a handshake head of
HEAD_BYTES and subscribed to PATTERNS patterns of 256 bytes, as one of PRINCIPALS principals;
answers pings, holds them 5 s, prints what the upgrades were answered and the server's RSS
(process PID) before and after, per socket opened. Standard library only; loopback only.

usage: ws_hold.py PORT PID N HEAD_BYTES PATTERNS PRINCIPALS
e.g.   ws_hold.py 18431 "$(pgrep -n attache)" 1000 61440 100 100   (session 17's attack pass)
"""
import asyncio, json, os, struct, sys

PORT, PID, N, HEAD, PATTERNS, PRINCIPALS = (int(a) for a in sys.argv[1:7])

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def frame(text):
    data = text.encode()
    head = bytes([0x81])
    n = len(data)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + b"\0\0\0\0" + data

async def pump(reader, writer):
    # Answer pings with pongs, drop the rest.
    try:
        while True:
            h = await reader.readexactly(2)
            op, n = h[0] & 0x0F, h[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(n)
            if op == 0x9:
                writer.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            if op == 0x8:
                return
    except Exception:
        return

async def open_one(i, results):
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT, limit=1 << 20)
    pad = "x" * max(0, HEAD - 300)
    req = (f"GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
           f"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
           f"electric-principal: user:m{i % PRINCIPALS}\r\nx-pad: {pad}\r\n\r\n")
    writer.write(req.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    if status != "101":
        results[status] = results.get(status, 0) + 1
        writer.close()
        return None
    if PATTERNS:
        pats = [f"task.{j:03d}." + "p" * 240 + "*" for j in range(PATTERNS)]
        writer.write(frame(json.dumps({"action": "subscribe", "events": pats})))
    results["101"] = results.get("101", 0) + 1
    return asyncio.ensure_future(pump(reader, writer)), writer

async def main():
    base = rss_kb(PID)
    results = {}
    held = []
    for start in range(0, N, 100):
        got = await asyncio.gather(*(open_one(i, results) for i in range(start, min(N, start + 100))),
                                   return_exceptions=True)
        for g in got:
            if isinstance(g, Exception):
                results[type(g).__name__] = results.get(type(g).__name__, 0) + 1
            elif g:
                held.append(g)
    await asyncio.sleep(5)
    after = rss_kb(PID)
    opened = results.get("101", 0)
    print(json.dumps({"results": results, "rss_before_kb": base, "rss_after_kb": after,
                      "per_socket_kb": round((after - base) / max(1, opened), 1)}))
    for _, w in held:
        w.close()

asyncio.run(main())
