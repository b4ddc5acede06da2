"""``coach serve`` and ``coach run``: the two sides of a saved plan (the cloud, serving many
ends at once; an end streaming frames to it), their options, the shared token from
``--token-file`` or ``$COACH_TOKEN`` and TLS from ``--tls-*``. ``coach_fx.cli`` builds the
whole command line.
"""

from __future__ import annotations

import argparse
import signal
import threading

import torch

from coach_fx.api import SERVE_MAX_BATCH, SERVE_MAX_WAIT_S
from coach_fx.runtime.links.tls import TlsConfig


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


def tls_of(a: argparse.Namespace) -> TlsConfig | None:
    """The TLS settings of ``--tls-*`` (None: no TLS)."""
    if not (a.tls_cert or a.tls_key or a.tls_ca):
        return None
    return TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca,
                     server_name=a.tls_server_name)


def _serve_tcp(a: argparse.Namespace) -> int:
    """``coach serve`` over TCP: many ends at once (``coach_fx.serve``); SIGTERM drains."""
    from coach_fx.api import serve
    from coach_fx.artifact import plan_meta
    from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig

    token = token_of(a)
    # only plan.json here: coach_fx.serve loads (and verifies) the half itself
    slowdown = a.slowdown if a.slowdown is not None else plan_meta(a.dir, token)["cloud"]["slowdown"]
    config = StreamConfig(cloud_slowdown=slowdown, timeout_s=a.timeout, batching=Batching(a.max_batch, a.max_wait_ms / 1e3))
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
              f"required, slowdown {slowdown}, up to {a.max_ends} ends at once, "
              + (f"batches of up to {a.max_batch}" if server.batching else
                 "one request at a time: this plan's cloud half does not batch") + "); " + (f"serving {a.sessions} session(s)" if a.sessions
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
                       whole_model=local, reconnect=reconnect)
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
        o = stats.outcomes
        print(f"faults: {o.fell_back} run locally, {o.failed} failed, {o.dropped} late "
              f"replies dropped, {o.reconnects} reconnects")
    if a.save_outputs:
        from coach_fx._compat import tree_flatten
        arrays = {f"o{i}_{j}": t.numpy() for i, o in enumerate(outs) if not isinstance(o, Exception)
                  for j, t in enumerate(tree_flatten(o)[0]) if isinstance(t, torch.Tensor)}
        np.savez(a.save_outputs, **arrays)
    return 0


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
            p.add_argument("--frames", type=int, default=50)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--save-outputs", default=None, metavar="FILE.npz")
            p.add_argument("--fallback", choices=["local", "error"], default=None,
                           help="when the cloud fails: run requests locally (needs a plan saved "
                                "with --save-whole) or fail them; reconnects meanwhile")
