"""The compile side of the ``coach`` command (``coach_fx.cli`` dispatches to it): ``coach plan``,
``coach demo``, ``coach profile``; its parser also lists the two sides of a saved plan,
``coach serve`` and ``coach run`` (``coach_fx.deploy.cli``), for ``coach --help``.

    coach plan --model torchvision:resnet18 --uplink-mbps 10 --slowdown 8
    coach plan --model resnet50 --strategy all
    coach demo
    coach profile --model resnet18 --out pi.json     # on the device: its own node times
    coach plan --model mypkg.models:net --weights net.safetensors --input-shape 3,64,64 \
               --end-profile pi.json
    coach serve plan_dir --port 29517            # until SIGTERM/Ctrl-C; --sessions N: N ends
    coach serve plan_dir --host 0.0.0.0 --tls-cert cloud.pem --tls-key cloud.key
    coach run plan_dir --host cloud.example --tls-ca cloud.pem --synthetic 100

The shared token comes from ``--token-file`` or ``$COACH_TOKEN``, never the command line.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate

from coach_fx.compiled import CompiledModel
from coach_fx.deploy.cli import DEPLOY_COMMANDS, add_deploy_commands, token_of
from coach_fx.deploy.cli import main as deploy_main
from coach_fx.device_profile import node_ops, write_profile
from coach_fx.driver import plan_model, prepare, traced
from coach_fx.profile import measure_node_times, measure_quant_cost, torch_threads
from coach_fx.zoo.models import load_model
from coach_fx.optimize import STRATEGIES, compared
from coach_fx.settings import Device, Network, Settings


def _settings(a: argparse.Namespace, strategy: str) -> Settings:
    if a.trace:
        net = Network.from_trace(a.trace, scale=a.trace_scale, rtt_ms=a.rtt_ms,
                                 downlink_mbps=a.downlink_mbps)
    else:
        net = Network(a.uplink_mbps, a.downlink_mbps, a.rtt_ms)
    end = Device.from_profile(a.end_profile, "end") if a.end_profile else Device("end", a.slowdown)
    cloud = Device.from_profile(a.cloud_profile, "cloud") if a.cloud_profile else Device("cloud", a.cloud_slowdown)
    return Settings.of(network=net, end=end, cloud=cloud,
                    strategy=strategy, objective=a.objective, costs=a.costs,
                    accuracy_budget=a.budget, profile_repeat=a.repeat, threads=a.threads)


def compare_table(rows: list[dict]) -> str:
    """One row per strategy: latency, period, throughput, bubble ratio, bytes, bits, accuracy."""
    out = []
    for p in rows:
        bits = sorted(set(p.bits.values()))
        acc = "-" if p.accuracy is None else f"{p.accuracy:.4f}{'' if p.accuracy_ok else ' (over budget)'}"
        out.append([p.strategy, p.latency * 1e3, p.period * 1e3, p.throughput, p.bubble_ratio,
                    p.bytes_sent / 1e3, "/".join(map(str, bits)) or "-", len(p.end_nodes), acc])
    return tabulate(out, headers=["strategy", "latency ms", "period ms", "throughput /s", "bubble",
                                  "KB sent", "bits", "end nodes", "accuracy loss"], floatfmt=".2f")


def _plans(gm, inputs, dag, settings, strategies):  # noqa: ANN001, ANN202
    plans, oracle = [], None
    for st in strategies:
        if st.startswith("cloud-only+") and not dag.input_codecs and st not in strategies[:1]:
            continue   # the input is not an image: no camera codec baseline
        plan, oracle = plan_model(gm, inputs, dag, settings, st, oracle)
        plans.append(plan)
    return plans, oracle


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: expected sizes without the batch, e.g. 3,224,224") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape {text!r}: expected positive sizes, e.g. 3,224,224")
    return shape


def _model(a: argparse.Namespace):  # noqa: ANN202
    return load_model(a.model, weights=a.weights, input_shape=_shape(a.input_shape))


def cmd_profile(a: argparse.Namespace) -> int:
    """Time every node of the model here (run it on the device) and write a device profile."""
    model, shape = _model(a)
    x = torch.randn(a.batch, *shape)
    settings = Settings.of(progress=False)
    gm, inputs = traced(model, (x,), settings)
    with torch_threads(a.threads):
        times = measure_node_times(gm, inputs, a.repeat)
        # what a crossing costs this device per element, at every width a plan may use
        quant = {b: measure_quant_cost(bits=b) for b in sorted(set(settings.bits) | {settings.input_width}) if b < 32}
    path = write_profile(a.out, a.device, times, node_ops(gm), quant)
    print(f"wrote {path}: {len(times)} node times, measured {a.repeat} times each at batch {a.batch}; "
          f"quantization costs at {len(quant)} widths")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    model, shape = _model(a)
    x = torch.randn(a.batch, *shape)
    strategies = list(compared()) if a.strategy == "all" else [a.strategy]
    settings = _settings(a, strategies[0])
    t0 = time.perf_counter()
    gm, inputs, dag = prepare(model, (x,), settings)
    t_prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    plans, oracle = _plans(gm, inputs, dag, settings, strategies)
    t_plan = time.perf_counter() - t1
    net = settings.network
    print(f"model {a.model}: {len(dag)} DAG nodes, input {tuple(x.shape)}; uplink "
          f"{net.uplink_mbps:.2f} Mbit/s, end slowdown {a.slowdown}, costs {a.costs}")
    cm = CompiledModel(gm, dag, plans[0], settings, inputs, oracle)
    print(cm.report())
    if len(plans) > 1:
        print()
        print(compare_table(plans))
    if a.costs == "measured":
        chk = cm.prediction_check()
        if chk:
            print(f"\nper-node sum vs whole half (host): end {chk['end_pred_s']*1e3:.2f} ms predicted, "
                  f"{chk['end_meas_s']*1e3:.2f} ms measured ({chk['end_err']:+.1%}); cloud "
                  f"{chk['cloud_pred_s']*1e3:.2f} ms predicted, {chk['cloud_meas_s']*1e3:.2f} ms "
                  f"measured ({chk['cloud_err']:+.1%})")
    print(f"\ntiming: capture+profile {t_prep:.2f} s, planning {t_plan:.3f} s"
          + (f" ({oracle.evals} accuracy evaluations)" if oracle else ""))
    if a.save:
        print(f"saved to {cm.save(a.save, whole=a.save_whole, key=token_of(a))}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    model, shape = _model(a)
    x = torch.randn(a.batch, *shape)
    settings = _settings(a, "coach")
    print(f"coach demo: {a.model}, batch {a.batch}, uplink {a.uplink_mbps} Mbit/s, "
          f"end device {a.slowdown}x slower than this host")
    if a.costs == "measured":
        end = f"the profile {a.end_profile}" if a.end_profile else f"x{a.slowdown}"
        cloud = f"the profile {a.cloud_profile}" if a.cloud_profile else f"x{a.cloud_slowdown}"
        print("costs: every fx node timed on this host (its busy time: the smaller of wall and CPU "
              f"time, so other processes' load does not count); end device {end}, cloud {cloud}")
    t0 = time.perf_counter()
    gm, inputs, dag = prepare(model, (x,), settings)
    plans, oracle = _plans(gm, inputs, dag, settings, compared())
    cm = CompiledModel(gm, dag, plans[0], settings, inputs, oracle)
    with torch.no_grad():
        ref = model(x)
        y = cm(x)
    err = ((y - ref).norm() / ref.norm()).item()
    print(cm.report())
    print()
    print(compare_table(plans))
    # the best baseline that keeps the accuracy budget (one over it is no alternative)
    best_base = min((p for p in plans[1:] if p.accuracy is None or p.accuracy_ok), key=lambda p: p.period)
    print(f"\nsplit run: end half -> in-process link ({cm.plan.bytes_sent/1e3:.1f} KB) -> cloud half; "
          f"output relative L2 error vs eager {err:.2e}")
    print(f"coach throughput {plans[0].throughput:.2f}/s vs best baseline "
          f"{best_base.strategy} {best_base.throughput:.2f}/s "
          f"({plans[0].throughput / best_base.throughput:.2f}x); done in {time.perf_counter() - t0:.1f} s")
    return 0 if err <= max(settings.output_tolerance, 0.05) else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="coach", description="end-cloud split inference for PyTorch: "
                                 "plan where to cut a model, then serve its cloud half and run its end half")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    about = {"plan": "plan the split of a model and compare it with the published strategies",
             "demo": "plan a model and run its split as a pipeline here, measured",
             "profile": "time every node of a model on this device: a profile for --end-profile/--cloud-profile"}
    for name in ("plan", "demo", "profile"):
        p = sub.add_parser(name, help=about[name], description=about[name])
        p.add_argument("--model", default="torchvision:resnet18",
                       help="torchvision:NAME, digits, or package.module:callable")
        p.add_argument("--weights", default=None, metavar="FILE.safetensors",
                       help="the model's trained weights (default: random)")
        p.add_argument("--input-shape", default=None, metavar="C,H,W",
                       help="one input's shape without the batch (default: the model's input_shape)")
        p.add_argument("--batch", type=int, default=1 if name != "demo" else 2)
        p.add_argument("--repeat", type=int, default=5, help="profiling runs per node")
        # one thread by default where this host stands in for the devices: a device is then one
        # core of it, and the busy time of serial work does not grow with other processes' load
        # (threads that wait for each other on a busy host burn CPU: the plan would follow the load)
        p.add_argument("--threads", type=int, default=None if name == "profile" else 1,
                       help="torch threads for profiling (match what each side will use; default "
                            + ("torch's" if name == "profile" else "1") + ")")
        if name == "profile":
            p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the profile")
            p.add_argument("--device", default="device", help="the device's name in the profile")
            continue
        p.add_argument("--end-profile", default=None, metavar="FILE",
                       help="the end device's measured times (coach profile); replaces --slowdown")
        p.add_argument("--cloud-profile", default=None, metavar="FILE",
                       help="the cloud's measured times (coach profile); replaces --cloud-slowdown")
        p.add_argument("--uplink-mbps", type=float, default=10.0)
        p.add_argument("--downlink-mbps", type=float, default=None)
        p.add_argument("--rtt-ms", type=float, default=0.0)
        p.add_argument("--trace", default=None, help="bandwidth trace file (plans with its mean)")
        p.add_argument("--trace-scale", type=float, default=1.0)
        p.add_argument("--slowdown", type=float, default=8.0, help="end device slowdown vs this host")
        p.add_argument("--cloud-slowdown", type=float, default=1.0)
        p.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
        p.add_argument("--costs", choices=["measured", "analytic"], default="measured")
        p.add_argument("--budget", type=float, default=0.005, help="accuracy budget")
        if name == "plan":
            p.add_argument("--strategy", default="coach",
                           choices=sorted(STRATEGIES) + ["all"])
        if name == "plan":
            p.add_argument("--save", default=None, metavar="DIR",
                           help="write the plan and both halves (for coach serve / coach run)")
            p.add_argument("--save-whole", action="store_true",
                           help="with --save: also the whole model (for coach run --fallback local)")
            p.add_argument("--token-file", default=None, metavar="PATH",
                           help="with --save: sign the plan with this shared secret (default: "
                                "$COACH_TOKEN; coach serve/run load only a plan signed with theirs)")
    add_deploy_commands(sub)
    return ap


def main(argv: list[str]) -> int:
    """``coach plan``, ``coach demo``, ``coach profile`` (and the help of every command)."""
    ap = _parser()
    a = ap.parse_args(argv)
    if a.cmd in DEPLOY_COMMANDS:   # reached only through this parser's help; run it as the deploy side
        return deploy_main(argv)
    cmds = {"plan": cmd_plan, "demo": cmd_demo, "profile": cmd_profile}
    try:
        return cmds[a.cmd](a)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as e:
        print(f"coach: error: {e}", file=sys.stderr)
        return 2
