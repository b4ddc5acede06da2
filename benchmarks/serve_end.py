"""One end process of ``benchmarks/serve.py`` (not meant to be run by hand).

    COACH_TOKEN=... python benchmarks/serve_end.py PLAN_DIR INDEX

Loads the end half of the saved plan (the manifest checked under ``$COACH_TOKEN``), runs
it a few times so that the first measured frames are not a fresh module's slow ones, then
answers commands, one JSON object a line on stdin, with one JSON object a line on stdout
(JSON only, nothing pickled):

* ``{"op": "connect", "host": H, "port": P, "frames": N}``: dial the cloud (a real
  authenticated ``connect``), make ``N`` frames (seeded by ``INDEX``), answer
  ``{"ready": true, "connect_s": ...}``;
* ``{"op": "go"}``: stream the frames through an ``EndWorker`` as fast as its pipeline
  allows, close the session, answer with the wall-clock start and finish of the stream
  (``time.time()``: one clock for all processes) and every request's latency;
* ``{"op": "handshake", "host": H, "port": P, "tries": K}``: ``K`` times connect, close the
  session cleanly (close request, its acknowledgement), answer every ``connect()`` time;
* ``{"op": "quit"}`` (or end of input): exit.
"""

from __future__ import annotations

import json
import sys
import time


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from coach_fx.deploy import open_plan
    from coach_fx.deploy.inputs import make_frames
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.end import EndWorker
    from coach_fx.runtime.links.credentials import shared_token
    from coach_fx.runtime.links.tcp import connect
    from coach_fx.runtime.policy import StaticPolicy
    from coach_fx.runtime.wire import CLOSE_ID, FLAG_CONTROL, encode

    plan_dir, index = sys.argv[1], int(sys.argv[2])
    token = shared_token(None)   # $COACH_TOKEN: never on the command line
    half = open_plan(plan_dir, "end", key=token)
    with torch.no_grad():   # a fresh exported module's first runs are several times slower
        warm = make_frames(half.inputs, 1, seed=10_000 + index)[0]
        for _ in range(20):
            half.end(*warm)
    reply({"loaded": True})

    worker = frames = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            frames = make_frames(half.inputs, int(cmd["frames"]), seed=index)
            t0 = time.perf_counter()
            ep = connect(cmd["host"], int(cmd["port"]), token, timeout_s=30.0, retry_for=10.0)
            took = time.perf_counter() - t0
            worker = EndWorker(ep, half.out_spec, StaticPolicy(half.end, half.boundary),
                               StreamConfig(timeout_s=30.0))
            reply({"ready": True, "connect_s": took})
        elif op == "go":
            assert worker is not None and frames is not None, "go before connect"
            t_start = time.time()
            outs, stats = worker.run(frames)
            t_finish = time.time()
            worker.close()
            worker.endpoint.close()
            bad = sum(1 for o in outs if not isinstance(o, torch.Tensor))
            reply({"n": stats.n, "bad": bad, "t_start": t_start, "t_finish": t_finish,
                   "latencies": stats.latencies})
            worker = frames = None
        elif op == "handshake":
            times = []
            for _ in range(int(cmd["tries"])):
                t0 = time.perf_counter()
                ep = connect(cmd["host"], int(cmd["port"]), token, timeout_s=30.0)
                times.append(time.perf_counter() - t0)
                ep.send(encode(CLOSE_ID, [], FLAG_CONTROL))
                ep.recv(10.0)   # the close's acknowledgement: the session ended cleanly
                ep.close()
                time.sleep(0.05)
            reply({"connect_s": times})
        elif op == "quit":
            break
        else:
            raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    main()
