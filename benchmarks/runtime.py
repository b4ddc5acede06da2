"""Runtime benchmark.

    python benchmarks/runtime.py [--frames 60] [--quick]

(a) overhead: a split with 32 bits, no bandwidth limit, in-process, one request at a time,
    against the eager model (ratio of per-frame times, both measured in this run);
(b) link efficiency: goodput over the configured rate for 10 KB, 100 KB and 1 MB messages over
    gloo between two processes on loopback, paced by the sender's token bucket;
(c) predicted against measured throughput and latency for resnet18 and mobilenet_v2 at end
    slowdown 4 and 20 Mbit/s (coach plan, measured and calibrated costs, in-process pipeline,
    one torch thread per stage), and the pipeline's speedup over one-at-a-time.

Ends with ``RESULT runtime: overhead_ratio=... link_efficiency_100k=... link_efficiency_1m=...
throughput_error=... pipeline_speedup=...``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import coach_fx
from coach_fx.zoo.models import load_model

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def overhead(frames: int) -> dict:
    torch.set_num_threads(1)
    model, shape = load_model("resnet18")
    x = torch.randn(1, *shape)
    cm = coach_fx.compile(model, (x,), strategy="end-only", costs="analytic", progress=False)
    dag = cm.dag
    end = sorted(dag.ancestors([dag.nodes[len(dag) // 2]]), key=dag.index.get)
    cm = coach_fx.compile(model, (x,), strategy="manual", end_nodes=end, bits=32, costs="analytic",
                          progress=False, network=coach_fx.Network(1e6), threads=1,
                          end=coach_fx.Device("end", 1.0))
    xs = [torch.randn(1, *shape) for _ in range(frames)]
    def eager() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for f in xs:
                model(f)
            return (time.perf_counter() - t0) / len(xs)
    def split() -> float:
        t0 = time.perf_counter()
        cm.stream(xs, pipelined=False)
        return (time.perf_counter() - t0) / len(xs)
    eager(), split()   # warm-up
    e, s, r = [], [], []
    for _ in range(9):   # adjacent pairs, so that drift on this shared machine hits both alike
        e.append(eager())
        s.append(split())
        r.append(s[-1] / e[-1])
    return {"eager ms (median)": sorted(e)[4] * 1e3, "split ms (median)": sorted(s)[4] * 1e3,
            "ratio (median of 9 pairs)": sorted(r)[4], "ratio min": min(r), "ratio max": max(r),
            "crossing": len(cm.plan.cut)}


def link_efficiency(size: int, mbps: float, seconds: float = 3.0) -> dict:
    count = max(5, int(seconds * mbps * 1e6 / 8 / size))
    port = free_port()
    peer = str(HERE / "link_peer.py")
    cloud = subprocess.Popen([sys.executable, peer, "cloud", str(port), str(size), str(count), str(mbps)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = subprocess.run([sys.executable, peer, "end", str(port), str(size), str(count), str(mbps)],
                         capture_output=True, text=True, timeout=300)
    out, err = cloud.communicate(timeout=120)
    if end.returncode or cloud.returncode:
        raise RuntimeError(f"link peer failed: {end.stderr[-500:]} {err[-500:]}")
    r = json.loads(out.strip().splitlines()[-1])
    goodput = r["bytes"] * 8 / r["seconds"] / 1e6
    return {"payload": size, "configured Mbit/s": mbps, "messages": count, "goodput Mbit/s": goodput,
            "efficiency": goodput / mbps}


def pipeline(name: str, frames: int) -> dict:
    model, shape = load_model(name)
    x = torch.randn(1, *shape)
    cm = coach_fx.compile(model, (x,), network=coach_fx.Network(20), end=coach_fx.Device("end", 4),
                          threads=1, progress=False, profile_repeat=7)
    xs = [torch.randn(1, *shape) for _ in range(frames)]
    cm.stream(xs[:10])                         # warm-up
    cm.remeasure(repeat=9)                     # fresh whole-half figures for the plan
    _, piped = cm.stream(xs)
    _, seq = cm.stream(xs[: max(10, frames // 3)], pipelined=False)
    p = cm.plan
    return {"model": name, "cut": ",".join(p.cut), "bits": "/".join(map(str, sorted(set(p.bits.values())))),
            "pred T_end/T_link/T_cloud ms": f"{p.t_end*1e3:.1f}/{p.t_link*1e3:.1f}/{p.t_cloud*1e3:.1f}",
            "meas stages ms": "/".join(f"{v*1e3:.1f}" for v in piped.stage_means),
            "pred thr/s": p.throughput, "meas thr/s": piped.throughput,
            "thr err": abs(piped.throughput - p.throughput) / p.throughput,
            "pred lat ms": p.latency * 1e3, "meas lat p50 ms": seq.pct(0.5) * 1e3,
            "pipelined p50 ms": piped.pct(0.5) * 1e3,
            "one-at-a-time thr/s": seq.throughput, "speedup": piped.throughput / seq.throughput,
            "pred bubble": p.bubble_ratio, "meas bubble": piped.bubble_ratio}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    frames = 20 if a.quick else a.frames
    print("(a) overhead: resnet18 cut in the middle, 32 bits, unlimited in-process link, one at a time")
    oh = overhead(20)
    print(tabulate([oh], headers="keys", floatfmt=".3f"))
    print("\n(b) link efficiency over gloo on loopback (token bucket in the sender)")
    links = [link_efficiency(s, 50.0, 1.5 if a.quick else 3.0) for s in (10_000, 100_000, 1_000_000)]
    print(tabulate(links, headers="keys", floatfmt=".3f"))
    print("\n(c) predicted vs measured: end slowdown 4, 20 Mbit/s, coach plan, in-process pipeline")
    rows = [pipeline(m, frames) for m in ("resnet18", "mobilenet_v2")]
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    balanced = min(rows, key=lambda r: r["pred bubble"])
    eff = {r["payload"]: r["efficiency"] for r in links}
    print(f"RESULT runtime: overhead_ratio={oh['ratio (median of 9 pairs)']:.3f} link_efficiency_10k={eff[10_000]:.3f} "
          f"link_efficiency_100k={eff[100_000]:.3f} link_efficiency_1m={eff[1_000_000]:.3f} "
          f"throughput_error={max(r['thr err'] for r in rows):.3f} "
          f"pipeline_speedup={balanced['speedup']:.2f} pipeline_speedup_model={balanced['model']}")


if __name__ == "__main__":
    main()
