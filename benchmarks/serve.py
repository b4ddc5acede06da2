"""Serving benchmark: one cloud server shared by 1, 4 and 16 end processes on loopback.

    python benchmarks/serve.py [--frames 200] [--rounds 3] [--server-threads 1] [--quick]

The model: torchvision resnet18 (10 classes, random weights) on 1x3x32x32 inputs, split by
hand right after its stem (``conv1, bn1, relu`` on the end, 8-bit crossing of 64x16x16), so
that the cloud half is nearly all the work and batching pays (its time per request falls
about 8x from a batch of 1 to 32; measured and printed). The plan is saved signed with a
token and served with ``coach_fx.serve`` in this process (its default batching: up to
``SERVE_MAX_BATCH`` = 32 requests, the first held at most 2 ms; ``--server-threads`` torch threads, default 1: on a 2-core host that
the ends share, 2 cost more CPU per request and gained nothing). Each end is a process of
its own (``benchmarks/serve_end.py``, one torch thread): it loads the end half from the plan
directory, dials the server with a real authenticated ``connect`` and streams ``--frames``
frames through an ``EndWorker`` as fast as its pipeline allows (up to 8 requests in flight).
The 16 end processes are started once and reused by every configuration; the ends of a
configuration connect first, then start together; each reports (JSON lines, no pickle) its
wall-clock start and finish and every request's latency (``Stats.latencies``: from the end
taking the frame up, a wait for one of its 8 in-flight slots included, to its result).

Per configuration (1, 4, 16 ends with batching; 1 and 16 ends with ``max_batch=1``, no
batching), on a fresh server: aggregate throughput = all requests / (last finish - first
start), latency percentiles over all requests of all ends, the server's mean batch
(``CloudServer.snapshot().mean_batch``), the CPU time per request of the server process and
of the end processes, and the cores that other processes of this machine kept busy
meanwhile (``/proc/stat``; a shared host is not idle). ``--rounds`` rounds of all
configurations: scaling_N = throughput with N ends / with 1 end (batching) of the same
round, its median over rounds; nobatch_16 = the same for 16 ends with ``max_batch=1``.

Then the handshake under idle connections: a real end's ``connect()`` time (median of
``--tries``) on a fresh server (``handshake_s=60``, so that silent connections are held, not
dropped after 2 s), first alone, then while 200 idle raw TCP connections from 127.0.0.2
are held open against it (the server holds ``max_handshakes_per_peer`` of them in their handshake and
turns the rest away).

All processes share this machine's cores: ends and server compete for them, so this
measures the server's batching on a small host, not an idle cloud. Ends with
``RESULT serve: scaling_4=... scaling_16=... p95_ms_16=... batch_16=... nobatch_16=...
handshake_ms_200_idle=...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import coach_fx
from coach_fx.deploy.service import SERVE_MAX_BATCH
from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig

HERE = Path(__file__).resolve().parent
TOKEN = b"serve benchmark shared token 0123456789"
HOST = "127.0.0.1"
IDLE_PEER = "127.0.0.2"
MAX_WAIT_S = 0.002


# ---------------------------------------------------------------------------- the plan
def build_plan(plan_dir: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    cm = coach_fx.compile(model, (x,), strategy="manual", end_nodes=["conv1", "bn1", "relu"],
                          bits=8, costs="analytic", progress=False)
    cm.save(str(plan_dir), key=TOKEN)
    from coach_fx.deploy import open_plan
    if open_plan(plan_dir, "cloud", key=TOKEN).cloud[0].batched is None:
        raise SystemExit("the saved plan has no batched cloud half: the server would not batch")


def cloud_alone(plan_dir: Path, batches: tuple[int, ...] = (1, 16), repeat: int = 20) -> dict[int, float]:
    """The batched cloud half's time per request (ms) at each batch size, run alone in this
    process (median of ``repeat``): how much batching can save before any serving overhead."""
    from coach_fx.deploy import open_plan
    from coach_fx.deploy.inputs import make_frames
    from coach_fx.runtime.codec import payload_to_floats

    end, cloud = open_plan(plan_dir, "end", key=TOKEN), open_plan(plan_dir, "cloud", key=TOKEN).cloud[0]
    out = {}
    with torch.no_grad():
        floats = payload_to_floats(cloud.boundary, end.end(*make_frames(end.inputs, 1)[0]))
        for b in batches:
            xs = [torch.cat([v] * b) for v in floats]
            for _ in range(5):
                cloud.batched(*xs)
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                cloud.batched(*xs)
                ts.append(time.perf_counter() - t0)
            out[b] = statistics.median(ts) / b * 1e3
    return out


def warm_server(server, plan_dir: Path, max_batch: int) -> None:  # noqa: ANN001 - a CloudServer
    """Run the server's cloud halves once per batch size before the ends come (a fresh
    exported module's first runs are several times slower)."""
    from coach_fx.runtime.codec import payload_to_floats
    from coach_fx.deploy import open_plan
    from coach_fx.deploy.inputs import make_frames

    end = open_plan(plan_dir, "end", key=TOKEN)
    half = server.engine.plans[0]
    with torch.no_grad():
        payload = end.end(*make_frames(end.inputs, 1, seed=123)[0])
        for _ in range(5):
            half.module(*payload)
        floats = payload_to_floats(half.boundary, payload)
        if half.batched is not None and floats is not None:
            for b in range(1, max_batch + 1):
                for _ in range(2):
                    half.batched(*(torch.cat([v] * b) for v in floats))


