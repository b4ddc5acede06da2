"""The cloud half on CUDA against the CPU: one prepared script for a machine with a GPU.

    python benchmarks/gpu_cloud.py [--repeat 20]

torchvision resnet18 (random weights, 224x224) cut after its maxpool at 8 bits; a
``CloudWorker`` per device runs batches of 1, 8 and 32 recorded request messages (decode,
unpack and dequantize, the cloud half, encode: what a server's replica does per batch). Prints
milliseconds per batch and per request, and ends with ``RESULT gpu_cloud: speedup_b1=...
speedup_b8=... speedup_b32=...`` (CPU time / CUDA time per batch). Without CUDA it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

import coach_fx
from coach_fx.runtime.cloud import Arrival, CloudHalf, CloudWorker
from coach_fx.runtime.loadgen import record
from coach_fx.runtime.timing import median_time

BATCHES = (1, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to compare (run this on a machine with a GPU)")
        return
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    cm = coach_fx.compile(model, (torch.randn(1, 3, 224, 224),), strategy="manual", end_nodes=["maxpool"],
                          bits=8, costs="analytic", progress=False)
    msgs = record(cm, [(torch.randn(1, 3, 224, 224),) for _ in range(max(BATCHES))])
    half = {0: CloudHalf(cm.cloud_module, cm.boundary, cm.batched_cloud_module)}
    times = {}
    for device in ("cpu", "cuda"):
        worker = CloudWorker(half, None, device=device)
        worker.warm_up()
        for b in BATCHES:
            batch = [(m, Arrival()) for m in msgs[:b]]
            times[device, b] = median_time(lambda: worker.handle_batch(batch), a.repeat, warmup=3)
    rows = [[b, f"{times['cpu', b] * 1e3:.1f}", f"{times['cuda', b] * 1e3:.1f}",
             f"{times['cpu', b] / b * 1e3:.2f}", f"{times['cuda', b] / b * 1e3:.2f}",
             f"{times['cpu', b] / times['cuda', b]:.1f}"] for b in BATCHES]
    print(f"{torch.cuda.get_device_name()} vs this host's CPU ({torch.get_num_threads()} threads), "
          f"resnet18 after maxpool, 8 bits:")
    print(tabulate(rows, headers=["batch", "CPU ms", "CUDA ms", "CPU ms/request", "CUDA ms/request", "speedup"]))
    print("RESULT gpu_cloud: " + " ".join(f"speedup_b{b}={times['cpu', b] / times['cuda', b]:.1f}" for b in BATCHES)
          + f" at={time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
