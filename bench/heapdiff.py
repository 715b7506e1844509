#!/usr/bin/env python3
"""What grew in the live heap between two moments of a heaptrack recording.

    zstdcat heap.zst | bench/heapdiff.py 125 600     # seconds since the server started

heaptrack_print shows the peak and what is left at exit, not what grew between two
moments; this reads heaptrack's data stream ('a' allocation kinds, '+'/'-' allocations and
frees, 'c' timestamps, 't'/'i'/'s' traces, instruction pointers, strings), counts the live
allocations of each kind at both moments and prints the bytes gained, grouped by the three
innermost attache frames of their stacks (or, with none, by library frames). See
bench/README.md, "Heap growth". Python 3 standard library only; ~2 min per 100 M lines.
"""
import collections
import re
import sys

if len(sys.argv) != 3:
    sys.exit(__doc__)
t1, t2 = (int(float(a) * 1000) for a in sys.argv[1:3])
strings, ips, traces, kinds, live = [None], [None], [None], [], []
snaps = {}
for line in sys.stdin.buffer:
    c = line[:1]
    if c == b"+":
        live[int(line[2:], 16)] += 1
    elif c == b"-":
        live[int(line[2:], 16)] -= 1
    elif c == b"a":
        p = line.split()
        kinds.append((int(p[1], 16), int(p[2], 16)))
        live.append(0)
    elif c == b"t":
        p = line.split()
        traces.append((int(p[1], 16), int(p[2], 16)))
    elif c == b"i":
        ips.append([int(x, 16) for x in line.split()[2:]])
    elif c == b"s":
        strings.append(line[2:].decode(errors="replace").rstrip("\n").split(" ", 1)[-1])
    elif c == b"c":
        now = int(line[2:], 16)
        for t in (t1, t2):
            if t not in snaps and now >= t:
                snaps[t] = list(live)
for t in (t1, t2):
    snaps.setdefault(t, list(live))


def name(frame):
    f = re.sub(r"::h[0-9a-f]{16}$", "", frame)
    for a, b in (("_$u7b$$u7b$closure$u7d$$u7d$", "{{c}}"), ("$LT$", "<"), ("$GT$", ">"),
                 ("$u20$", " "), ("$C$", ","), ("..", "::")):
        f = f.replace(a, b)
    return f[:110]


def stack(trace):
    out = []
    while trace:
        ip, trace = traces[trace]
        info = ips[ip]
        out.append(strings[info[1]] if len(info) > 1 and info[1] < len(strings) else "?")
    return out  # innermost first


def at(snap, i):
    return snap[i] if i < len(snap) else 0


grown = collections.Counter()
for i, (size, trace) in enumerate(kinds):
    d = (at(snaps[t2], i) - at(snaps[t1], i)) * size
    if d:
        frames = stack(trace)
        ours = [name(f) for f in frames if "attache" in f]
        grown[" <- ".join(ours[:3]) if ours else "(no attache frame) " + " <- ".join(name(f) for f in frames[3:6])] += d


def total(snap):
    return sum(n * kinds[i][0] for i, n in enumerate(snap[: len(kinds)]))


print(f"live heap: {total(snaps[t1]) / 1e6:.2f} MB at {t1 / 1000:.0f} s, {total(snaps[t2]) / 1e6:.2f} MB at {t2 / 1000:.0f} s")
for key, d in grown.most_common(15):
    print(f"{d / 1e3:+10.1f} KB  {key}")
print("shrank most:")
for key, d in sorted(grown.items(), key=lambda kv: kv[1])[:5]:
    print(f"{d / 1e3:+10.1f} KB  {key}")
