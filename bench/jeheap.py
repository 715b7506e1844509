#!/usr/bin/env python3
"""What grew in the live heap between two jemalloc heap profiles, by call site.

    jeprof --collapsed --base=EARLY.heap BINARY LATE.heap | bench/jeheap.py
    jeprof --collapsed BINARY ONE.heap | bench/jeheap.py          # what one profile holds

Reads jeprof's collapsed stacks (frames outermost first, separated by ';', then a
space and the bytes: negative where the later profile holds less) and prints the
bytes per group, where a group is the three innermost frames of attache's own
crates (or, with none, three library frames past the allocator's). The profiles
come from a build with `--features jemalloc-profiling` started with
`_RJEM_MALLOC_CONF=prof:true,...` and sent SIGUSR2 (bench/README.md, "Heap
growth"). jemalloc samples about one allocation per 2^lg_prof_sample bytes, so a
group's figure is an estimate; groups under a few samples are noise.
Python 3 standard library only.
"""
import collections
import re
import sys

SKIP = re.compile(r"^(prof_|je_|_rjem_|imalloc|ialloc|malloc|calloc|realloc|__rust_|alloc::|core::|std::|<alloc::|<core::|<std::|\?)")


def short(frame):
    f = re.sub(r"\[inline\]$", "", frame)
    f = re.sub(r"<[0-9a-f]{16}>$", "", f)
    return f[:110]


groups = collections.Counter()
total = 0
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line or " " not in line:
        continue
    stack, _, value = line.rpartition(" ")
    try:
        n = int(float(value))
    except ValueError:
        continue
    total += n
    frames = stack.split(";")[::-1]  # innermost first
    ours = [short(f) for f in frames if "attache" in f]
    if ours:
        key = " <- ".join(ours[:3])
    else:
        lib = [short(f) for f in frames if not SKIP.match(f)]
        key = "(no attache frame) " + " <- ".join(lib[:3])
    groups[key] += n

print(f"total: {total / 1e6:+.2f} MB")
for key, n in groups.most_common(20):
    if n <= 0:
        break
    print(f"{n / 1e3:+10.1f} KB  {key}")
print("shrank most:")
for key, n in sorted(groups.items(), key=lambda kv: kv[1])[:5]:
    if n >= 0:
        break
    print(f"{n / 1e3:+10.1f} KB  {key}")
