"""The published-style comparison: coach against Neurosurgeon, DADS, QDMP, end-only and
cloud-only across models, end devices, static uplinks and real bandwidth traces.

    python benchmarks/compare.py [--quick] [--out benchmarks/results] [--no-real]
    python benchmarks/compare.py --natural [--quick]   # the headline: benchmarks/compare_natural.py
    python benchmarks/compare.py --trained [--quick]   # trained models: benchmarks/compare_trained.py

Random weights: this grid times the models and shows the planner's balance; it cannot show
accuracy (see RESULTS.md). The claims come from ``--natural`` (and the camera grid ``--trained``).

Every cell (model x end slowdown x network x method) is planned on the same LayerDAG with the
same measured costs and accuracy budget (relative L2 of the output <= 2 % on the example input),
then simulated by ``coach_fx.runtime.simulate`` (the pipeline's rules, the traces' real rates,
the end worker's own online controller for "coach full"). A subset also runs for real
(in-process threads, real compute, emulated link) to measure the simulator's error.

Methods: end-only, cloud-only, neurosurgeon, dads, qdmp (float32 and +int8), coach offline (the
plan for the network's mean rate), coach full (plans for the trace's bandwidth bands, bits and
plan chosen per request by the online controller; no semantic cache here: these models have
random weights and no data, so a hit rate would mean nothing).

Metrics: throughput (frames as fast as the pipeline takes them), bubble ratio, KB per request,
and latency two ways: a single request with empty queues (mean over 20 start times across the
trace) and a camera stream at 15 and 30 frames/s, queueing included, over 300 frames (20 s
and 10 s).

Writes ``compare.csv``, ``sim_vs_real.csv`` and PNG plots (with the ``bench`` extra) to
``--out``, and ``benchmarks/results/random_weights.md``. Ends with ``RESULT compare: ...``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from coach_fx.compiled import CompiledModel
from coach_fx.driver import plan_model, prepare
from coach_fx.accuracy import AccuracyOracle
from coach_fx.profile import build_dag, host_times, torch_threads
from coach_fx.zoo.models import load_model
from coach_fx.online.bands import band_edges, band_rates
from coach_fx.online.deploy import plan_profile
from coach_fx.plan import Plan, evaluate
from coach_fx.progress import Progress
from coach_fx.runtime.config import Bands
from coach_fx.runtime.controller import OnlineController
from coach_fx.runtime.plans import CutProfile
from coach_fx.runtime.links import InProcessLink
from coach_fx.runtime.simulate import simulate
from coach_fx.settings import Device, Network, Settings
from coach_fx.runtime.traces import Trace

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "traces"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16", "googlenet", "densenet121",
          "efficientnet_b0", "vit_b_16"]
SLOWDOWNS = [4.0, 16.0]
UPLINKS = [1.0, 5.0, 10.0, 20.0, 50.0, 100.0]
TRACES = {"norway x1": ("norway-hsdpa/norway_bus_20", 1.0), "norway x10": ("norway-hsdpa/norway_bus_20", 10.0),
          "lte x1": ("mahimahi-lte/Verizon-LTE-short.up", 1.0), "lte x5": ("mahimahi-lte/Verizon-LTE-short.up", 5.0)}
BASELINES = ["end-only", "cloud-only", "neurosurgeon", "neurosurgeon+int8", "dads", "dads+int8",
             "qdmp", "qdmp+int8"]
METHODS = BASELINES + ["coach offline", "coach full"]
STREAM_FRAMES = 300
MAX_FRAMES = 20_000


@dataclasses.dataclass
class Condition:
    name: str
    network: Network
    trace: Trace          # what the simulator replays (a constant one for a fixed uplink)
    static: bool


def conditions(quick: bool, uplinks: list[float] | None = None, traces: dict | None = None,
               quick_uplinks: tuple[float, ...] = (5.0, 50.0), quick_trace: str = "norway x10"
               ) -> list[Condition]:
    out = []
    traces = TRACES if traces is None else traces
    for r in (quick_uplinks if quick else uplinks or UPLINKS):
        out.append(Condition(f"{r:g} Mbit/s", Network(r), Trace.constant(r), True))
    if SHARED.is_dir():
        for name, (rel, scale) in traces.items():
            if quick and name != quick_trace:
                continue
            net = Network.from_trace(SHARED / rel, scale=scale)
            out.append(Condition(name, net, net.trace, False))
    else:
        print(f"(no traces: {SHARED} is absent; static uplinks only)", file=sys.stderr)
    return out


class Cell:
    """Everything the simulator needs of one method's plan(s) in one setting."""

    def __init__(self, dag, settings: Settings, plan: Plan, net: Network) -> None:  # noqa: ANN001
        self.dag, self.settings, self.plan, self.net = dag, settings, plan, net
        self._at: dict[int | None, Plan] = {None: plan}

    def at(self, bits: int | None) -> Plan:
        if bits not in self._at:
            self._at[bits] = evaluate(self.dag, self.plan.end_nodes, bits, self.net,
                                      input_bits=self.settings.input_width)
        return self._at[bits]

    def profile(self, min_bits: int | None = None) -> CutProfile:
        """The cell's plan as the controller and the simulator read it; its stage times per
        width from ``min_bits`` up (default: its own widths only)."""
        floor = min_bits if min_bits is not None else 32
        stages = tuple((b, self.at(b).t_end, self.at(b).t_cloud) for b in self.settings.bits if b >= floor)
        return plan_profile(self.dag, self.plan, min_bits, self.settings.input_width, stages or None)


