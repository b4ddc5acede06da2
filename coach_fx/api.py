"""The public entry points: ``coach_fx.compile`` (a model split between an end device and the
cloud) and ``coach_fx.serve`` (a saved plan's cloud half served to many ends). The end
side's ``connect`` is to come here too (DESIGN.md §3).

Example::

    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(10),          # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> y = cm(x); print(cm.report())                                             # doctest: +SKIP
    >>> cm.save("plan_dir", key=token)                                            # doctest: +SKIP
    >>> server = coach_fx.serve("plan_dir", host="0.0.0.0", token=token)          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from torch import nn

from coach_fx.compiled import CompiledModel
from coach_fx.driver import plan_model, prepare
from coach_fx.settings import DEFAULT_BITS, Settings

if TYPE_CHECKING:
    from coach_fx.runtime.config import ServerConfig, StreamConfig
    from coach_fx.runtime.links.tls import TlsConfig
    from coach_fx.runtime.server import CloudServer

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
    settings = Settings.from_options(options, **kw)
    gm, inputs, dag = prepare(model, example_inputs, settings)
    plan, oracle = plan_model(gm, inputs, dag, settings)
    cm = CompiledModel(gm, dag, plan, settings, inputs, oracle)
    if settings.costs == "measured" and settings.remeasure:
        cm.remeasure()
    return cm


def serve(plan_dir: str | Path, host: str = "127.0.0.1", port: int = 29517, *,
          token: bytes | str | None = None, tls: "TlsConfig | None" = None,
          config: "StreamConfig | None" = None, limits: "ServerConfig | None" = None,
          sessions: int | None = None) -> "CloudServer":
    """Serve the cloud half of a saved plan to every end that holds ``token`` (default
    ``$COACH_TOKEN``), many at once; returns the running server (``.wait()``, ``.drain()``,
    ``.stop()``, ``.snapshot()``; a context manager). The same as ``coach serve``.

    The plan directory must be signed with the token (``cm.save(dir, key=token)``): it is
    verified before anything in it is read. ``config``: the cloud's slowdown and batching
    (default: the plan's slowdown, batches of up to ``SERVE_MAX_BATCH`` = 32, the first
    request held at most 2 ms for more); ``limits``: how many
    ends, handshakes and connections per peer (``ServerConfig``); ``sessions``: stop after that
    many ends have finished.

    Example::

        >>> with coach_fx.serve("plan_dir", port=0, token=token) as server:   # doctest: +SKIP
        ...     print(server.address); server.wait()
    """
    from coach_fx.artifact import load_half
    from coach_fx.runtime.cloud import CloudHalf
    from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig
    from coach_fx.runtime.links.credentials import shared_token
    from coach_fx.runtime.links.tcp import TcpServer
    from coach_fx.runtime.server import CloudServer

    secret = shared_token(token)
    half = load_half(plan_dir, "cloud", key=secret)
    if config is None:
        config = StreamConfig(cloud_slowdown=half.meta["cloud"]["slowdown"],
                              batching=Batching(SERVE_MAX_BATCH, SERVE_MAX_WAIT_S))
    listener = TcpServer(host, port, token=secret, timeout_s=config.timeout_s, tls=tls)
    try:
        server = CloudServer({0: CloudHalf(half.module, half.boundary, half.batched)}, listener, config,
                             limits or ServerConfig(), sessions=sessions)
    except BaseException:
        listener.close()
        raise
    return server.start()


__all__ = ["compile", "serve"]
