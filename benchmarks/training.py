"""Training through a compiled model: step time against eager, for the PyTorch MNIST example's
network (batch 64) and torchvision's resnet18 (batch 8, 64x64), with ``coach_fx.compile`` and
with ``torch.compile(backend="coach")``. Compile time is reported apart; steps are timed after
two warm-up steps (the backend compiles twice: the second shape makes the batch dynamic),
the three taken in turn so that they see the same load.

    python benchmarks/training.py [--steps 20]

Wall-clock on this machine; the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from coach_line import with_coach  # noqa: E402
from mnist import Net  # noqa: E402


def _models():  # noqa: ANN202
    import torchvision
    yield "mnist-net", Net, (64, 1, 28, 28), (40, 1, 28, 28)
    yield "resnet18", lambda: torchvision.models.resnet18(num_classes=10), (8, 3, 64, 64), (5, 3, 64, 64)


def _runner(make, shape, last, how: str):  # noqa: ANN001, ANN202
    """A training step of a fresh model run ``how``, and the seconds compiling took."""
    torch.manual_seed(0)
    model = make().train()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    xl, yl = torch.randn(*last), torch.randint(0, 10, (last[0],))
    t0 = time.perf_counter()
    run = with_coach(model, how, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(a: torch.Tensor = x, b: torch.Tensor = y) -> float:
        started = time.perf_counter()
        loss = F.cross_entropy(run(a), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - started
    step()
    step(xl, yl)                      # the last, smaller batch: no new plan
    return step, time.perf_counter() - t0, _cut(run, how)


def _cut(run, how: str) -> str:  # noqa: ANN001
    """What crosses in the plan the runner trains through."""
    if how == "off":
        return "-"
    from coach_fx.backend import COMPILED
    plan = run.plan if how == "compile" else COMPILED[-1].plan
    if not plan.cut:
        return "end-only"
    return ",".join(plan.cut) + f" @{max(plan.bits.values())}b"


def bench(name: str, make, shape, last, steps: int) -> list[dict]:  # noqa: ANN001
    """Steps of eager, compile and backend taken in turn (rotating the order), so that all
    three see the same load on this machine."""
    hows = ("off", "compile", "backend")
    runners = {h: _runner(make, shape, last, h) for h in hows}
    times: dict[str, list[float]] = {h: [] for h in hows}
    for k in range(steps):
        for h in hows[k % 3:] + hows[:k % 3]:
            times[h].append(runners[h][0]())
    return [{"model": name, "how": h, "crossing": runners[h][2], "compile+2 steps s": runners[h][1],
             "step ms (median)": statistics.median(times[h]) * 1e3} for h in hows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    rows = []
    for name, make, shape, last in _models():
        rows += bench(name, make, shape, last, a.steps)
        print(f"  {name}: " + ", ".join(f"{r['how']} {r['step ms (median)']:.1f} ms" for r in rows[-3:]),
              flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    eager = {r["model"]: r["step ms (median)"] for r in rows if r["how"] == "off"}
    ratio = {(r["model"], r["how"]): r["step ms (median)"] / eager[r["model"]] for r in rows}
    print("RESULT training: " + " ".join(
        f"{m.replace('-', '_')}_{h}_step_ratio={ratio[(m, h)]:.2f}" for m, h in ratio if h != "off"))


if __name__ == "__main__":
    main()