def run_cells(gm, inputs, dag, oracle, settings: Settings, cond: Condition):  # noqa: ANN001
    """Plans of every method for one setting -> {method: (cells by plan id, controller, start)}."""
    s = dataclasses.replace(settings, network=cond.network)
    out = {}
    for m in BASELINES:
        p, _ = plan_model(gm, inputs, dag, s, strategy=m, oracle=oracle)
        out[m] = ({0: Cell(dag, s, p, cond.network)}, None, 0, p)
    off, _ = plan_model(gm, inputs, dag, s, strategy="coach", oracle=oracle)
    out["coach offline"] = ({0: Cell(dag, s, off, cond.network)}, None, 0, off)
    # coach full: a plan per band, all on the same link; the controller picks per request
    rates = [cond.network.uplink_mbps] if cond.static else band_rates(cond.network)
    cells, ids = {0: Cell(dag, s, off, cond.network)}, {off.end_nodes: 0}
    band_ids = []
    for r in rates:
        sr = settings.replace(network=cond.network.at_rate(r))
        p, _ = plan_model(gm, inputs, dag, sr, strategy="coach", oracle=oracle)
        here = evaluate(dag, off.end_nodes, off.bits, sr.network, input_bits=s.input_width)
        if p.period > settings.online.switch_gain * here.period:   # not worth a switch (as compile_online)
            p = off
        if p.end_nodes not in ids:
            ids[p.end_nodes] = len(ids)
            cells[ids[p.end_nodes]] = Cell(dag, s, evaluate(dag, p.end_nodes, p.bits, cond.network,
                                                            strategy="coach", input_bits=s.input_width), cond.network)
        band_ids.append(ids[p.end_nodes])
    edges, band_plans = band_edges(rates, band_ids)
    floors = {pid: oracle.min_bits(c.plan.end_nodes) if c.plan.cut else 32 for pid, c in cells.items()}
    out["coach full"] = (cells, (floors, edges, band_plans), 0, off)
    return out


def measure(cells: dict[int, Cell], control, cond: Condition, n_trace: int, start_s: float = 0.0):  # noqa: ANN001
    """(throughput stats, single latency, 15 fps latency, 30 fps latency)."""
    floors = control[0] if control is not None else {}
    plans = {k: c.profile(floors.get(k)) for k, c in cells.items()}

    def ctl():  # noqa: ANN202
        if control is None:
            return None
        _, edges, band_plans = control
        return OnlineController(plans, Bands(edges, band_plans, start=0),
                                end_s={k: c.plan.t_end for k, c in cells.items()})

    n = 200 if cond.static else n_trace
    st = simulate(plans, n, cond.trace, controller=ctl(), start_s=start_s)
    starts = [0.0] if cond.static else [cond.trace.duration * i / 20 for i in range(20)]
    single = statistics.fmean(simulate(plans, 1, cond.trace, controller=ctl(), start_s=t0).latencies[0]
                              for t0 in starts)
    cams = [statistics.fmean(simulate(plans, STREAM_FRAMES, cond.trace, fps=fps, controller=ctl()).latencies)
            for fps in (15.0, 30.0)]
    return st, single, cams[0], cams[1]


