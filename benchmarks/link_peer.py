"""Peer process for benchmarks/runtime.py (b): one side of a gloo link on loopback.

    python benchmarks/link_peer.py end|cloud PORT SIZE COUNT MBPS

The end sends COUNT messages of SIZE bytes paced by a token bucket at MBPS; the cloud prints
one JSON line: bytes and seconds between the first and the last arrival.
"""

import json
import sys
import time

from coach_fx.runtime.links.gloo import GlooEndpoint
from coach_fx.runtime.traces import Trace

role, port, size, count, mbps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ep = GlooEndpoint(role, "127.0.0.1", port, timeout_s=60, shape=Trace.constant(mbps) if role == "end" else None)
if role == "end":
    msg = b"x" * size
    for _ in range(count):
        ep.send(msg)
    ep.send(b"")
else:
    times, total = [], 0
    while True:
        m = ep.recv(timeout=60)
        if not m:
            break
        times.append(time.monotonic())
        total += len(m)
    # the first message's own transfer time is unknown: count the bytes after it
    print(json.dumps({"bytes": total - size, "seconds": times[-1] - times[0], "messages": len(times)}))
ep.close()
