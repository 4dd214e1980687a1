#!/usr/bin/env python3
"""Server CPU per task, per thread group, for scripts/bench.sh.

cpusample.py PID N OUT READY STOP
Reads /proc/PID/task/*/stat (utime + stime) when started (then creates READY), every 50 ms
until the file STOP exists, then writes to OUT 'key value' lines: CPU microseconds per task
(N tasks) in all (from /proc/PID/stat, threads that exited included) and per thread group
(http: connection, accept and refusal threads, WebSocket connections included; worker;
store-writer (with the checkpoint thread); outcome; timer; kafka: the poll and result threads and librdkafka's; other).
"""
import os
import sys
import time

pid, n, out, ready, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
HZ = os.sysconf("SC_CLK_TCK")


def parse(text):
    r = text.rindex(")")
    f = text[r + 2:].split()
    return text[text.index("(") + 1:r], int(f[11]) + int(f[12])


def total():
    with open(f"/proc/{pid}/stat") as fh:
        return parse(fh.read())[1]


def snap(seen):
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as fh:
                seen[t] = parse(fh.read())
        except (FileNotFoundError, ProcessLookupError):
            continue


def group(comm):
    if comm.startswith("http"):
        return "http"
    if comm.startswith("worker-"):
        return "worker"
    if comm == "store-ckpt":
        return "store-writer"  # the checkpoints it writes were the writer's own work before
    if comm.startswith("outcome"):
        return "outcome"  # deciding, and acting once durable
    if comm in ("store-writer", "timer"):
        return comm
    if comm.startswith("kafka") or comm.startswith("rdk:"):
        return "kafka"
    return "other"


base = {}
snap(base)
t0 = total()
open(ready, "w").close()
seen = {}
while not os.path.exists(stop):
    snap(seen)
    time.sleep(0.05)
snap(seen)
t1 = total()
groups = {}
for t, (comm, ticks) in seen.items():
    g = group(comm)
    groups[g] = groups.get(g, 0) + ticks - base.get(t, (comm, 0))[1]
per_task = lambda ticks: ticks * 1e6 / HZ / max(n, 1)
with open(out, "w") as fh:
    fh.write(f"cpu_us_per_task {per_task(t1 - t0):.1f}\n")
    for g in ("http", "store-writer", "worker", "outcome", "timer", "kafka", "other"):
        fh.write(f"cpu_{g.replace('-', '_')}_us_per_task {per_task(groups.get(g, 0)):.1f}\n")
