"""The ``coach`` command: ``coach plan``, ``coach demo``, and the two sides of a saved plan,
``coach serve`` (the cloud, many ends at once) and ``coach run`` (an end).

    coach plan --model torchvision:resnet18 --uplink-mbps 10 --slowdown 8
    coach plan --model resnet50 --strategy all
    coach demo
    coach serve plan_dir --port 29517            # until SIGTERM/Ctrl-C; --sessions N: N ends
    coach serve plan_dir --host 0.0.0.0 --tls-cert cloud.pem --tls-key cloud.key
    coach run plan_dir --host cloud.example --tls-ca cloud.pem --frames 100

The shared token comes from ``--token-file`` or ``$COACH_TOKEN``, never the command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import torch
from tabulate import tabulate

from coach_fx.api import SERVE_MAX_BATCH, SERVE_MAX_WAIT_S
from coach_fx.compiled import CompiledModel
from coach_fx.driver import plan_model, prepare
from coach_fx.zoo.models import load_model
from coach_fx.optimize import COMPARED, STRATEGIES
from coach_fx.settings import Device, Network, Settings


def _settings(a: argparse.Namespace, strategy: str) -> Settings:
    if a.trace:
        net = Network.from_trace(a.trace, scale=a.trace_scale, rtt_ms=a.rtt_ms,
                                 downlink_mbps=a.downlink_mbps)
    else:
        net = Network(a.uplink_mbps, a.downlink_mbps, a.rtt_ms)
    return Settings(network=net, end=Device("end", a.slowdown), cloud=Device("cloud", a.cloud_slowdown),
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


def cmd_plan(a: argparse.Namespace) -> int:
    model, shape = load_model(a.model)
    x = torch.randn(a.batch, *shape)
    strategies = list(COMPARED) if a.strategy == "all" else [a.strategy]
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
    model, shape = load_model(a.model)
    x = torch.randn(a.batch, *shape)
    settings = _settings(a, "coach")
    print(f"coach demo: {a.model}, batch {a.batch}, uplink {a.uplink_mbps} Mbit/s, "
          f"end device {a.slowdown}x slower than this host")
    t0 = time.perf_counter()
    gm, inputs, dag = prepare(model, (x,), settings)
    plans, oracle = _plans(gm, inputs, dag, settings, COMPARED)
    cm = CompiledModel(gm, dag, plans[0], settings, inputs, oracle)
    with torch.no_grad():
        ref = model(x)
        y = cm(x)
    err = ((y - ref).norm() / ref.norm()).item()
    print(cm.report())
    print()
    print(compare_table(plans))
    best_base = min((p for p in plans[1:]), key=lambda p: p.period)
    print(f"\nsplit run: end half -> in-process link ({cm.plan.bytes_sent/1e3:.1f} KB) -> cloud half; "
          f"output relative L2 error vs eager {err:.2e}")
    print(f"coach throughput {plans[0].throughput:.2f}/s vs best baseline "
          f"{best_base.strategy} {best_base.throughput:.2f}/s "
          f"({plans[0].throughput / best_base.throughput:.2f}x); done in {time.perf_counter() - t0:.1f} s")
    return 0 if err <= max(settings.output_tolerance, 0.05) else 1


#: What ``--host`` may be with ``--link gloo``: its store listens on every interface anyway.
GLOO_HOSTS = ("0.0.0.0", "::")


def cmd_serve(a: argparse.Namespace) -> int:
    from coach_fx.artifact import load_half
    from coach_fx.runtime.cloud import CloudWorker
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.links.gloo import GlooEndpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.link == "tcp":
        return _serve_tcp(a)
    half = load_half(a.dir, "cloud", key=token_of(a))
    slowdown = a.slowdown if a.slowdown is not None else half.meta["cloud"]["slowdown"]
    config = StreamConfig(cloud_slowdown=slowdown, timeout_s=a.timeout)
    plans = {0: (half.module, half.boundary)}
    print(f"coach serve: cloud half of {a.dir} on {a.host}:{a.port} (gloo, slowdown "
          f"{slowdown}); waiting for the end side", flush=True)
    ep = GlooEndpoint("cloud", a.host, a.port, timeout_s=a.timeout)
    print("coach serve: the end side is connected", flush=True)
    worker = CloudWorker(plans, ep, config)
    try:
        worker.serve()
    finally:
        ep.close()
    print(f"coach serve: served {worker.served} requests, busy {worker.busy_s:.2f} s", flush=True)
    return 0


def token_of(a: argparse.Namespace) -> bytes | None:
    """The shared secret from ``--token-file`` (None: ``$COACH_TOKEN``, read by the link)."""
    if a.token_file is None:
        return None
    try:
        return open(a.token_file, "rb").read().strip()
    except OSError as e:
        raise SystemExit(f"coach: cannot read the token file {a.token_file}: {e.strerror}") from None


def tls_of(a: argparse.Namespace) -> object:
    """The TLS settings of ``--tls-*`` (None: no TLS)."""
    from coach_fx.runtime.links.tls import TlsConfig
    if not (a.tls_cert or a.tls_key or a.tls_ca):
        return None
    return TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca,
                     server_name=getattr(a, "tls_server_name", None))


def _serve_tcp(a: argparse.Namespace) -> int:
    """``coach serve`` over TCP: many ends at once (``coach_fx.serve``); SIGTERM drains."""
    from coach_fx.api import serve
    from coach_fx.artifact import load_half
    from coach_fx.runtime.config import ServerConfig, StreamConfig

    token = token_of(a)
    slowdown = a.slowdown if a.slowdown is not None else \
        load_half(a.dir, "cloud", key=token).meta["cloud"]["slowdown"]
    config = StreamConfig(cloud_slowdown=slowdown, timeout_s=a.timeout, max_batch=a.max_batch,
                          max_wait_s=a.max_wait_ms / 1e3)
    tls = tls_of(a)
    # the handler only notes the signal (installed before anything can be announced); the
    # main thread drains, so that the summary follows the drain and no thread outlives it
    term = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: term.set())
    server = None
    drained: bool | None = None
    try:
        server = serve(a.dir, a.host, a.port, token=token, tls=tls, config=config,
                       limits=ServerConfig(max_ends=a.max_ends), sessions=a.sessions or None)
        host, port = server.address
        print(f"coach serve: cloud half of {a.dir} on {host}:{port} ({'TLS, ' if tls else ''}token "
              f"required, slowdown {slowdown}, up to {a.max_ends} ends at once, batches of up to "
              f"{a.max_batch}); " + (f"serving {a.sessions} session(s)" if a.sessions
                                     else "serving until SIGTERM or Ctrl-C"), flush=True)
        while not server.wait(0.2):
            if term.is_set():   # stop taking work, answer what was read
                print("coach serve: SIGTERM: draining", flush=True)
                drained = server.drain()
                break
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
    if server is None:   # SIGTERM while loading: nothing was served
        return 0
    st = server.snapshot()
    print(f"coach serve: {st.sessions} session(s), served {st.served} requests in {st.batches} "
          f"batches, {st.rejected} bad frames answered with an error, {st.refused} connections "
          f"refused, {st.turned_away} turned away"
          + ("; drained" if drained else "; drain timed out" if drained is False else ""), flush=True)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from coach_fx.artifact import load_half, make_frames
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.end import EndWorker
    from coach_fx.runtime.links.gloo import GlooEndpoint
    from coach_fx.runtime.policy import StaticPolicy
    from coach_fx.traces import Trace

    if a.threads:
        torch.set_num_threads(a.threads)
    token = token_of(a)
    half = load_half(a.dir, "end", key=token)
    if half.boundary.end_only:
        raise ValueError(f"{a.dir} holds an end-only plan: nothing to send to a cloud")
    shape = Trace.load(a.trace, scale=a.trace_scale) if a.trace else (
        Trace.constant(a.uplink_mbps) if a.uplink_mbps else None)
    slowdown = a.slowdown if a.slowdown is not None else half.meta["end"]["slowdown"]
    frames = make_frames(half.input_specs, a.frames, a.seed)
    local = load_half(a.dir, "model", key=token).module if a.fallback == "local" else None
    if a.link == "tcp":
        from coach_fx.runtime.links.tcp import connect

        def dial(retry_for: float = 0.0) -> object:
            return connect(a.host, a.port, token=token, timeout_s=a.timeout, shape=shape,
                           retry_for=retry_for, tls=tls_of(a))
        # wait for the cloud to come up (it listens once its half is loaded), so that the
        # end half is timed for the emulation while the host is quiet
        try:
            ep = dial(retry_for=a.timeout)
        except Exception:  # noqa: BLE001
            if not a.fallback:
                raise
            ep = None
        reconnect = dial
    else:
        ep = GlooEndpoint("end", a.host, a.port, timeout_s=a.timeout, shape=shape)
        reconnect = None
    policy = StaticPolicy(half.module, half.boundary)
    worker = EndWorker(ep, half.out_spec, policy,
                       StreamConfig(end_slowdown=slowdown, timeout_s=a.timeout, fallback=a.fallback),
                       local_module=local, reconnect=reconnect)
    try:
        outs, stats = worker.run(frames, predicted=half.meta.get("predicted"))
        try:
            worker.close()
        except Exception:  # noqa: BLE001 - the cloud may be gone (a fallback handled it)
            pass
    finally:
        if worker.endpoint is not None:
            worker.endpoint.close()
    rate = f"trace {a.trace} x{a.trace_scale}" if a.trace else (
        f"{a.uplink_mbps} Mbit/s" if a.uplink_mbps else "unshaped")
    ref = f"; end half {policy.end_host_s * 1e3:.2f} ms on this host" if policy.end_host_s else ""
    print(f"coach run: {a.frames} frames, end slowdown {slowdown}, uplink {rate}{ref}")
    print(stats.table())
    if a.fallback:
        print(f"faults: {stats.fell_back} run locally, {stats.failed} failed, {stats.dropped} late "
              f"replies dropped, {stats.reconnects} reconnects")
    if a.save_outputs:
        from coach_fx._compat import tree_flatten
        arrays = {f"o{i}_{j}": t.numpy() for i, o in enumerate(outs) if not isinstance(o, Exception)
                  for j, t in enumerate(tree_flatten(o)[0]) if isinstance(t, torch.Tensor)}
        np.savez(a.save_outputs, **arrays)
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="coach", description="end-cloud split inference for PyTorch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("plan", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="torchvision:resnet18",
                       help="torchvision:NAME, digits, or package.module:callable")
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
        p.add_argument("--batch", type=int, default=1 if name == "plan" else 2)
        p.add_argument("--repeat", type=int, default=5, help="profiling runs per node")
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads for profiling (match what each side will use)")
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
    _add_deploy_commands(sub)
    return ap


def _add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """``coach serve`` and ``coach run``: the two sides of a saved plan."""
    for name in ("serve", "run"):
        p = sub.add_parser(name, help="cloud side of a saved plan" if name == "serve"
                           else "end side of a saved plan: stream frames to a coach serve")
        p.add_argument("dir")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=29517)
        p.add_argument("--timeout", type=float, default=30.0, help="seconds before a peer counts as gone")
        p.add_argument("--slowdown", type=float, default=None, help="default: the saved plan's")
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads for this side (on a small host: 1 per side)")
        if name == "serve":
            p.add_argument("--sessions", type=int, default=0,
                           help="stop after this many ends have finished (default: serve until interrupted)")
            p.add_argument("--max-ends", type=int, default=64, help="ends served at once")
            p.add_argument("--max-batch", type=int, default=SERVE_MAX_BATCH,
                           help="requests of all ends run through the cloud half together, up to this many")
            p.add_argument("--max-wait-ms", type=float, default=SERVE_MAX_WAIT_S * 1e3,
                           help="how long the first request of a batch waits for more")
            p.add_argument("--tls-cert", default=None, metavar="PEM", help="the cloud's TLS certificate")
            p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
            p.add_argument("--tls-ca", default=None, metavar="PEM",
                           help="require client certificates signed by this CA")
        else:
            p.add_argument("--tls-ca", default=None, metavar="PEM",
                           help="use TLS; check the cloud's certificate against this CA (or the "
                                "cloud's self-signed certificate)")
            p.add_argument("--tls-cert", default=None, metavar="PEM", help="this end's client certificate")
            p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
            p.add_argument("--tls-server-name", default=None,
                           help="the name the cloud's certificate must carry (default: --host)")
        p.add_argument("--link", choices=["tcp", "gloo"], default="tcp",
                       help="tcp: authenticated, binds only --host (default); gloo: "
                            "torch.distributed, unauthenticated, for trusted networks")
        # never the secret itself on the command line: any user can read it in ps
        p.add_argument("--token-file", default=None, metavar="PATH",
                       help="file holding the shared secret for --link tcp (default: $COACH_TOKEN)")
        if name == "run":
            p.add_argument("--trace", default=None, help="shape the uplink to this bandwidth trace")
            p.add_argument("--trace-scale", type=float, default=1.0)
            p.add_argument("--uplink-mbps", type=float, default=None, help="shape to a constant rate")
            p.add_argument("--frames", type=int, default=50)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--save-outputs", default=None, metavar="FILE.npz")
            p.add_argument("--fallback", choices=["local", "error"], default=None,
                           help="when the cloud fails: run requests locally (needs a plan saved "
                                "with --save-whole) or fail them; reconnects meanwhile")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.cmd == "serve" and a.link == "gloo" and a.host not in GLOO_HOSTS:
        # torch.distributed's store binds every interface whatever address it is given:
        # accepting 127.0.0.1 would promise what gloo does not do
        ap.error(f"--link gloo listens on every interface (torch.distributed's store cannot bind "
                 f"one address), so --host {a.host} would not hold: pass --host 0.0.0.0 on a "
                 "trusted network, or use --link tcp (authenticated, binds only --host)")
    if a.cmd == "serve" and a.link == "gloo" and (a.tls_cert or a.tls_ca):
        ap.error("--link gloo has no TLS; use --link tcp")
    cmds = {"plan": cmd_plan, "demo": cmd_demo, "serve": cmd_serve, "run": cmd_run}
    try:
        rc = cmds[a.cmd](a)
        if a.cmd == "serve":
            # daemon threads (a session's writer, a link's receiver) may still be inside torch
            # when the interpreter tears torch down: that aborts ("terminate called...") now
            # and then. The server has stopped and said so; leave without the teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as e:
        print(f"coach: error: {e}", file=sys.stderr)
        if a.cmd in ("serve", "run"):
            # a failed gloo link may leave a receive posted; its C++ teardown would abort
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
