"""The two sides of a deployment: ``coach_fx.serve`` (a saved plan's cloud half, or an online
model's every cloud half, served to many ends at once) and ``coach_fx.connect`` (the end side:
the user's own inputs through a served plan). Neither loads the compile side (the optimizer,
networkx) for a plan directory: an end or a server of a deployment needs only what runs.

Example::

    >>> server = coach_fx.serve("plan_dir", host="0.0.0.0", token=token)          # doctest: +SKIP
    >>> rm = coach_fx.connect("plan_dir", "cloud:29517", token=token)             # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coach_fx.compiled import CompiledModel
    from coach_fx.deploy import SavedPlan
    from coach_fx.online import OnlineModel
    from coach_fx.runtime.client import RemoteModel
    from coach_fx.runtime.config import RaySettings, ServerConfig, StreamConfig
    from coach_fx.runtime.links.tls import TlsConfig
    from coach_fx.runtime.server import CloudServer
    from coach_fx.runtime.traces import Trace

#: How a server batches by default: up to this many requests, the first held at most this long.
SERVE_MAX_BATCH = 32
SERVE_MAX_WAIT_S = 0.002


#: How long ``connect()`` retries a cloud that is busy or not yet listening, before it says so
#: (ends that start together share a server's handshake places per address).
BUSY_RETRY_S = 5.0


def serve(plan_dir: "str | Path | SavedPlan", host: str = "127.0.0.1", port: int = 29517, *,
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
    verified before anything in it is read. ``plan_dir`` may also be one already opened for
    its cloud side (``coach_fx.deploy.open_plan(dir, "cloud", key=token)``). ``config``: the cloud's slowdown and batching
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

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {engine!r}")
    secret = shared_token(token)
    saved = _opened(plan_dir, "cloud", secret)
    halves = dict(saved.cloud)
    if config is None:
        config = StreamConfig(cloud_slowdown=saved.cloud_slowdown,
                              batching=Batching(SERVE_MAX_BATCH, SERVE_MAX_WAIT_S))
    device = device or saved.cloud_device
    compute = build_engine(engine, EngineSpec(halves, config, saved.online, device, str(saved.dir), secret,
                                              ray, name=f"coach-{port or os.getpid()}"))
    try:   # warm before the port is bound: an end that dials finds a server that answers
        warm_up(compute)
        listener = TcpServer(host, port, token=secret, timeout_s=config.timeout_s, tls=tls)
    except BaseException:
        compute.close()
        raise
    try:
        server = CloudServer(halves, listener, config, limits or ServerConfig(), adaptive=saved.online,
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


def connect(target: "CompiledModel | OnlineModel | SavedPlan | str | Path", address: "str | tuple[str, int]", *,
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
    from coach_fx.deploy import SavedPlan
    if isinstance(target, (str, Path, SavedPlan)):   # the end of a deployment: no compile side loaded
        saved = _opened(target, "end", secret, whole=whole)
        if whole and saved.whole is None:
            raise ValueError(f"fallback='local' needs the whole model: open {saved.dir} with whole=True")
        return saved.end_policy(mode), saved.out_spec, saved.whole
    from coach_fx.compiled import CompiledModel
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
    raise TypeError(f"connect() takes a CompiledModel, an OnlineModel or a saved plan directory, "
                    f"got {type(target).__name__}")


def _opened(target: "str | Path | SavedPlan", side: str, secret: bytes, whole: bool = False) -> "SavedPlan":
    """``target`` opened for ``side`` (a directory), or as it was opened (a ``SavedPlan``)."""
    from coach_fx.deploy import SavedPlan, open_plan
    if isinstance(target, SavedPlan):
        if target.side != side:
            raise ValueError(f"{target.dir} was opened for its {target.side} side; this needs its {side} side")
        return target
    return open_plan(target, side, key=secret, whole=whole)


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


__all__ = ["BUSY_RETRY_S", "SERVE_MAX_BATCH", "SERVE_MAX_WAIT_S", "connect", "parse_address", "serve"]
