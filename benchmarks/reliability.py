"""Reliability under load: a flood of requests from the end side.

    python benchmarks/reliability.py [--flood 10000]

Each run is its own process (so peak RSS is its own): a small CNN split end/cloud, an
in-process link at 100 Mbit/s, frames generated on the fly and pushed as fast as the pipeline
takes them (bounded queues give backpressure). Reports peak RSS and throughput for 100
requests and for the flood. Ends with
``RESULT reliability: rss_ratio=... throughput_ratio=... flood=...``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from tabulate import tabulate


def child(n: int) -> None:
    import torch
    from torch import nn

    import coach_fx

    torch.set_num_threads(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.body = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))

    x = torch.randn(1, 3, 16, 16)
    cm = coach_fx.compile(Net().eval(), (x,), strategy="manual", end_nodes=["stem", "relu"], bits=8,
                          costs="analytic", progress=False, network=coach_fx.Network(100),
                          end=coach_fx.Device("end", 1.0))
    g = torch.Generator().manual_seed(0)

    def frames():
        for _ in range(n):
            yield torch.randn(1, 3, 16, 16, generator=g)

    from coach_fx.runtime.links import InProcessLink
    from coach_fx.runtime.cloud import CloudWorker
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.end import EndWorker
    from coach_fx.runtime.policy import StaticPolicy
    link = InProcessLink.for_network(cm.settings.network)
    cloud = CloudWorker({0: (cm.cloud_module, cm.boundary)}, link.cloud).start()
    end = EndWorker(link.end, cm.out_spec, StaticPolicy(cm.end_module, cm.boundary), StreamConfig(max_inflight=8))
    t0 = time.perf_counter()
    outs, stats = end.run(frames())
    wall = time.perf_counter() - t0
    end.close()
    cloud.join(2)
    assert len(outs) == n and all(o is not None for o in outs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"requests": n, "peak RSS MB": rss_mb, "throughput /s": stats.throughput,
                      "wall s": wall, "p95 latency ms": stats.pct(0.95) * 1e3}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", type=int, default=10_000)
    ap.add_argument("--child", type=int, default=None)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child)
        return
    rows = []
    for n in (100, a.flood):
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    small, flood = rows
    print(f"RESULT reliability: rss_ratio={flood['peak RSS MB'] / small['peak RSS MB']:.3f} "
          f"throughput_ratio={flood['throughput /s'] / small['throughput /s']:.3f} flood={a.flood}")


if __name__ == "__main__":
    main()