def real_run(gm, dag, inputs, oracle, settings: Settings, plan: Plan, cond: Condition, frames: int):  # noqa: ANN001
    """Run ``plan`` for real (in-process threads, emulated link); simulate the same stream with
    the plan's calibrated stage times. Returns (measured, simulated) throughput."""
    s = dataclasses.replace(settings, network=cond.network)
    cm = CompiledModel(gm, dag, dataclasses.replace(plan, extra={}), s, inputs, oracle)
    cm.remeasure()
    xs = [torch.randn_like(inputs[0]) for _ in range(frames)]
    link = InProcessLink(cond.trace, cond.network.down_mbps, cond.network.rtt_ms / 2e3)
    _, stats = cm.stream(xs, link=link)
    p = cm.plan
    sim = simulate({0: plan_profile(dag, p, None, settings.input_width)}, frames, cond.trace)
    return stats.throughput, sim.throughput


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> None:
    if "--natural" in sys.argv[1:]:
        # trained cuts on natural-looking frames, a fast cloud, ends sharing it: the headline
        sys.path.insert(0, str(HERE))
        from compare_natural import main as natural_main
        natural_main(sys.argv[1:])
        return
    if "--trained" in sys.argv[1:]:
        # the honest grid: trained models, practitioner baselines, test-split accuracy
        sys.path.insert(0, str(HERE))
        from compare_trained import main as trained_main
        trained_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 models, 1 device, 3 networks (< 2 min)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results (a --quick run: "
                    "benchmarks/results/quick, so it never overwrites the committed results)")
    ap.add_argument("--no-real", action="store_true", help="skip the real runs (no sim_error)")
    # RESULTS.md holds the natural grid's claims (--natural); this one is timing only
    ap.add_argument("--results-md", default=str(HERE / "results" / "random_weights.md"))
    a = ap.parse_args()
    if a.out is None:
        a.out = str(HERE / "results" / "quick") if a.quick else str(HERE / "results")
    if a.quick and Path(a.results_md).resolve() == (HERE / "results" / "random_weights.md").resolve():
        a.results_md = str(Path(a.out) / "random_weights.md")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    models = ["resnet18", "mobilenet_v2"] if a.quick else MODELS
    slowdowns = [4.0] if a.quick else SLOWDOWNS
    conds = conditions(a.quick)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Settings.of(costs="measured", threads=1, progress=False, remeasure=False,
                    cloud=Device("cloud", 1.0))
    rows: list[dict] = []
    real: list[dict] = []
    total = len(models) * len(slowdowns) * len(conds)
    bar = Progress("grid", delay=0.0)      # drawn on a terminal
    done = 0
    for mi, name in enumerate(models):
        print(f"[{mi + 1}/{len(models)}] {name}: profiling, planning and simulating "
              f"{len(slowdowns) * len(conds) * len(METHODS)} cells ({time.perf_counter() - t_start:.0f} s)",
              file=sys.stderr, flush=True)
        model, shape = load_model(name)
        x = torch.randn(1, *shape)
        with torch_threads(1):
            gm, inputs, _ = prepare(model, (x,), base.replace(costs="analytic"))
            host = host_times(gm, inputs, base)
        oracle = None
        for sd in slowdowns:
            settings = dataclasses.replace(base, end=Device("end", sd))
            dag = build_dag(gm, inputs, settings, host)
            if oracle is None:
                oracle = AccuracyOracle(gm, dag, settings, inputs)
            for cond in conds:
                bar.update(done, total, f"{name} x{sd:g} {cond.name}")
                methods = run_cells(gm, inputs, dag, oracle, settings, cond)
                off = methods["coach offline"][3]
                n_trace = int(min(MAX_FRAMES, max(200, cond.trace.duration / max(off.period, 1e-4))))
                for m, (cells, control, _, plan) in methods.items():
                    st, single, l15, l30 = measure(cells, control, cond, n_trace)
                    ok = plan.accuracy_ok is not False
                    rows.append(dict(model=name, slowdown=sd, network=cond.name, method=m,
                                     throughput=st.throughput, bubble=st.bubble_ratio,
                                     kb_per_request=st.bytes_sent / max(st.n, 1) / 1e3,
                                     latency_single_ms=single * 1e3, latency_15fps_ms=l15 * 1e3,
                                     latency_30fps_ms=l30 * 1e3, within_budget=ok,
                                     accuracy=plan.accuracy if plan.accuracy is not None else 0.0,
                                     cut=" ".join(plan.cut) or "-", frames=st.n))
                done += 1
        # the real subset: the two smallest models at slowdown 4, coach offline and the best
        # baseline, a fixed uplink and a trace
        if not a.no_real and name in ("resnet18", "mobilenet_v2"):
            settings = dataclasses.replace(base, end=Device("end", 4.0))
            dag = build_dag(gm, inputs, settings, host)
            picks = [c for c in conds if c.name in ("10 Mbit/s", "5 Mbit/s", "norway x10")][:2]
            for cond in picks:
                for m in ("coach", "cloud-only") if a.quick else ("coach", "cloud-only", "neurosurgeon"):
                    p, _ = plan_model(gm, inputs, dag, dataclasses.replace(settings, network=cond.network),
                                      strategy=m, oracle=oracle)
                    with torch_threads(1):
                        meas, sim = real_run(gm, dag, inputs, oracle, settings, p, cond, 40 if a.quick else 60)
                    real.append(dict(model=name, slowdown=4.0, network=cond.name, method=m,
                                     measured=meas, simulated=sim, error=abs(sim - meas) / meas))
    bar.update(total, total, "grid")
    bar.close()
    elapsed = time.perf_counter() - t_start
    report(rows, real, a, out_dir, elapsed, models, slowdowns, conds)


