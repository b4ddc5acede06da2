"""Planner benchmark: planning time per model (profiling excluded), brute force beside it,
accuracy evaluations used against candidates considered, and exactness against brute force.

    python benchmarks/planner.py [--mbps 10] [--slowdown 8] [--models resnet18,...]

Costs are analytic (deterministic), so plans do not depend on the load of this machine;
times are wall-clock on this machine. Columns:

* ``search s``: COACH's search alone (no accuracy constraint: cheapest bits allowed);
* ``brute s``: brute force over every closed set, same setting; ``exact``: same objective;
* ``plan s``: COACH with the real accuracy oracle (relative L2 of the output on the example
  input, tolerance 2 %), accuracy evaluations included; ``evals``/``candidates``/``resolved``.

The digits model is also planned with its labelled calibration split, where brute force with
the same oracle is affordable, so ``exact`` covers a real accuracy oracle too.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from coach_fx.accuracy import AccuracyOracle
from coach_fx.driver import prepare
from coach_fx.zoo.models import load_model
from coach_fx.optimize import Problem, brute_force, coach
from coach_fx.settings import Device, Network, Settings
from coach_fx.zoo.small import SMALL_MODELS

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg11", "googlenet", "densenet121",
          "efficientnet_b0", "vit_b_16", *SMALL_MODELS]


def _timed(fn):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_model(name: str, settings: Settings) -> dict:
    if name in SMALL_MODELS:
        model, example = SMALL_MODELS[name]()
    else:
        model, shape = load_model(name)
        example = (torch.randn(1, *shape),)
    gm, inputs, dag = prepare(model, example, settings)
    free = Problem(dag, settings.network, settings.objective, settings.bits, settings.input_width)
    got, t_search = _timed(lambda: coach(free))
    if dag.count_closed_sets(settings.max_plans) <= settings.max_plans:
        want, t_brute = _timed(lambda: brute_force(free, limit=settings.max_plans))
    else:   # too many plans for brute force: exactness is shown where it can run
        want, t_brute = None, float("nan")
    oracle = AccuracyOracle(gm, dag, settings, inputs)
    real = Problem(dag, settings.network, settings.objective, settings.bits, settings.input_width, oracle)
    plan, t_plan = _timed(lambda: coach(real))
    return {"model": name, "nodes": len(dag), "closed sets": dag.count_closed_sets(10**6),
            "search s": t_search, "brute s": t_brute,
            "exact": "-" if want is None else abs(got.score[0] - want.score[0]) <= 1e-9 * want.score[0],
            "plan s": t_plan, "evals": oracle.evals, "candidates": plan.extra["candidates"],
            "resolved": plan.extra["resolved"], "bits": "/".join(map(str, sorted(set(plan.bits.values())))),
            "period ms": plan.period * 1e3}


def bench_digits(settings: Settings) -> dict | None:
    try:
        from coach_fx.zoo.digits import digits_splits, load_digits_model
    except ImportError:
        return None
    model = load_digits_model()
    _, (xc, yc), _ = digits_splits()
    s = Settings.of(network=Network(50), end=Device("end", 1.5), costs="analytic", progress=False,
                 calibration=(xc, yc))
    gm, inputs, dag = prepare(model, (xc[:64],), s)
    oracle = AccuracyOracle(gm, dag, s, inputs)
    p = Problem(dag, s.network, s.objective, s.bits, s.input_width, oracle)
    plan, t_plan = _timed(lambda: coach(p))
    evals = oracle.evals
    want, t_brute = _timed(lambda: brute_force(p))
    return {"model": "digits (labels)", "nodes": len(dag), "closed sets": dag.count_closed_sets(10**6),
            "search s": float("nan"), "brute s": t_brute,
            "exact": abs(plan.score[0] - want.score[0]) <= 1e-9 * want.score[0],
            "plan s": t_plan, "evals": evals, "candidates": plan.extra["candidates"],
            "resolved": plan.extra["resolved"], "bits": "/".join(map(str, sorted(set(plan.bits.values())))),
            "period ms": plan.period * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbps", type=float, default=10.0)
    ap.add_argument("--slowdown", type=float, default=8.0)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    settings = Settings.of(network=Network(a.mbps), end=Device("end", a.slowdown), costs="analytic",
                        progress=False)
    rows = []
    for name in a.models.split(","):
        rows.append(bench_model(name, settings))
        r = rows[-1]
        print(f"  {name}: search {r['search s']:.3f}s, brute {r['brute s']:.3f}s, plan {r['plan s']:.3f}s",
              flush=True)
    d = bench_digits(settings)
    if d:
        rows.append(d)
    print()
    print(f"uplink {a.mbps} Mbit/s, end slowdown {a.slowdown}, analytic costs, objective throughput")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    tv = [r for r in rows if r["model"] in MODELS]
    worst = max(tv, key=lambda r: r["plan s"])
    worst_search = max(tv, key=lambda r: r["search s"])
    checked = [r for r in rows if r["exact"] != "-"]
    exact = sum(bool(r["exact"]) for r in checked)
    print(f"RESULT planner: max_plan_s={worst['plan s']:.3f} max_plan_model={worst['model']} "
          f"max_search_s={worst_search['search s']:.3f} max_search_model={worst_search['model']} "
          f"exact={exact}/{len(checked)}")


if __name__ == "__main__":
    main()
