#!/usr/bin/env python3
"""Summarizes `perf report --no-children --sort symbol --stdio` output:
self time grouped by component (crate or library), then the top symbols.

    profile.py PERF_SYMBOLS.txt
"""

import re
import sys
from collections import defaultdict

GROUPS = [
    ("kernel", lambda s: s.startswith("[k]")),
    ("allocator (malloc/free)", lambda s: re.search(r"\b(_int_malloc|_int_free|malloc|free|cfree|realloc|calloc|malloc_consolidate|tcache|arena|unlink_chunk|__libc_)", s)),
    ("fencegate", lambda s: "fencegate::" in s),
    ("hyper", lambda s: "hyper::" in s or "hyper_util::" in s),
    ("tokio", lambda s: "tokio::" in s or "tokio_util::" in s),
    ("http / httparse / bytes", lambda s: re.search(r"\b(http::|httparse::|bytes::|http_body)", s)),
    ("prometheus", lambda s: "prometheus::" in s),
    ("tracing", lambda s: "tracing" in s),
    ("std / core / alloc", lambda s: re.search(r"\b(core::|alloc::|std::|memcpy|memmove|memset|__memcmp|strlen)", s)),
    ("libc other", lambda s: re.search(r"\b(pthread|__lll|epoll|syscall|__GI_|clock_gettime|__vdso)", s)),
]


def main(path):
    rows = []
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"\s*([0-9.]+)%\s+(.*\S)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            # perf pads the symbol column and may add empty ones ("-").
            rows.append((float(m.group(1)), re.sub(r"\s{2,}.*$", "", m.group(2))))
    if not rows:
        print("(no samples: is perf allowed here? see perf_event_paranoid)")
        return
    groups = defaultdict(float)
    for pct, sym in rows:
        for name, match in GROUPS:
            if match(sym):
                groups[name] += pct
                break
        else:
            groups["other"] += pct
    print("\n| component (self time) | % of fencegate's samples |\n|---|---|")
    for name, pct in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {pct:.1f} |")
    print("\n| top symbols (self) | % |\n|---|---|")
    for pct, sym in rows[:25]:
        sym = sym.replace("|", "\\|")
        if len(sym) > 120:
            sym = sym[:117] + "..."
        print(f"| `{sym}` | {pct:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