def report(rows, real, a, out_dir: Path, elapsed: float, models, slowdowns, conds) -> None:  # noqa: ANN001
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if real:
        with open(out_dir / "sim_vs_real.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(real[0]))
            w.writeheader()
            w.writerows(real)

    # per setting: coach full against the best baseline within the budget
    settings = sorted({(r["model"], r["slowdown"], r["network"]) for r in rows},
                      key=lambda k: (models.index(k[0]), k[1], [c.name for c in conds].index(k[2])))
    by = {(r["model"], r["slowdown"], r["network"], r["method"]): r for r in rows}
    gains, behind = [], []
    for key in settings:
        coach = by[key + ("coach full",)]
        offline = by[key + ("coach offline",)]
        base = [by[key + (m,)] for m in BASELINES if by[key + (m,)]["within_budget"]]
        best_t = max(base, key=lambda r: r["throughput"])
        best_s = min(base, key=lambda r: r["latency_single_ms"])
        best_30 = min(base, key=lambda r: r["latency_30fps_ms"])
        g = dict(model=key[0], slowdown=key[1], network=key[2],
                 thr=coach["throughput"] / best_t["throughput"], thr_vs=best_t["method"],
                 thr_offline=offline["throughput"] / best_t["throughput"],
                 single=best_s["latency_single_ms"] / coach["latency_single_ms"], single_vs=best_s["method"],
                 cam30=best_30["latency_30fps_ms"] / coach["latency_30fps_ms"], cam30_vs=best_30["method"])
        gains.append(g)
        for what, ratio, vs in (("throughput", g["thr"], g["thr_vs"]), ("single-request latency", g["single"], g["single_vs"]),
                                ("30 fps latency", g["cam30"], g["cam30_vs"])):
            if ratio < 0.995:
                behind.append((key, what, ratio, vs, why(by, key, vs, what)))
    real_err = [r["error"] for r in real]
    sim_error = max(real_err) if real_err else float("nan")

    # one table per model and device: throughput per method and network
    for m in models:
        for sd in slowdowns:
            tab = []
            for meth in METHODS:
                r0 = [by.get((m, sd, c.name, meth)) for c in conds]
                tab.append([meth] + [f"{r['throughput']:.1f}{'' if r['within_budget'] else ' ✗'}" for r in r0])
            print(f"\n{m}, end slowdown {sd:g}: throughput /s (✗: breaks the accuracy budget)")
            print(tabulate(tab, headers=["method"] + [c.name for c in conds], disable_numparse=True))
    head = []
    for sd in slowdowns:
        for kind in ("static", "trace"):
            gs = [g for g in gains if g["slowdown"] == sd and (g["network"].endswith("Mbit/s")) == (kind == "static")]
            if gs:
                head.append([f"slowdown {sd:g}, {kind}", len(gs), geomean([g["thr"] for g in gs]),
                             max(g["thr"] for g in gs), geomean([g["single"] for g in gs]),
                             max(g["single"] for g in gs), geomean([g["cam30"] for g in gs]),
                             max(g["cam30"] for g in gs)])
    head_headers = ["setting", "cells", "throughput geomean", "max", "single-request latency geomean",
                    "max", "30 fps latency geomean", "max"]
    print("\nHeadline: coach full over the best baseline within the budget (per setting)")
    print(tabulate(head, headers=head_headers, floatfmt=".3f"))
    if real:
        print("\nSimulator against real runs (in-process, real compute, emulated link):")
        print(tabulate([[r["model"], r["network"], r["method"], r["measured"], r["simulated"],
                         f"{r['error']:.1%}"] for r in real],
                       headers=["model", "network", "method", "measured /s", "simulated /s", "error"],
                       floatfmt=".2f"))
    plots = make_plots(rows, models, slowdowns, conds, out_dir)
    write_md(a, rows, gains, behind, head, head_headers, real, elapsed, plots)
    thr = [g["thr"] for g in gains]
    # the search-space claim is the planner's: coach offline against the best baseline; the
    # online controller (coach full) is reported beside it
    print(f"\nRESULT compare: min_throughput_ratio={min(g['thr_offline'] for g in gains):.3f} "
          f"min_throughput_ratio_full={min(thr):.3f} "
          f"geomean_throughput_gain={geomean(thr):.3f} max_throughput_gain={max(thr):.3f} "
          f"geomean_latency_gain={geomean([g['cam30'] for g in gains]):.3f} "
          f"max_latency_gain={max(g['cam30'] for g in gains):.3f} "
          f"geomean_single_latency_gain={geomean([g['single'] for g in gains]):.3f} "
          f"sim_error={sim_error:.3f} cells={len(rows)} elapsed_s={elapsed:.0f}")


def why(by, key, vs: str, what: str) -> str:  # noqa: ANN001
    c, b = by[key + ("coach full",)], by[key + (vs,)]
    if c["cut"] == b["cut"]:
        return ("the same cut as the baseline; what differs is the online controller's bits and "
                "plan switches following the trace with a lag")
    if what == "single-request latency":
        return ("coach's cut balances the stages for the shortest period; the baseline's cut "
                "minimizes one request's latency")
    if what == "30 fps latency" and c["throughput"] > 30 and b["throughput"] > 30:
        return "both keep up with 30 frames/s, so no queue builds and the single-request trade-off shows"
    if what == "30 fps latency":
        return "neither keeps up with 30 frames/s over the stream; the queue that builds decides"
    return "coach's plans for the trace's bands trail the baseline's single plan on this trace's variation"


def make_plots(rows, models, slowdowns, conds, out_dir: Path) -> list[str]:  # noqa: ANN001
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(plots skipped: pip install 'coach-fx[bench]' for matplotlib)", file=sys.stderr)
        return []
    files = []
    static = [c for c in conds if c.static]
    for sd in slowdowns:
        fig, axes = plt.subplots(2, math.ceil(len(models) / 2), figsize=(4 * math.ceil(len(models) / 2), 7),
                                 squeeze=False)
        for ax, m in zip(axes.flat, models):
            for meth in ["end-only", "cloud-only", "neurosurgeon", "dads+int8", "qdmp", "coach full"]:
                ys = [next(r["throughput"] for r in rows if r["model"] == m and r["slowdown"] == sd
                           and r["network"] == c.name and r["method"] == meth) for c in static]
                ax.plot([c.network.uplink_mbps for c in static], ys, marker="o", label=meth)
            ax.set_xscale("log")
            ax.set_title(m)
            ax.set_xlabel("uplink Mbit/s")
            ax.set_ylabel("frames/s")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"Throughput, end slowdown {sd:g}")
        fig.tight_layout()
        f = out_dir / f"throughput_slowdown{sd:g}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def write_md(a, rows, gains, behind, head, head_headers, real, elapsed, plots) -> None:  # noqa: ANN001
    cmd = "python benchmarks/compare.py" + (" --quick" if a.quick else "") + (" --no-real" if a.no_real else "")
    lines = [
        "# Random-weight grid: timing and balance only (the claims are in ../RESULTS.md)",
        "",
        "Random weights time the models faithfully but cannot show accuracy (a random network's "
        "output hardly depends on its input, so quantized plans pass any output check), and "
        "cloud-only here ships raw pixels, not the JPEG a camera sends.",
        "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads available, "
        f"Python {platform.python_version()}, torch {torch.__version__}; the grid took {elapsed:.0f} s. "
        "Costs measured on this host (one thread), end device emulated by slowdown; everything "
        "else simulated by `coach_fx.runtime.simulate` with the pipeline's rules "
        "(see `benchmarks/compare.py`). CSV: `benchmarks/results/compare.csv`.",
        "",
        "## Headline",
        "",
        "Speedup of coach full over the best baseline that meets the accuracy budget, per setting "
        "(throughput: frames/s; latency: single request with empty queues, and a 30 frames/s "
        "camera stream of 300 frames with queueing).",
        "",
        tabulate(head, headers=head_headers, floatfmt=".3f", tablefmt="github"),
        "",
        f"Over every cell, throughput against the best baseline within the budget: coach offline "
        f"(the planner; its search space holds every baseline plan) at least "
        f"{min(g['thr_offline'] for g in gains):.3f}x, coach full (the online controller on top) at "
        f"least {min(g['thr'] for g in gains):.3f}x.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Per setting", "",
              tabulate([[g["model"], f"{g['slowdown']:g}", g["network"], g["thr"], g["thr_vs"], g["single"],
                         g["single_vs"], g["cam30"], g["cam30_vs"]] for g in gains],
                       headers=["model", "slowdown", "network", "throughput gain", "vs", "single latency gain",
                                "vs", "30 fps latency gain", "vs"], floatfmt=".3f", tablefmt="github"), ""]
    broken = sorted({(r["method"]) for r in rows if not r["within_budget"]})
    lines += ["## Where coach is not ahead, and why", "",
              "coach optimizes throughput (the period, then latency), as the pipeline runs a stream; "
              "Neurosurgeon, DADS and QDMP minimize the latency of one request. So a single request "
              "on empty queues is often faster with their cut, while a stream (throughput, and the "
              "latency of a 15 or 30 frames/s camera once their longer period builds a queue) is "
              "faster with coach's. Every cell where coach full trails the best baseline by more "
              "than 0.5 %, grouped by metric and reason:", ""]
    if behind:
        groups: dict[tuple[str, str], list] = {}
        for k, what, ratio, vs, reason in behind:
            groups.setdefault((what, reason), []).append((k, ratio, vs))
        for (what, reason), cells in sorted(groups.items(), key=lambda g: (g[0][0], -len(g[1]))):
            worst = min(cells, key=lambda c: c[1])
            lines.append(f"- **{what}**, {len(cells)} cell(s): {reason}. Worst: {worst[0][0]}, slowdown "
                         f"{worst[0][1]:g}, {worst[0][2]} ({worst[1]:.3f}x against {worst[2]}). Cells: "
                         + "; ".join(f"{k[0]}/{k[1]:g}/{k[2]} {r:.2f}x" for k, r, _ in cells))
    else:
        lines += ["- Nowhere in this grid."]
    lines += ["", "Baseline plans that break the accuracy budget are shown in the CSV "
              f"(`within_budget` false: {', '.join(broken) or 'none'}) and left out of the ratios.", ""]
    if real:
        lines += ["## Simulator against real runs", "",
                  tabulate([[r["model"], r["network"], r["method"], r["measured"], r["simulated"],
                             f"{r['error']:.1%}"] for r in real],
                           headers=["model", "network", "method", "measured /s", "simulated /s", "error"],
                           floatfmt=".2f", tablefmt="github"), ""]
    Path(a.results_md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
