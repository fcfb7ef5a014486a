#!/usr/bin/env python3
"""A resident "service" for bench/replay.py: holds MIB MiB and works on it.

    svc.py NAME MIB [PERIOD]

Allocates and touches MIB MiB, then every PERIOD seconds (default 2) writes
one byte in every page (a database walking its buffer cache) and records how
long that took: a service stalled by memory pressure shows it here. The
status (pid, MiB, passes, the slowest pass) is rewritten to /run/svc-NAME.json
after every pass.
"""
import json
import os
import sys
import time

name, mib = sys.argv[1], int(sys.argv[2])
period = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
buf = bytearray(mib << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
status = f"/run/svc-{name}.json"
passes, worst, worst_at, last = 0, 0.0, 0.0, 0.0
while True:
    t = time.monotonic()
    for i in range(0, len(buf), 4096):
        buf[i] = (buf[i] + 1) & 0xFF
    last = time.monotonic() - t
    passes += 1
    if last > worst:
        worst, worst_at = last, time.time()
    tmp = status + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": os.getpid(), "mib": mib, "passes": passes, "last_s": round(last, 3),
                   "worst_s": round(worst, 3), "worst_at": worst_at, "time": time.time()}, fh)
    os.replace(tmp, status)
    time.sleep(max(0.0, period - last))