# ---------------------------------------------------------------------------- end processes
class End:
    """One end process (``serve_end.py``) and its command pipe."""

    def __init__(self, plan_dir: Path, index: int, logdir: Path) -> None:
        env = {**os.environ, "COACH_TOKEN": TOKEN.decode(), "OMP_NUM_THREADS": "1"}
        self.err_path = logdir / f"end{index}.err"
        self.err = open(self.err_path, "w")
        self.p = subprocess.Popen([sys.executable, str(HERE / "serve_end.py"), str(plan_dir), str(index)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                  text=True, bufsize=1, env=env)

    def send(self, **cmd: object) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def answer(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.err.flush()
                raise RuntimeError(f"end process {self.p.pid} exited ({self.p.poll()}):\n"
                                   + self.err_path.read_text()[-3000:])
            if line.startswith("{"):
                return json.loads(line)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.p.pid)

    def close(self) -> None:
        try:
            self.send(op="quit")
            self.p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.err.close()


def host_busy_s() -> float:
    """CPU time all processes of this machine have spent so far (Linux ``/proc/stat``: all
    but idle and iowait; NaN elsewhere): minus this benchmark's own, what others took."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------- measurements
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def start_server(plan_dir: Path, max_batch: int, limits: ServerConfig = ServerConfig()):  # noqa: ANN201
    server = coach_fx.serve(plan_dir, HOST, 0, token=TOKEN, limits=limits,
                            config=StreamConfig(timeout_s=30.0, batching=Batching(
                                max_batch, MAX_WAIT_S if max_batch > 1 else 0.0)))
    warm_server(server, plan_dir, max_batch)
    return server


def run_config(plan_dir: Path, ends: list[End], n_ends: int, max_batch: int, frames: int) -> dict:
    server = start_server(plan_dir, max_batch)
    port = server.address[1]
    group = ends[:n_ends]
    try:
        for e in group:
            e.send(op="connect", host=HOST, port=port, frames=frames)
        for e in group:
            e.answer()
        cpu0 = [e.cpu_s() for e in group]
        srv0, host0 = proc_cpu_s(), host_busy_s()
        for e in group:
            e.send(op="go")
        res = [e.answer() for e in group]
        srv1, host1 = proc_cpu_s(), host_busy_s()
        cpu1 = [e.cpu_s() for e in group]
        deadline = time.monotonic() + 10   # the last sessions' writers finish after the close ack
        while server.snapshot().active and time.monotonic() < deadline:
            time.sleep(0.01)
        st = server.snapshot()
    finally:
        server.stop()
    n = sum(r["n"] for r in res)
    bad = sum(r["bad"] for r in res)
    wall = max(r["t_finish"] for r in res) - min(r["t_start"] for r in res)
    lat = [x for r in res for x in r["latencies"]]
    return {"ends": n_ends, "max_batch": max_batch, "requests": n, "bad": bad, "wall_s": wall,
            "throughput": n / wall, "p50_ms": pct(lat, 0.5) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "served": st.served, "batches": st.batches,
            "mean_batch": st.mean_batch, "server_cpu_ms": (srv1 - srv0) / n * 1e3,
            "ends_cpu_ms": (sum(cpu1) - sum(cpu0)) / n * 1e3,
            # cores busy over the run: this benchmark's processes, and everything else
            "ours_cores": (srv1 - srv0 + sum(cpu1) - sum(cpu0)) / wall,
            "other_cores": (host1 - host0 - (srv1 - srv0) - (sum(cpu1) - sum(cpu0))) / wall, "latencies": lat}


def handshakes(plan_dir: Path, end: End, tries: int, idle: int) -> dict:
    limits = ServerConfig(handshake_s=60.0)
    # the idle connections' refusals and turn-aways are expected here: counted, not logged
    logging.getLogger("coach_fx.runtime").setLevel(logging.ERROR)
    server = start_server(plan_dir, SERVE_MAX_BATCH, limits)
    port = server.address[1]
    socks: list[socket.socket] = []
    try:
        end.send(op="handshake", host=HOST, port=port, tries=tries)
        alone = end.answer()["connect_s"]
        for _ in range(idle):
            socks.append(socket.create_connection((HOST, port), source_address=(IDLE_PEER, 0)))
        expect = max(0, idle - min(limits.max_per_peer, limits.max_handshakes_per_peer))
        deadline = time.monotonic() + 20
        while server.snapshot().turned_away < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        before = server.snapshot()
        end.send(op="handshake", host=HOST, port=port, tries=tries)
        loaded = end.answer()["connect_s"]
        after = server.snapshot()
    finally:
        for s in socks:
            s.close()
        server.stop()
    return {"alone_ms": [t * 1e3 for t in alone], "idle_ms": [t * 1e3 for t in loaded],
            "turned_away": before.turned_away, "refused": after.refused,
            "sessions": after.sessions, "held": idle - before.turned_away}


# ---------------------------------------------------------------------------- main
def combine(rs: list[dict], scalings: list[float]) -> dict:
    """One configuration over all rounds: median throughput and scaling (each round's scaling
    against that round's 1-end run), latencies of all rounds pooled, batches and CPU summed."""
    lat = [x for r in rs for x in r["latencies"]]
    n = sum(r["requests"] for r in rs)
    return {"ends": rs[0]["ends"], "max_batch": rs[0]["max_batch"], "requests": n,
            "bad": sum(r["bad"] for r in rs),
            "throughput": statistics.median(r["throughput"] for r in rs),
            "scaling": statistics.median(scalings),
            "p50_ms": pct(lat, 0.5) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "mean_batch": sum(r["served"] for r in rs) / max(1, sum(r["batches"] for r in rs)),
            "server_cpu_ms": sum(r["server_cpu_ms"] * r["requests"] for r in rs) / n,
            "ends_cpu_ms": sum(r["ends_cpu_ms"] * r["requests"] for r in rs) / n,
            "other_cores": statistics.mean(r["other_cores"] for r in rs)}


def row(name: str, r: dict, scaling: float) -> list[str]:
    return [name, f"{r['requests']} ({r['bad']})", f"{r['throughput']:.1f}", f"{scaling:.2f}",
            f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['mean_batch']:.2f}",
            f"{r['server_cpu_ms']:.2f}", f"{r['ends_cpu_ms']:.2f}", f"{r['other_cores']:.2f}"]


HEADERS = ["requests (bad)", "throughput /s", "scaling", "p50 ms", "p95 ms", "mean batch",
           "server CPU ms/req", "ends CPU ms/req", "other load (cores)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200, help="frames each end streams")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all configurations")
    ap.add_argument("--tries", type=int, default=5, help="connect() timings per handshake case")
    ap.add_argument("--idle", type=int, default=200, help="idle connections from 127.0.0.2")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--quick", action="store_true", help="50 frames per end, 1 round, 3 handshake tries")
    a = ap.parse_args()
    if a.quick:
        a.frames, a.rounds, a.tries = min(a.frames, 50), 1, min(a.tries, 3)
    t_all = time.perf_counter()
    B = SERVE_MAX_BATCH   # the server's default, as coach serve runs it
    configs = [(1, B), (4, B), (16, B), (1, 1), (16, 1)]
    n_max = max(n for n, _ in configs)
    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    scal: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="coach_serve_") as tmp:
        tmp_path = Path(tmp)
        plan_dir = tmp_path / "plan"
        build_plan(plan_dir)
        torch.set_num_threads(a.server_threads)
        alone_ms = cloud_alone(plan_dir, (1, B))
        ends = [End(plan_dir, i, tmp_path) for i in range(n_max)]
        try:
            for e in ends:
                e.answer()   # loaded and warm
            for k in range(a.rounds):
                for n, mb in configs:
                    r = run_config(plan_dir, ends, n, mb, a.frames)
                    runs[(n, mb)].append(r)
                    scal[(n, mb)].append(r["throughput"] / runs[(1, B)][k]["throughput"])
                    print(f"round {k + 1}: {n} end(s), max_batch={mb}: {r['throughput']:.1f} /s, "
                          f"mean batch {r['mean_batch']:.2f}", file=sys.stderr, flush=True)
            hs = handshakes(plan_dir, ends[0], a.tries, a.idle)
        finally:
            for e in ends:
                e.close()

    total = {c: combine(runs[c], scal[c]) for c in configs}
    for c in configs:
        rows = [row(f"round {k + 1}", r, s) for k, (r, s) in enumerate(zip(runs[c], scal[c]))]
        rows.append(row("all (median, pooled)", total[c], total[c]["scaling"]))
        print(tabulate(rows, headers=[f"{c[0]} end(s), max_batch={c[1]}", *HEADERS], disable_numparse=True))
        print()
    print(tabulate([[f"{c[0]}", f"{c[1]}", *row("", total[c], total[c]["scaling"])[2:]] for c in configs],
                   headers=["ends", "max_batch", *HEADERS[1:]], disable_numparse=True))
    print()
    alone, idle = statistics.median(hs["alone_ms"]), statistics.median(hs["idle_ms"])
    print(tabulate([["none", f"{alone:.2f}", " ".join(f"{t:.1f}" for t in hs["alone_ms"])],
                    [f"{a.idle} from {IDLE_PEER} ({hs['held']} held in handshake, "
                     f"{hs['turned_away']} turned away)", f"{idle:.2f}",
                     " ".join(f"{t:.1f}" for t in hs["idle_ms"])]],
                   headers=["idle connections", "connect() median ms", "tries ms"], disable_numparse=True))
    print(f"\ncloud half alone (this process, before the ends start): {alone_ms[1]:.2f} ms per request "
          f"at batch 1, {alone_ms[B]:.2f} ms at batch {B} ({alone_ms[1] / alone_ms[B]:.1f}x)")
    print(f"server torch threads {a.server_threads}, end processes 1 thread each, {os.cpu_count()} CPUs; "
          f"{a.frames} frames per end, {a.rounds} round(s); took {time.perf_counter() - t_all:.0f} s")
    t16 = total[(16, B)]
    print(f"RESULT serve: scaling_4={total[(4, B)]['scaling']:.3f} scaling_16={t16['scaling']:.3f} "
          f"p95_ms_16={t16['p95_ms']:.1f} batch_16={t16['mean_batch']:.2f} "
          f"nobatch_16={total[(16, 1)]['scaling']:.3f} handshake_ms_200_idle={idle:.2f}")


if __name__ == "__main__":
    main()
