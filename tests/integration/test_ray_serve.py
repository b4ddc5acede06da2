"""``coach serve --engine ray``: the cloud halves on two Ray Serve replicas (a local Ray)
behind coach's own front door. Eight generated ends and one real ``connect()`` end; every
answer equals the built-in server's, in order; a replica killed mid-stream (Ray restarts it)
loses no request of an end with ``fallback="local"``. Outcomes only (counts, equality,
order)."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import coach_fx
from coach_fx.runtime.loadgen import LoadSpec, record, run_load
from coach_fx.runtime.session import RequestFailed
from coach_fx.runtime.wire import STATS, decode

pytest.importorskip("ray.serve", reason="the Ray Serve extra: pip install '.[ray]'")

TOKEN = b"a shared secret for the test"   # conftest.PLAN_TOKEN: the plan fixture is signed with it
COACH = str(Path(sys.executable).with_name("coach"))
ENV = {**os.environ, "COACH_TOKEN": TOKEN.decode(), "RAY_AUTH_MODE": "disabled"}
SPEC = LoadSpec(ends=8, requests=30, inflight=4, timeout_s=120)


def outputs(report):
    """Per generated end: (request id, the answer's tensors) in arrival order (the reply's
    timing figures left out: they differ from run to run)."""
    return [[(req, [e.value() for e in decode(r)[3] if e.kind != STATS]) for req, r in end.replies]
            for end in report.ends]


def same(a, b):
    """The same answers to the same requests in the same order; equal up to float rounding:
    which requests share a batch depends on timing, and a batch of 16 rounds differently
    from a batch of 3 (in either server)."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(i == j and all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(p, q))
                                 for (i, p), (j, q) in zip(x, y)) for x, y in zip(a, b))


def replica_pids():
    """The processes of the Serve replicas (Ray names them ``ray::ServeReplica:...``)."""
    out = subprocess.run(["pgrep", "-f", "ServeReplica"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_replicas_answer_as_the_builtin_server_and_a_killed_one_loses_nothing(plan):
    cm, m, d = plan
    frames = [(torch.randn(1, 3, 8, 8),) for _ in range(12)]
    msgs = record(cm, frames)
    with coach_fx.serve(d, port=0, token=TOKEN) as builtin:
        want = run_load(builtin.address, TOKEN, msgs, SPEC)
    assert [e.failure for e in want.ends] == [None] * SPEC.ends and want.answered == SPEC.ends * SPEC.requests

    proc = subprocess.Popen([COACH, "serve", str(d), "--port", "0", "--engine", "ray", "--replicas", "2",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    try:
        lines = []
        for line in proc.stdout:   # Ray's own start-up lines come first
            lines.append(line)
            if line.startswith("coach serve:"):
                break
        port = re.search(r" on [\d.]+:(\d+) ", lines[-1])
        assert port and "2 replica(s)" in lines[-1], "".join(lines)
        address = ("127.0.0.1", int(port.group(1)))
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()

        # 8 generated ends and one real end at once
        real: list = []
        xs = [torch.randn(1, 3, 8, 8) for _ in range(40)]

        def real_end():
            with coach_fx.connect(d, address, token=TOKEN, fallback="local") as rm:
                real.extend(rm.stream(xs))

        t = threading.Thread(target=real_end)
        t.start()
        got = run_load(address, TOKEN, msgs, SPEC)
        t.join(300)
        assert [e.failure for e in got.ends] == [None] * SPEC.ends
        assert same(outputs(got), outputs(want))            # every answer, in order
        with torch.no_grad():
            assert len(real) == len(xs) and all(torch.allclose(r, m(x), atol=1e-2) for x, r in zip(xs, real))

        # a replica killed mid-stream: Ray restarts it; the end loses no request
        pids = replica_pids()
        assert len(pids) == 2, pids
        again: list = []
        with coach_fx.connect(d, address, token=TOKEN, fallback="local") as rm:
            for k, r in enumerate(rm.stream(xs * 3)):
                again.append(r)
                if k == 20:
                    os.kill(pids[0], signal.SIGKILL)
            outcomes = rm.outcomes
        assert len(again) == 3 * len(xs) and not any(isinstance(r, RequestFailed) for r in again)
        with torch.no_grad():
            assert all(torch.allclose(r, m(x), atol=1e-2) for x, r in zip(xs * 3, again))
        print(f"after the kill: {outcomes.fell_back} request(s) answered on the end, the rest by the replicas")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    summary = [ln for ln in lines if ln.startswith("coach serve:")]
    assert proc.returncode == 0 and "served" in summary[-1], "".join(lines[-20:])
