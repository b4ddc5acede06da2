"""Is one cloud server fair to every end? Paced ends ("victims") against ends that take all
they can, send requests that poison batches, or sit idle holding places.

One ``coach_fx.serve`` server (1 torch thread, in this process; resnet18 with 10 classes at
32x32 split after its stem, 8 bits: the plan of ``benchmarks/serve.py``) on loopback. The
victims run in one process and the attackers in another (``runtime.loadgen``-style ends that
replay a real end's recorded requests, so that the ends cost little CPU). Each victim sends
``--rate`` requests per second with at most 4 unanswered; its rate is its replies over its
run, its p50 the median time from send to reply. Scenarios:

* ``1_greedy``: 4 victims, alone, then beside one end that keeps as many requests out as the
  server takes from one end (``session_inflight``): victim_share_1_greedy = the smallest of the
  4 victims' rate beside it over its rate alone.
* ``31_greedy``: 1 victim, alone, then beside 31 such sessions: victim_share_31_greedy, and
  its p50 beside them over alone (p50_ratio_31_greedy).
* ``poison``: 4 victims beside one end flooding requests whose scale (1.3e36) passes the wire's
  checks but whose results overflow to inf: poison_victim_ratio (the smallest victim's rate
  over alone).
* ``idle``: 64 authenticated sessions that send nothing (two addresses, 32 each), held past
  ``evict_idle_s``; then a new end: new_end_admitted = 1 if it is served.

All processes share this machine's cores (the attackers' included): a small host, not an idle
cloud. Ends with ``RESULT fairness: victim_share_1_greedy=... victim_share_31_greedy=...
poison_victim_ratio=... new_end_admitted=... p50_ratio_31_greedy=...``.

Usage: ``python benchmarks/fairness.py [--rate 20] [--seconds 8] [--quick]``
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tabulate import tabulate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import HOST, TOKEN, build_plan, start_server  # noqa: E402 - the plan and server of serve.py

from coach_fx.deploy.service import SERVE_MAX_BATCH  # noqa: E402
from coach_fx.runtime.config import Batching, ServerConfig  # noqa: E402

#: The scale a poisoning end sends: finite after dequantizing at 8 bits, inf after a layer.
POISON_SCALE = 1.3e36
VICTIM_INFLIGHT = 4


# ---------------------------------------------------------------------------- the child processes
def recorded(plan_dir: Path, n: int = 16, poison: bool = False) -> list[bytes]:
    """Requests a real end sends (its end half on random frames), poisoned if asked."""
    from coach_fx.deploy import open_plan
    from coach_fx.deploy.inputs import make_frames
    from coach_fx.runtime.codec import payload_to_entries
    from coach_fx.runtime.wire import encode

    end = open_plan(plan_dir, "end", key=TOKEN)
    out = []
    with torch.no_grad():
        for k, x in enumerate(make_frames(end.inputs, n, seed=7)):
            entries = payload_to_entries(end.boundary, end.end(*x))
            if poison:
                for e in entries:
                    if e.kind_name == "quant":
                        e.scale = POISON_SCALE
            out.append(bytes(encode(k, entries)))
    return out


def attacker(a: argparse.Namespace) -> None:
    """``--attack greedy|poison|idle``: ``--ends`` sessions that keep ``session_inflight``
    requests out (greedy, poison) or send nothing (idle), until stdin closes."""
    from coach_fx.runtime.links.tcp import connect
    from coach_fx.runtime.loadgen import with_request_id
    from coach_fx.runtime.wire import FLAG_ERROR, decode

    msgs = recorded(Path(a.plan), poison=a.attack == "poison") if a.attack != "idle" else []
    inflight = ServerConfig().session_inflight
    counts = {"replies": 0, "errors": 0, "failures": 0}
    stop = threading.Event()
    eps = []
    for k in range(a.ends):   # one address holds at most max_per_peer connections: 32 per address
        eps.append(connect(HOST, a.port, TOKEN, 60.0, source=f"127.0.3.{1 + k // 32}"))

    def flood(ep) -> None:  # noqa: ANN001 - a TcpEndpoint
        room = threading.Semaphore(inflight)

        def receive() -> None:
            while not stop.is_set():
                try:
                    flags = decode(ep.recv(60.0))[2]
                except Exception:  # noqa: BLE001 - the session is gone: counted
                    counts["failures"] += 1
                    return
                counts["errors" if flags & FLAG_ERROR else "replies"] += 1
                room.release()
        threading.Thread(target=receive, daemon=True).start()
        k = 0
        while not stop.is_set():
            if room.acquire(timeout=0.2):
                try:
                    ep.send(with_request_id(msgs[k % len(msgs)], k))
                except Exception:  # noqa: BLE001
                    counts["failures"] += 1
                    return
                k += 1

    if a.attack != "idle":
        for ep in eps:
            threading.Thread(target=flood, args=(ep,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()   # until the benchmark closes our stdin
    stop.set()
    print(json.dumps(counts), flush=True)
    for ep in eps:
        ep.close()


def victims(a: argparse.Namespace) -> None:
    """``--victims N``: N paced ends for ``--seconds``; prints each one's rate and latencies."""
    from coach_fx.runtime.loadgen import LoadSpec, run_load

    msgs = recorded(Path(a.plan))
    spec = LoadSpec(ends=a.victims, requests=int(a.rate * a.seconds), rate_hz=a.rate, inflight=VICTIM_INFLIGHT,
                    timeout_s=60.0)
    report = run_load((HOST, a.port), TOKEN, msgs, spec)
    print(json.dumps({"ends": [{"rate": len(e.replies) / report.elapsed_s, "answered": len(e.replies),
                                "errors": e.errors, "failure": e.failure,
                                "p50_ms": statistics.median(e.latencies_s) * 1e3 if e.latencies_s else None}
                               for e in report.ends], "elapsed_s": report.elapsed_s}), flush=True)


