"""Helper for test_tbf.py: one side of a gloo link inside a network namespace.

    python netns_peer.py end|cloud HOST PORT SECONDS LOGFILE

The end sends 16 KB messages as fast as the link takes them for SECONDS; the cloud logs the
monotonic time and size of every message it receives (JSON lines) until the end says stop.
"""

import json
import sys
import time

from coach_fx.runtime.links.gloo import GlooEndpoint

role, host, port, seconds, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
ep = GlooEndpoint(role, host, port, timeout_s=60)
if role == "end":
    msg = b"x" * 16384
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        ep.send(msg)
    ep.send(b"stop")
else:
    with open(log, "w") as f:
        while True:
            m = ep.recv(timeout=60)
            if m == b"stop":
                break
            f.write(json.dumps([time.monotonic(), len(m)]) + "\n")
            f.flush()
ep.close()
