#!/usr/bin/env python3
"""Reads a poulpe server's /metrics and prints the bucket bounds (ms) under which 50 % and 99 %
of its outcomes were durable after their attempt ended (`poulpe_outcome_lag_seconds`).

Usage: outcomelag.py PORT   (prints `srv_lag_p50_le_ms X` and `srv_lag_p99_le_ms Y`)
"""
import re
import sys
import urllib.request

port = sys.argv[1]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
buckets = [
    (m.group(1), int(m.group(2)))
    for m in re.finditer(r'^poulpe_outcome_lag_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M)
]
total = buckets[-1][1] if buckets else 0
for q, name in ((0.5, "p50"), (0.99, "p99")):
    for le, count in buckets:
        if total and count >= q * total:
            bound = "inf" if le == "+Inf" else f"{float(le) * 1000:g}"
            print(f"srv_lag_{name}_le_ms {bound}")
            break
