#!/usr/bin/env python3
"""Parses wrk's output and turns bench/run's records into markdown tables.

    report.py parse-wrk FILE
        prints: req/s p50_us p99_us non2xx socket_errors requests
    report.py selftest
        checks the median's interval and the verdicts' wording
    report.py table RECORDS.tsv --refs nginx,direct [--targets throughput|linearizable] [--etcd-cpu]
        one table per (concurrency, method): medians over the rounds, and the
        ratio to each reference as the median of the per-round ratios with
        their min-max spread (a round's contenders ran back to back, so a
        round pairs them under the same machine conditions).

Records (tab-separated, one per wrk run):
    conc method round contender rps p50_us p99_us non2xx sockerr requests proxy_cpu_s store_cpu_s
    [etcd_cpu_s [proxy_context_switches]]
(-1: not measured).
Only the standard library: the benchmark machine has no internet.
"""

import math
import re
import statistics
import sys
from collections import defaultdict

UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def to_us(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    reqs = re.search(r"(\d+) requests in", text)
    fields = [
        float(rps.group(1)) if rps else float("nan"),
        to_us(p50.group(1)) if p50 else float("nan"),
        to_us(p99.group(1)) if p99 else float("nan"),
        int(non2xx.group(1)) if non2xx else 0,
        sum(int(g) for g in sock.groups()) if sock else 0,
        int(reqs.group(1)) if reqs else 0,
    ]
    print(" ".join(str(f) for f in fields))


def fmt_ms(us):
    return "n/a" if us != us else f"{us / 1e3:.3f}"


def fmt_ratio(values):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}–{max(values):.2f})"


