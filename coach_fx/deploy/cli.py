"""``coach serve`` and ``coach run``: the two sides of a saved plan (the cloud, serving many
ends at once; an end streaming frames to it), their options, the shared token from
``--token-file`` or ``$COACH_TOKEN`` and TLS from ``--tls-*``. ``coach_fx.cli`` sends these
two commands here (nothing of the compile side is loaded); ``coach --help`` lists them too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from coach_fx.deploy.service import SERVE_MAX_BATCH, SERVE_MAX_WAIT_S
from coach_fx.progress import Progress
from coach_fx.runtime.compute import ENGINES
from coach_fx.runtime.config import Batching, RaySettings
from coach_fx.runtime.links.tls import TlsConfig


#: The commands of this side of ``coach``.
DEPLOY_COMMANDS = ("serve", "run")
#: What ``--host`` may be with ``--link gloo``: its store listens on every interface anyway.
GLOO_HOSTS = ("0.0.0.0", "::")


def cmd_serve(a: argparse.Namespace) -> int:
    from coach_fx.deploy import open_plan
    from coach_fx.runtime.cloud import CloudWorker
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.links.gloo import GlooEndpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.link == "tcp":
        return _serve_tcp(a)
    if a.engine != "builtin":
        raise SystemExit("coach serve: --engine ray serves over --link tcp (the gloo link has one end, no front door)")
    saved = open_plan(a.dir, "cloud", key=token_of(a))
    if saved.online:
        raise SystemExit(f"coach serve: {a.dir} holds an online model: serve it over --link tcp (its requests "
                         "carry their plan and bits, which the gloo link's cloud does not read)")
    slowdown = a.slowdown if a.slowdown is not None else saved.cloud_slowdown
    config = StreamConfig(cloud_slowdown=slowdown, timeout_s=a.timeout)
    plans = {0: (saved.cloud[0].module, saved.boundary)}
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


def tls_of(a: argparse.Namespace) -> TlsConfig | None:
    """The TLS settings of ``--tls-*`` (None: no TLS)."""
    if not (a.tls_cert or a.tls_key or a.tls_ca):
        return None
    return TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca,
                     server_name=a.tls_server_name)


def ray_of(a: argparse.Namespace) -> RaySettings | None:
    """``--ray-address``, ``--replicas`` and ``--autoscale`` (None: not ``--engine ray``)."""
    if a.engine != "ray":
        return None
    try:
        scale = RaySettings.parse_autoscale(a.autoscale) if a.autoscale else None
        return RaySettings(a.ray_address, a.replicas, scale)
    except ValueError as e:
        raise SystemExit(f"coach serve: {e}") from None


def _serve_tcp(a: argparse.Namespace) -> int:
    """``coach serve`` over TCP: many ends at once (``coach_fx.serve``); SIGTERM drains."""
    from coach_fx.deploy.service import serve
    from coach_fx.deploy import open_plan
    from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig

    ray = ray_of(a)   # a bad --autoscale fails before anything is read
    token = token_of(a)
    saved = open_plan(a.dir, "cloud", key=token)   # opened once: coach_fx.serve takes it as it is
    slowdown = a.slowdown if a.slowdown is not None else saved.cloud_slowdown
    config = StreamConfig(cloud_slowdown=slowdown, timeout_s=a.timeout,
                          batching=Batching(a.max_batch, a.max_wait_ms / 1e3, a.shared_latency or None))
    device = a.device or saved.cloud_device
    tls = tls_of(a)
    # the handler only notes the signal (installed before anything can be announced); the
    # main thread drains, so that the summary follows the drain and no thread outlives it
    term = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        term.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    server = None
    drained: bool | None = None
    try:
        server = serve(saved, a.host, a.port, token=token, tls=tls, config=config,
                       limits=ServerConfig(max_ends=a.max_ends), sessions=a.sessions or None,
                       engine=a.engine, ray=ray, device=device)
        signal.signal(signal.SIGTERM, on_term)   # ray.init installs its own (it aborts the process)
        host, port = server.address
        what = (f"cloud half of each of the {len(server.engine.plans)} plans of the online model {a.dir}"
                if len(server.engine.plans) > 1 else f"cloud half of {a.dir}")
        if ray is not None:
            what += (f" on Ray Serve ({ray.address or 'a local Ray'}, "
                     + (f"{ray.autoscale[0]}-{ray.autoscale[1]} replicas, autoscaled" if ray.autoscale
                        else f"{ray.replicas} replica(s)") + ")")
        if device != "cpu":
            what += f" on {device}"
        print(f"coach serve: {what} on {host}:{port} ({'TLS, ' if tls else ''}token "
              f"required, slowdown {slowdown}, up to {a.max_ends} ends at once, "
              + (f"batches of up to {a.max_batch}, {server.shared_batch} while ends share it" if server.batching else
                 "one request at a time: this plan's cloud half does not batch") + "); " + (f"serving {a.sessions} session(s)" if a.sessions
                                     else "serving until SIGTERM or Ctrl-C"), flush=True)
        while not server.wait(0.2):
            if term.is_set():   # stop taking work, answer what was read
                print("coach serve: SIGTERM: draining", flush=True)
                drained = server.drain()
                break
        if server.fatal is not None:
            raise RuntimeError(f"the server stopped: its compute thread failed with "
                               f"{type(server.fatal).__name__}: {server.fatal}")
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
    from coach_fx.deploy import open_plan
    from coach_fx.deploy.inputs import make_frames
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.traces import Trace

    if a.threads:
        torch.set_num_threads(a.threads)
    token = token_of(a)
    # opened once, its end side verified; connect (or the gloo end) runs it as it is
    saved = open_plan(a.dir, "end", key=token, whole=a.fallback == "local")
    online = saved.online
    if online and a.link != "tcp":
        raise ValueError(f"{a.dir} holds an online model: it runs over --link tcp (its requests "
                         "carry their plan and bits, which the gloo link's cloud does not read)")
    if a.mode is not None and not online:
        raise ValueError(f"--mode is for an online model (om.save); {a.dir} holds one compiled plan")
    shape = Trace.load(a.trace, scale=a.trace_scale) if a.trace else (
        Trace.constant(a.uplink_mbps) if a.uplink_mbps else None)
    slowdown = a.slowdown if a.slowdown is not None else saved.end_slowdown
    if a.input is not None:
        from coach_fx.deploy.inputs import read_inputs
        source = read_inputs(a.input, saved.inputs)
        named, total = iter(source), source.count
    else:
        named = ((f"synthetic[{k}]", x) for k, x in enumerate(make_frames(saved.inputs, a.synthetic, a.seed)))
        total = a.synthetic
    config = StreamConfig(end_slowdown=slowdown, timeout_s=a.timeout, fallback=a.fallback)
    names: list[str] = []

    def frames() -> Iterator[tuple]:
        for name, x in named:
            names.append(name)
            yield x
    writer = OutputWriter(a.output)
    bar = Progress("coach run", enabled=not a.quiet)
    if a.link == "tcp":
        import coach_fx
        with coach_fx.connect(saved, (a.host, a.port), token=token, tls=tls_of(a), fallback=a.fallback,
                              config=config, shape=shape, mode=a.mode) as rm:
            for k, out in enumerate(rm.stream(frames())):
                writer.add(names[k], out)
                hits = rm.outcomes.answered_on_end
                bar.update(k + 1, total or k + 1, f"coach run {k + 1} frames" + (f", {hits} hits" if hits else ""))
            stats = rm.stats()
            summary = rm.policy.summary() if online else None
    else:
        stats, summary = _run_gloo(a, saved, shape, config, frames(), names, writer), None
    bar.close()
    writer.close()
    rate = f"trace {a.trace} x{a.trace_scale}" if a.trace else (
        f"{a.uplink_mbps} Mbit/s" if a.uplink_mbps else "unshaped")
    print(f"coach run: {stats.n} frames from {a.input or 'synthetic frames'}, end slowdown {slowdown}, "
          f"uplink {rate}" + (f"; results in {a.output}" if a.output else ""))
    print(stats.table())
    if summary is not None:
        print(f"online ({a.mode or 'full'}): {summary['hits']} cache hits ({summary['audits']} audited), "
              f"{summary['finished_on_end']} finished on the end, {summary['switches']} plan switches, "
              f"bits used {summary['bits']}, plans used {summary['plans']}")
    if a.fallback:
        o = stats.outcomes
        print(f"faults: {o.fell_back} run locally, {o.failed} failed, {o.dropped} late "
              f"replies dropped, {o.reconnects} reconnects")
    return 0


def _run_gloo(a: argparse.Namespace, saved: Any, shape: Any, config: Any, frames: Iterator[tuple],
              names: list[str], writer: "OutputWriter") -> Any:
    """The end side over torch.distributed (trusted networks): one stream, no reconnects."""
    from coach_fx.runtime.end import EndWorker
    from coach_fx.runtime.links.gloo import GlooEndpoint

    policy = saved.end_policy()   # refuses an end-only plan
    ep = GlooEndpoint("end", a.host, a.port, timeout_s=a.timeout, shape=shape)
    worker = EndWorker(ep, saved.out_spec, policy, config, whole_model=saved.whole)
    try:
        outs, stats = worker.run(frames, predicted=saved.predicted)
        worker.close()
    finally:
        ep.close()
    for k, out in enumerate(outs):
        writer.add(names[k], out)
    return stats


class OutputWriter:
    """``--output``: ``.jsonl`` (one line per frame as it comes: its name and, for a classifier's
    (N, classes) output, the top-1 class of each sample) or ``.npz`` (every output tensor)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.kind = None if path is None else Path(path).suffix.lower()
        if self.kind not in (None, ".jsonl", ".npz"):
            raise ValueError(f"--output {path}: write .jsonl or .npz")
        self.file = open(path, "w") if self.kind == ".jsonl" else None
        self.arrays: dict[str, Any] = {}
        self.n = 0

    def add(self, name: str, out: Any) -> None:
        from coach_fx.passes._compat import tree_flatten
        k, self.n = self.n, self.n + 1
        if self.kind is None:
            return
        if isinstance(out, Exception):
            row: dict[str, Any] = {"frame": k, "source": name, "error": str(out)}
        else:
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if self.kind == ".npz":
                self.arrays.update({f"o{k}_{j}": t.numpy() for j, t in enumerate(tensors)})
                return
            row = {"frame": k, "source": name}
            if len(tensors) == 1 and tensors[0].dim() == 2:
                row["top1"] = tensors[0].argmax(1).tolist()
            else:
                row["shapes"] = [list(t.shape) for t in tensors]
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        elif self.kind == ".npz":
            import numpy as np
            np.savez(self.path, **self.arrays)


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
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
            p.add_argument("--shared-latency", type=float, default=Batching().shared_latency, metavar="X",
                           help="while several ends share the server, a batch takes at most X times one "
                                "request alone (0: no such bound, batches of up to --max-batch)")
            p.add_argument("--device", default=None, metavar="cpu|cuda",
                           help="where the cloud halves run (default: the plan's cloud device)")
            p.add_argument("--engine", choices=tuple(ENGINES), default="builtin",
                           help="where the cloud halves run: this process (builtin) or the replicas "
                                "of a Ray Serve deployment (ray; pip install 'coach-fx[ray]')")
            p.add_argument("--ray-address", default=None, metavar="ADDR",
                           help="a running Ray cluster (e.g. auto, ray://head:10001); default: start a local Ray")
            scale = p.add_mutually_exclusive_group()
            scale.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas of the cloud halves")
            scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                               help="let Ray Serve scale the replicas between MIN and MAX on the load")
            p.add_argument("--tls-cert", default=None, metavar="PEM", help="the cloud's TLS certificate")
            p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
            p.add_argument("--tls-ca", default=None, metavar="PEM",
                           help="require client certificates signed by this CA")
            p.set_defaults(tls_server_name=None)   # the cloud checks no server name
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
            src = p.add_mutually_exclusive_group()
            src.add_argument("--input", default=None, metavar="PATH",
                             help="your frames: a folder of PNG/JPEG images (resized to the plan's "
                                  "input, floats in [0, 1]), .npy files, or a video torchvision decodes")
            src.add_argument("--synthetic", type=int, default=50, metavar="N",
                             help="N random frames of the plan's input shape (default, 50)")
            p.add_argument("--seed", type=int, default=0, help="of the synthetic frames")
            p.add_argument("--output", default=None, metavar="FILE",
                           help="results: .jsonl (top-1 class per frame for classifiers) or .npz")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
            p.add_argument("--mode", choices=["fixed", "adaptive", "cache", "full"], default=None,
                           help="how an online model (om.save) runs (default full: bits per request, "
                                "plan switching, cache hits answered here)")
            p.add_argument("--fallback", choices=["local", "error"], default=None,
                           help="when the cloud fails: run requests locally (needs a plan saved "
                                "with --save-whole) or fail them; reconnects meanwhile")


def main(argv: list[str]) -> int:
    """``coach serve ...`` or ``coach run ...`` (``argv`` starts with the command)."""
    ap = argparse.ArgumentParser(prog="coach", description="the two sides of a saved plan")
    add_deploy_commands(ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    a = ap.parse_args(argv)
    if a.cmd == "serve" and a.link == "gloo" and a.host not in GLOO_HOSTS:
        # torch.distributed's store binds every interface whatever address it is given:
        # accepting 127.0.0.1 would promise what gloo does not do
        ap.error(f"--link gloo listens on every interface (torch.distributed's store cannot bind "
                 f"one address), so --host {a.host} would not hold: pass --host 0.0.0.0 on a "
                 "trusted network, or use --link tcp (authenticated, binds only --host)")
    if a.cmd == "serve" and a.link == "gloo" and (a.tls_cert or a.tls_ca):
        ap.error("--link gloo has no TLS; use --link tcp")
    try:
        rc = (cmd_serve if a.cmd == "serve" else cmd_run)(a)
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
        # a failed gloo link may leave a receive posted; its C++ teardown would abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
