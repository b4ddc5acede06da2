"""Scale-out benchmark: many ends sharing one cloud.

    python benchmarks/scale.py [--ends 16] [--requests 40] [--skip-ray]

Three tables:

1. **Load-aware plans (simulated).** torchvision resnet18 (random weights, 224x224), the end
   8x slower than this host, a 20 Mbit/s uplink per end, costs measured on this host (so that
   the measured table below runs the plans on the host they were made for); the cloud's batching
   efficiency measured on this host (``profile.measure_batch_efficiency``: the cloud half's
   seconds per request in a batch of K / alone). For K = 1, 4, 16, 64 ends the plan made for
   ``Device("cloud", ends=K)`` against the plan made for one end, both priced for K ends:
   the cut, the period of each end, the aggregate throughput K / period.
2. **Load-aware plans (measured, K <= 16).** Each plan saved and served by the built-in
   server on this host; K generated ends (``runtime.loadgen``: recorded request messages of the
   plan, no end half run) each send at its plan's end-stage rate (what an end 8x slower than
   this host produces: 1 / max(end stage, uplink)); the aggregate replies per second measured.
3. **Replicas (measured).** The one-end plan (cloud-heavy) served with ``--engine ray`` on
   1 and 2 Ray Serve replicas (one torch thread each), ``--ends`` generated ends as fast as
   replies come: aggregate throughput and p95 latency. On this 2-core host the front door,
   the generated ends and the replicas share the cores: the gain is what two cores give
   with everything else on them too.

Ends with ``RESULT scale: replicas_2_gain=... p95_ms=... loadaware_gain_16=...
loadaware_gain_16_measured=...`` (loadaware_gain_16: aggregate throughput of the load-aware
plan / the one-end plan for 16 ends, simulated; p95_ms: of 2 replicas).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from tabulate import tabulate

import coach_fx
from coach_fx.plan import evaluate
from coach_fx.profile import measure_batch_efficiency
from coach_fx.runtime.config import Batching, RaySettings, StreamConfig
from coach_fx.runtime.loadgen import LoadSpec, record, run_load
from coach_fx.settings import Device, Network

KS = (1, 4, 16, 64)
END_SLOWDOWN = 8.0
UPLINK_MBPS = 20.0
TOKEN = b"the scale benchmark's own token"


def plans_for(model: torch.nn.Module, x: torch.Tensor, eff: dict[int, float]) -> dict[int, coach_fx.CompiledModel]:
    out = {}
    for k in KS:
        out[k] = coach_fx.compile(model, (x,), network=Network(UPLINK_MBPS), end=Device("end", END_SLOWDOWN),
                                  cloud=Device("cloud", 1.0, ends=k, batch_efficiency=eff[k]),
                                  costs="measured", threads=1, progress=False)
    return out


def simulated(plans: dict) -> tuple[list[list], dict[int, float]]:
    single = plans[1].plan
    rows, gains = [], {}
    for k in KS:
        cm = plans[k]
        # the one-end plan priced for k ends sharing the cloud
        naive = evaluate(cm.dag, single.end_nodes, single.bits, Network(UPLINK_MBPS),
                         input_bits=cm.settings.input_width, codecs=single.codecs or None,
                         tensor_codec=single.tensor_codec)
        gains[k] = naive.period / cm.plan.period
        rows.append([k, ",".join(cm.plan.cut) or "-", len(cm.plan.end_nodes), f"{cm.plan.period * 1e3:.0f}",
                     f"{k / cm.plan.period:.1f}", f"{naive.period * 1e3:.0f}", f"{k / naive.period:.1f}",
                     f"{gains[k]:.2f}"])
    return rows, gains


def end_rate(cm: coach_fx.CompiledModel) -> float:
    """Requests per second one end of this plan produces: its end stage and its uplink."""
    return 1.0 / max(cm.plan.t_end, cm.plan.t_link, 1e-6)


def measured(model_plans: dict, frames: list, k: int, requests: int) -> dict[str, float]:
    out = {}
    for name, cm in model_plans.items():
        with tempfile.TemporaryDirectory() as d:
            cm.save(d, key=TOKEN)
            msgs = record(cm, frames)
            config = StreamConfig(cloud_slowdown=1.0, batching=Batching(32, 0.002))
            with coach_fx.serve(d, port=0, token=TOKEN, config=config) as server:
                rep = run_load(server.address, TOKEN, msgs,
                               LoadSpec(ends=k, requests=requests, rate_hz=end_rate(cm), inflight=4))
        failures = [e.failure for e in rep.ends if e.failure]
        if failures:
            raise RuntimeError(f"generated ends failed: {failures[:2]}")
        out[name] = rep.throughput
    return out


def replicas(cm: coach_fx.CompiledModel, frames: list, ends: int, requests: int) -> dict[int, tuple[float, float]]:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        cm.save(d, key=TOKEN)
        msgs = record(cm, frames)
        config = StreamConfig(cloud_slowdown=1.0, batching=Batching(8, 0.002))
        for n in (1, 2):
            server = coach_fx.serve(d, port=0, token=TOKEN, config=config, engine="ray",
                                    ray=RaySettings(replicas=n, cpus_per_replica=1.0))
            try:
                run_load(server.address, TOKEN, msgs, LoadSpec(ends=2, requests=5))   # warm
                rep = run_load(server.address, TOKEN, msgs, LoadSpec(ends=ends, requests=requests, inflight=2))
            finally:
                server.stop()
            out[n] = (rep.throughput, rep.p95_s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ends", type=int, default=16)
    ap.add_argument("--requests", type=int, default=40, help="per generated end")
    ap.add_argument("--skip-ray", action="store_true", help="no replicas table (without the ray extra)")
    a = ap.parse_args()
    import torchvision
    t0 = time.time()
    torch.set_num_threads(1)   # the planned cloud, the served one and each replica: one core each
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    # measured up to a batch of 16 (larger batches gain no more on a CPU), once per size
    measured_eff = {b: measure_batch_efficiency(model, (x,), b) for b in sorted({min(k, 16) for k in KS if k > 1})}
    eff = {k: measured_eff[min(k, 16)] if k > 1 else 1.0 for k in KS}
    print("batching efficiency of the whole model on this host (per request, batch K / alone): "
          + ", ".join(f"K={k}: {e:.2f}" for k, e in eff.items()), flush=True)
    plans = plans_for(model, x, eff)
    rows, gains = simulated(plans)
    print("\nload-aware plans, simulated (resnet18, end x8, 20 Mbit/s per end):")
    print(tabulate(rows, headers=["K ends", "cut (load-aware)", "end nodes", "period ms", "aggregate /s",
                                  "one-end plan period ms", "its aggregate /s", "gain"]))
    frames = [(torch.randn(1, 3, 224, 224),) for _ in range(8)]
    mrows, mgain = [], {}
    for k in (4, 16):
        got = measured({"load-aware": plans[k], "one-end": plans[1]}, frames, k, a.requests)
        mgain[k] = got["load-aware"] / got["one-end"]
        mrows.append([k, f"{got['load-aware']:.1f}", f"{got['one-end']:.1f}", f"{mgain[k]:.2f}"])
    print("\nload-aware plans, measured (built-in server on this host; generated ends at each plan's end rate):")
    print(tabulate(mrows, headers=["K ends", "load-aware /s", "one-end plan /s", "gain"]))
    rep = {}
    if not a.skip_ray:
        rep = replicas(plans[1], frames, a.ends, a.requests)
        print(f"\nRay Serve replicas, {a.ends} generated ends, the one-end plan (measured):")
        print(tabulate([[n, f"{t:.1f}", f"{p * 1e3:.0f}"] for n, (t, p) in rep.items()],
                       headers=["replicas", "aggregate /s", "p95 ms"]))
    r2 = rep[2][0] / rep[1][0] if rep else float("nan")
    p95 = rep[2][1] * 1e3 if rep else float("nan")
    print(f"\ntotal {time.time() - t0:.0f} s")
    print(f"RESULT scale: replicas_2_gain={r2:.2f} p95_ms={p95:.0f} loadaware_gain_16={gains[16]:.2f} "
          f"loadaware_gain_16_measured={mgain[16]:.2f} ends={a.ends}")


if __name__ == "__main__":
    main()
