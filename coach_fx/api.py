"""The public entry points: ``coach_fx.compile`` (a model split between an end device and the
cloud), ``coach_fx.serve`` (a saved plan's cloud half served to many ends) and
``coach_fx.connect`` (the end side: the user's own inputs through a served plan).

Example::

    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(10),          # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> y = cm(x); print(cm.report())                                             # doctest: +SKIP
    >>> cm.save("plan_dir", key=token)                                            # doctest: +SKIP
    >>> server = coach_fx.serve("plan_dir", host="0.0.0.0", token=token)          # doctest: +SKIP
    >>> rm = coach_fx.connect("plan_dir", "cloud:29517", token=token)             # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from torch import nn

from coach_fx.compiled import CompiledModel
from coach_fx.driver import observing, plan_model, prepare
from coach_fx.passes.eval_calls import eval_calls
from coach_fx.settings import DEFAULT_BITS, Settings

if TYPE_CHECKING:
    from coach_fx.online import OnlineModel
    from coach_fx.runtime.config import RaySettings, ServerConfig, StreamConfig
    from coach_fx.runtime.links.tls import TlsConfig
    from coach_fx.runtime.client import RemoteModel
    from coach_fx.runtime.server import CloudServer
    from coach_fx.runtime.traces import Trace

#: How a server batches by default: up to this many requests, the first held at most this long.
SERVE_MAX_BATCH = 32
SERVE_MAX_WAIT_S = 0.002


def compile(model: nn.Module, example_inputs: Any, *, network: Any = None, end: Any = None,
            cloud: Any = None, strategy: str = "coach", objective: str = "throughput",
            accuracy_budget: float = 0.005, calibration: Any = None,
            bits: Sequence[int] = DEFAULT_BITS, costs: str = "measured",
            **options: Any) -> CompiledModel:
    """Split ``model`` between an end device and the cloud; see the module docstring.

    Other keywords (``end_nodes``, ``manual_bits``, ``input_bits``, ``output_tolerance``,
    ``leaf_modules``, ``max_plans``, ``progress``...) are fields of :class:`coach_fx.Settings`.
    """
    kw: dict[str, Any] = dict(strategy=strategy, objective=objective, accuracy_budget=accuracy_budget,
                              calibration=calibration, bits=bits, costs=costs)
    for k, v in (("network", network), ("end", end), ("cloud", cloud)):
        if v is not None:
            kw[k] = v
    if strategy == "manual" and "manual_bits" not in options and isinstance(bits, (int, Mapping)):
        options["manual_bits"] = bits
        kw["bits"] = DEFAULT_BITS
    return compile_with(model, example_inputs, Settings.from_options(options, **kw))


def compile_with(model: nn.Module, example_inputs: Any, settings: Settings) -> CompiledModel:
    """``compile`` with its settings as one record (``cm.settings`` of another compile, changed)."""
    training = model.training
    # captured as it is (a train-mode forward may differ), planned in eval mode, and left
    # as it was: its buffers, flags and the random stream
    with observing(list(model.parameters()) + list(model.buffers())):
        gm, inputs, dag = prepare(model, example_inputs, settings)
        with observing((), [model, gm]):
            with eval_calls(gm):      # a graph with train-mode calls baked in (export, dynamo)
                plan, oracle = plan_model(gm, inputs, dag, settings)
            cm = CompiledModel(gm, dag, plan, settings, inputs, oracle, source=model)
            if settings.costs == "measured" and settings.remeasure:
                cm.remeasure()
    # the model's own flags are as they were (observing put back each module's, mixed ones
    # too, e.g. frozen batch norm in a training model); the compiled model follows the model
    cm.training = training
    return cm


#: How long ``connect()`` retries a cloud that is busy or not yet listening, before it says so
#: (ends that start together share a server's handshake places per address).
BUSY_RETRY_S = 5.0


def serve(plan_dir: str | Path, host: str = "127.0.0.1", port: int = 29517, *,
          token: bytes | str | None = None, tls: "TlsConfig | None" = None,
          config: "StreamConfig | None" = None, limits: "ServerConfig | None" = None,
          sessions: int | None = None, engine: str = "builtin", ray: "RaySettings | None" = None,
          device: str | None = None) -> "CloudServer":
    """Serve the cloud half of a saved plan (``cm.save``), or every plan's cloud half of a
    saved online model (``om.save``: each request names its plan and carries its own bits),
    to every end that holds ``token`` (default ``$COACH_TOKEN``), many at once; returns the
    running server (``.wait()``, ``.drain()``, ``.stop()``, ``.snapshot()``; a context
    manager). The same as ``coach serve``.

    The plan directory must be signed with the token (``cm.save(dir, key=token)``): it is
    verified before anything in it is read. ``config``: the cloud's slowdown and batching
    (default: the plan's slowdown, batches of up to ``SERVE_MAX_BATCH`` = 32, the first
    request held at most 2 ms for more); ``limits``: how many
    ends, handshakes and connections per peer (``ServerConfig``); ``sessions``: stop after that
    many ends have finished. ``device``: where the cloud halves and their dequantize ops run
    (default: the plan's ``Device("cloud", device=...)``; "cuda" batches them on the GPU). ``engine``: where the cloud halves run: ``"builtin"`` (this
    process) or ``"ray"`` (the replicas of a Ray Serve deployment, ``ray``: a
    :class:`~coach_fx.runtime.config.RaySettings`, default one replica on a local Ray; needs
    ``pip install 'coach-fx[ray]'``); the ends see the same protocol, token and TLS either way.

    Example::

        >>> with coach_fx.serve("plan_dir", port=0, token=token) as server:   # doctest: +SKIP
        ...     print(server.address); server.wait()
    """
    from coach_fx.runtime.compute import ENGINES, EngineSpec
    from coach_fx.runtime.compute import engine as build_engine
    from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig
    from coach_fx.runtime.links.credentials import shared_token
    from coach_fx.runtime.links.tcp import TcpServer
    from coach_fx.runtime.server import CloudServer, warm_up
    from coach_fx.saved_online import cloud_halves

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {engine!r}")
    secret = shared_token(token)
    halves, meta = cloud_halves(plan_dir, secret)
    online = meta.get("kind") == "online"
    if config is None:
        config = StreamConfig(cloud_slowdown=meta["cloud"]["slowdown"],
                              batching=Batching(SERVE_MAX_BATCH, SERVE_MAX_WAIT_S))
    device = device or meta["cloud"].get("device", "cpu")
    compute = build_engine(engine, EngineSpec(halves, config, online, device, str(plan_dir), secret, ray,
                                              name=f"coach-{port or os.getpid()}"))
    try:   # warm before the port is bound: an end that dials finds a server that answers
        warm_up(compute)
        listener = TcpServer(host, port, token=secret, timeout_s=config.timeout_s, tls=tls)
    except BaseException:
        compute.close()
        raise
    try:
        server = CloudServer(halves, listener, config, limits or ServerConfig(), adaptive=online,
                             sessions=sessions, compute=compute)
    except BaseException:
        listener.close()
        compute.close()
        raise
    try:
        return server.start()
    except BaseException:   # a plan that cannot run: nothing is left listening
        server.stop()
        raise


def connect(target: "CompiledModel | OnlineModel | str | Path", address: "str | tuple[str, int]", *,
            token: bytes | str | None = None, tls: "TlsConfig | None" = None,
            fallback: str | None = None, config: "StreamConfig | None" = None,
            shape: "Trace | None" = None, mode: str | None = None) -> "RemoteModel":
    """The end side of a served plan: ``target`` is the :class:`CompiledModel` whose plan the
    cloud serves, the :class:`~coach_fx.online.OnlineModel` whose plans it serves, or either's
    saved directory (verified with ``token``, default ``$COACH_TOKEN``); ``address`` is
    ``"host:port"`` or ``(host, port)`` of a ``coach serve``.

    Returns a :class:`~coach_fx.runtime.client.RemoteModel`: ``rm(x)``, ``rm.submit(x)`` (a
    future), ``rm.stream(frames)`` (results in order, the stages overlapping), ``rm.stats()``,
    ``rm.close()``; a context manager. ``fallback``: when the link or the cloud fails,
    ``None`` raises, ``"local"`` answers on this device with the whole model (a saved plan
    needs ``cm.save(dir, whole=True)``), ``"error"`` gives those requests a ``RequestFailed``;
    reconnects go on in the background. ``config``: the stream's queues and timeouts
    (``StreamConfig``; its ``fallback`` is this one's). ``shape``: pace the uplink to this
    bandwidth trace (to try a plan on a slower link than the one at hand). ``mode``: how an
    online model runs (``"full"``, the default: bits per request from the bandwidth the
    cloud's replies report, plan switching by band, cache hits answered here, finishing here
    when the link stalls; ``"fixed"``, ``"adaptive"``, ``"cache"``: see ``MODES``), the same
    policy as ``OnlineModel.stream``; ``rm.policy.summary()`` tells what it decided.

    Example::

        >>> with coach_fx.connect("plan_dir", "cloud:29517", fallback="local") as rm:  # doctest: +SKIP
        ...     for out in rm.stream(frames):
        ...         print(out.argmax(1))
    """
    import dataclasses

    from coach_fx.runtime.client import RemoteModel
    from coach_fx.runtime.config import StreamConfig
    from coach_fx.runtime.links.credentials import shared_token
    from coach_fx.runtime.links.tcp import connect as dial_tcp

    host, port = parse_address(address)
    config = dataclasses.replace(config or StreamConfig(), fallback=fallback)
    secret = shared_token(token)
    policy, out_spec, whole = _end_side(target, secret, fallback == "local", mode)

    def dial() -> Any:
        return dial_tcp(host, port, token=secret, timeout_s=config.timeout_s, shape=shape, tls=tls,
                        retry_for=BUSY_RETRY_S)
    return RemoteModel(policy, out_spec, dial, config, whole_model=whole)


def _end_side(target: Any, secret: bytes, whole: bool, mode: str | None) -> tuple[Any, Any, Any]:
    """(the policy, the output structure, the whole model where ``whole``) of a connect target."""
    from coach_fx.online import OnlineModel
    from coach_fx.runtime.policy import OnlinePolicy, StaticPolicy

    if isinstance(target, OnlineModel):
        return OnlinePolicy.of(target.online_plans, mode or "full"), target.out_spec, target.gm
    if isinstance(target, CompiledModel):
        if mode is not None:
            raise ValueError("mode= is for an online model (compile_online); this is one compiled plan")
        if target.boundary.end_only:
            raise ValueError("this plan runs the whole model on the end device: nothing to send to a cloud")
        return StaticPolicy(target.end_module, target.boundary), target.out_spec, target.gm
    if not isinstance(target, (str, Path)):
        raise TypeError(f"connect() takes a CompiledModel, an OnlineModel or a saved plan directory, "
                        f"got {type(target).__name__}")
    from coach_fx.artifact import PlanFiles, load_half
    files = PlanFiles(target, key=secret)
    if files.online:
        from coach_fx.saved_online import load_online
        saved = load_online(files, "end", whole=whole)
        return OnlinePolicy.of(saved.plans, mode or "full"), saved.out_spec, saved.whole
    if mode is not None:
        raise ValueError(f"mode= is for an online model; {target} holds one compiled plan")
    half = load_half(files, "end")
    if half.boundary.end_only:
        raise ValueError(f"{target} holds an end-only plan: nothing to send to a cloud")
    if whole and not files.has("model.graph.json"):
        raise ValueError(f"fallback='local' needs the whole model in {target}: save the plan "
                         "with cm.save(dir, whole=True)")
    return (StaticPolicy(half.module, half.boundary), half.out_spec,
            load_half(files, "model").module if whole else None)


def parse_address(address: "str | tuple[str, int]") -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as (host, port)."""
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
    elif isinstance(address, str) and ":" in address:
        host, _, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    else:
        raise ValueError(f"address must be 'host:port' or (host, port), got {address!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"the port of {address!r} is not a number") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"address must name a host and a port in 1..65535, got {address!r}")
    return str(host), port


__all__ = ["compile", "compile_with", "connect", "parse_address", "serve"]