def load(path):
    runs = []
    for line in open(path, encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 12 or parts[0] == "conc":
            continue
        conc, method, rnd, contender = int(parts[0]), parts[1], int(parts[2]), parts[3]
        rps, p50, p99 = float(parts[4]), float(parts[5]), float(parts[6])
        non2xx, sockerr, requests = int(parts[7]), int(parts[8]), int(parts[9])
        proxy_cpu, store_cpu = float(parts[10]), float(parts[11])
        etcd_cpu = float(parts[12]) if len(parts) > 12 else -1.0
        proxy_cs = float(parts[13]) if len(parts) > 13 else -1.0
        runs.append(
            dict(conc=conc, method=method, round=rnd, contender=contender, rps=rps, p50=p50, p99=p99,
                 errors=non2xx + sockerr, requests=requests, proxy_cpu=proxy_cpu, store_cpu=store_cpu,
                 etcd_cpu=etcd_cpu, proxy_cs=proxy_cs)
        )
    return runs


def per_request(rows, key, scale=1e6, digits=1):
    values = [x[key] / x["requests"] * scale for x in rows if x["requests"] and x[key] >= 0]
    return f"{statistics.median(values):.{digits}f}" if values else "–"


def table(path, refs, targets, etcd_cpu=False):
    runs = load(path)
    groups = defaultdict(list)
    for r in runs:
        groups[(r["conc"], r["method"])].append(r)
    order = []
    for r in runs:
        if r["contender"] not in order:
            order.append(r["contender"])
    summary = {}
    for (conc, method) in sorted(groups, key=lambda k: (k[0], k[1] != "PUT", k[1])):
        rows = groups[(conc, method)]
        by = defaultdict(dict)
        for r in rows:
            by[r["contender"]][r["round"]] = r
        print(f"\n#### {method}, {conc} connection{'s' if conc != 1 else ''} ({len(set(r['round'] for r in rows))} rounds)\n")
        head = ["contender", "req/s (median)", "p50 ms", "p99 ms", "errors", "proxy CPU µs/req",
                "proxy ctx sw/req", "store CPU µs/req"]
        if etcd_cpu:
            head.append("etcd CPU µs/req")
        for ref in refs:
            head.append(f"req/s ÷ {ref}")
        for ref in refs[:1]:
            head.append(f"p99 ÷ {ref}")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for c in order:
            if c not in by:
                continue
            rr = by[c]
            med = lambda key: statistics.median([x[key] for x in rr.values()])
            cells = [
                c,
                f"{med('rps'):,.0f}",
                fmt_ms(med("p50")),
                fmt_ms(med("p99")),
                str(sum(x["errors"] for x in rr.values())),
                per_request(rr.values(), "proxy_cpu"),
                per_request(rr.values(), "proxy_cs", scale=1, digits=2),
                per_request(rr.values(), "store_cpu"),
            ]
            if etcd_cpu:
                cells.append(per_request(rr.values(), "etcd_cpu"))
            ratios = {}
            for ref in refs:
                vals = [rr[k]["rps"] / by[ref][k]["rps"] for k in rr if ref in by and k in by[ref] and by[ref][k]["rps"] > 0]
                ratios[ref] = vals
                cells.append("–" if c == ref else fmt_ratio(vals))
            for ref in refs[:1]:
                vals = [rr[k]["p99"] / by[ref][k]["p99"] for k in rr if ref in by and k in by[ref] and by[ref][k]["p99"] > 0]
                ratios["p99:" + ref] = vals
                cells.append("–" if c == ref else fmt_ratio(vals))
            summary[(conc, method, c)] = ratios
            print("| " + " | ".join(cells) + " |")
    if targets:
        print_targets(targets, summary, refs)


def median_interval(values, level=0.95):
    """A distribution-free interval for the median of the rounds' ratios:
    the k-th smallest and k-th largest round, k the largest with
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None below 6 rounds,
    where even the whole range covers less than `level`."""
    xs = sorted(values)
    n, tail, k = len(xs), 0.0, 0
    while k < n:
        p = math.comb(n, k) / 2**n
        if tail + p > (1 - level) / 2:
            break
        tail, k = tail + p, k + 1
    return (xs[k - 1], xs[n - k]) if k else None


def verdict(values, ok):
    """PASS or FAIL by the median of the rounds' ratios, as the issue
    states its targets; with 6 rounds or more, also whether the median's
    95 % interval lies wholly on that side (the verdict is clear) or
    straddles the target (another run may read the other way)."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a (not measured)"
    med = statistics.median(values)
    text = f"{'PASS' if ok(med) else 'FAIL'}: {fmt_ratio(values)}"
    interval = median_interval(values)
    if interval:
        lo, hi = interval
        clear = "clear" if ok(lo) == ok(hi) else "undecided: it straddles the target"
        text += f"; the median's 95 % interval {lo:.2f}–{hi:.2f}, {clear}"
    return text


def print_targets(kind, summary, refs):
    print("\n#### Targets (median of the per-round ratios, min–max spread)\n")
    ref = refs[0]
    if kind == "throughput":
        g = lambda conc, method, key: summary.get((conc, method, "fencegate"), {}).get(key, [])
        print(f"- PUT, 64 connections, fencegate req/s ÷ {ref} ≥ 1.25: " + verdict(g(64, "PUT", ref), lambda m: m >= 1.25))
        print(f"- PUT, 64 connections, fencegate p99 ÷ {ref} p99 ≤ 1: " + verdict(g(64, "PUT", "p99:" + ref), lambda m: m <= 1.0))
        print(f"- GET, 64 connections, fencegate req/s ÷ {ref} ≥ 1: " + verdict(g(64, "GET", ref), lambda m: m >= 1.0))
        p = lambda conc, method, key: summary.get((conc, method, "fencegate-pipelined"), {}).get(key, [])
        if p(64, "PUT", ref):
            print(f"- with `upstream.pipeline_depth` (contender fencegate-pipelined), "
                  f"PUT, 64 connections, req/s ÷ {ref} ≥ 1.25: " + verdict(p(64, "PUT", ref), lambda m: m >= 1.25))
            print(f"- with `upstream.pipeline_depth`, PUT, 64 connections, p99 ÷ {ref} p99 ≤ 1: "
                  + verdict(p(64, "PUT", "p99:" + ref), lambda m: m <= 1.0))
            print(f"- with `upstream.pipeline_depth`, GET, 64 connections, req/s ÷ {ref} ≥ 1: "
                  + verdict(p(64, "GET", ref), lambda m: m >= 1.0))
        floor = lambda conc, method: summary.get((conc, method, "relay"), {}).get(ref, [])
        if floor(64, "PUT"):
            print(f"- the floor, a TCP relay that parses nothing (no HTTP proxy that reads and writes each message "
                  f"once on each side does less): PUT ÷ {ref} {fmt_ratio(floor(64, 'PUT'))}, "
                  f"GET ÷ {ref} {fmt_ratio(floor(64, 'GET'))}")
        for conc in sorted({k[0] for k in summary}):
            if conc == 64:
                continue
            print(f"  - at {conc}: PUT ÷ {ref} {fmt_ratio(g(conc, 'PUT', ref))}, "
                  f"p99 ÷ {ref} {fmt_ratio(g(conc, 'PUT', 'p99:' + ref))}, GET ÷ {ref} {fmt_ratio(g(conc, 'GET', ref))}")
    elif kind == "linearizable":
        for (conc, method, c), ratios in sorted(summary.items()):
            if c == ref:
                continue
            print(f"- {method}, {conc} connections, {c} req/s ÷ {ref} ≥ 0.5: "
                  + verdict(ratios.get(ref, []), lambda m: m >= 0.5))


def selftest():
    """Checks the interval against the binomial law it rests on, and the
    verdict's wording; scripts/test runs it."""
    def coverage(n, k):  # P(x_(k) <= median <= x_(n-k+1)) = 1 - 2 P(B < k)
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n
    assert median_interval([1.0] * 5) is None, "5 rounds cannot give 95 %"
    for n in range(6, 60):
        lo, hi = median_interval(list(range(1, n + 1)))
        k = int(lo)
        assert hi == n + 1 - k, (n, lo, hi)
        assert coverage(n, k) >= 0.95 > coverage(n, k + 1), (n, k)
    assert median_interval(list(range(1, 26))) == (8, 18)  # the textbook n = 25
    ok = lambda m: m >= 1.25
    assert verdict([1.3] * 9, ok).endswith("clear"), verdict([1.3] * 9, ok)
    assert verdict([1.2] * 9, ok).startswith("FAIL") and verdict([1.2] * 9, ok).endswith("clear")
    mixed = [1.1, 1.2, 1.22, 1.24, 1.26, 1.28, 1.3, 1.4, 1.5]
    assert "undecided" in verdict(mixed, ok), verdict(mixed, ok)
    assert "interval" not in verdict([1.3] * 5, ok)
    print("report.py selftest: ok")


def main(argv):
    if argv == ["selftest"]:
        selftest()
    elif len(argv) >= 2 and argv[0] == "parse-wrk":
        parse_wrk(argv[1])
    elif len(argv) >= 2 and argv[0] == "table":
        refs, targets, etcd_cpu = ["nginx"], None, False
        rest = argv[2:]
        while rest:
            if rest[0] == "--refs":
                refs = rest[1].split(",")
                rest = rest[2:]
            elif rest[0] == "--etcd-cpu":
                etcd_cpu = True
                rest = rest[1:]
            elif rest[0] == "--targets":
                targets = rest[1]
                rest = rest[2:]
            else:
                sys.exit(f"unknown argument {rest[0]}")
        table(argv[1], refs, targets, etcd_cpu)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