# ---------------------------------------------------------------------------- the benchmark
def child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def run_victims(plan: Path, port: int, n: int, rate: float, seconds: float) -> dict:
    p = child("--plan", str(plan), "--port", str(port), "--victims", str(n), "--rate", str(rate),
              "--seconds", str(seconds))
    out, _ = p.communicate(timeout=seconds * 10 + 120)
    res = json.loads(out.strip().splitlines()[-1])
    bad = [e for e in res["ends"] if e["failure"] or e["errors"]]
    if bad:
        raise RuntimeError(f"a victim failed: {bad}")
    return res


class Attack:
    """An attacker process for the duration of a ``with`` block."""

    def __init__(self, plan: Path, port: int, kind: str, ends: int) -> None:
        self.p = child("--plan", str(plan), "--port", str(port), "--attack", kind, "--ends", str(ends))
        self.counts: dict = {}

    def __enter__(self) -> "Attack":
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the attacker did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.p.communicate(timeout=60)
        lines = out.strip().splitlines()
        self.counts = json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="each victim's requests per second")
    ap.add_argument("--seconds", type=float, default=8.0, help="each victim run's length")
    ap.add_argument("--quick", action="store_true", help="3-second runs")
    ap.add_argument("--plan"), ap.add_argument("--port", type=int)
    ap.add_argument("--attack"), ap.add_argument("--ends", type=int, default=1)
    ap.add_argument("--victims", type=int)
    a = ap.parse_args()
    if a.attack:
        return attacker(a)
    if a.victims:
        return victims(a)
    torch.set_num_threads(1)
    seconds = 3.0 if a.quick else a.seconds
    logging.getLogger("coach_fx.runtime").setLevel(logging.ERROR)   # the attacks are expected
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan"
        build_plan(plan)
        limits = ServerConfig()
        rows, result = [], {}

        def measure(name: str, n: int, attack: tuple[str, int] | None) -> dict:
            server = start_server(plan, SERVE_MAX_BATCH, limits)
            port = server.address[1]
            result["shared_batch"] = server.shared_batch
            try:
                if attack is None:
                    res = run_victims(plan, port, n, a.rate, seconds)
                    counts: dict = {}
                else:
                    with Attack(plan, port, *attack) as att:
                        res = run_victims(plan, port, n, a.rate, seconds)
                    counts = att.counts
                st = server.snapshot()
            finally:
                server.stop()
            rates = [e["rate"] for e in res["ends"]]
            p50 = statistics.median(e["p50_ms"] for e in res["ends"])
            rows.append([name, n, f"{min(rates):.1f}", f"{statistics.mean(rates):.1f}", f"{p50:.1f}",
                         counts.get("replies", ""), counts.get("errors", ""), f"{st.mean_batch:.1f}"])
            return {"rate": min(rates), "p50": p50}

        alone4 = measure("4 victims alone", 4, None)
        greedy1 = measure("4 victims + 1 greedy", 4, ("greedy", 1))
        poison = measure("4 victims + 1 poisoning", 4, ("poison", 1))
        alone1 = measure("1 victim alone", 1, None)
        greedy31 = measure("1 victim + 31 greedy", 1, ("greedy", 31))
        result["victim_share_1_greedy"] = greedy1["rate"] / alone4["rate"]
        result["victim_share_31_greedy"] = greedy31["rate"] / alone1["rate"]
        result["poison_victim_ratio"] = poison["rate"] / alone4["rate"]
        result["p50_ratio_31_greedy"] = greedy31["p50"] / alone1["p50"]

        # 64 idle sessions, then a new end
        server = start_server(plan, SERVE_MAX_BATCH, limits)
        port = server.address[1]
        try:
            with Attack(plan, port, "idle", limits.max_ends):
                held = server.snapshot().active
                time.sleep(limits.evict_idle_s + 1.0)   # idle past evict_idle_s: the scenario itself
                try:
                    res = run_victims(plan, port, 1, a.rate, 1.0)
                    admitted = int(res["ends"][0]["answered"] == int(a.rate * 1.0))
                except RuntimeError as e:
                    print(f"the new end was not served: {e}")
                    admitted = 0
                st = server.snapshot()
        finally:
            server.stop()
        rows.append([f"1 new end, {held} idle sessions held", 1, "", "", "", "", "", f"{st.mean_batch:.1f}"])
        result["new_end_admitted"] = admitted

    print(tabulate(rows, headers=["scenario", "victims", "min rate /s", "mean rate /s", "p50 ms",
                                  "attacker replies", "attacker errors", "mean batch"]))
    shared = result.pop("shared_batch")
    print(f"\nvictims paced at {a.rate:g} requests/s each, {seconds:g} s runs, at most {VICTIM_INFLIGHT} "
          f"unanswered; attackers keep {limits.session_inflight} out per session; batches of up to "
          f"{SERVE_MAX_BATCH}, {shared} while ends share the server (shared_latency "
          f"{Batching().shared_latency:g})")
    print("RESULT fairness: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in result.items()))


if __name__ == "__main__":
    main()
