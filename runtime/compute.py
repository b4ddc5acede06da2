"""Where a cloud server's batches run: the :class:`Compute` protocol between the front door
(``runtime.server``: TLS, tokens, sessions, batching per plan) and the engine that runs the
cloud halves, in this process (``runtime.cloud.CloudWorker``) or on the replicas of a Ray
Serve deployment (``runtime.ray_compute.RayCompute``).

A batch is submitted and answered later: the front door keeps up to ``parallelism`` batches
out at once and hands their replies to the sessions in the order it submitted them, so each
end gets its answers in order whichever replica computed them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from coach_fx.runtime.cloud import Arrival, CloudHalf
from coach_fx.runtime.config import RaySettings, StreamConfig

#: What a submitted batch gives back when asked: one reply per request (None: a close).
Replies = Callable[[], "list[bytes | None]"]


class Compute(Protocol):
    """An engine that runs the cloud halves of ``plans`` on batches of request messages."""

    #: plan id -> its cloud half and boundary (the front door sizes and checks requests with them)
    plans: dict[int, CloudHalf]
    #: batches it runs at once (the front door keeps this many out)
    parallelism: int
    #: frames that did not decode, and runs of a cloud half, so far
    rejected: int
    calls: int

    def warm_up(self) -> None:
        """Make the first request as fast as the rest (load, compile, first call)."""

    def shared_batch(self) -> int:
        """The largest batch while several ends share the engine (``Batching.shared_batch``
        on its halves' measured costs; ``max_batch`` where it measured none)."""

    def submit(self, msgs: Sequence[tuple[bytes, Arrival]]) -> Replies:
        """Start a batch of requests (each with how it arrived); returns how to get their replies."""

    def close(self) -> None:
        """Release what it holds (replicas, threads)."""


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from: the cloud halves by plan id, how the cloud runs them,
    whether requests carry their own bits (an online model), the device, and for an engine
    whose workers load the plan themselves its directory, token, settings and name."""

    halves: dict[int, CloudHalf]
    config: StreamConfig
    adaptive: bool = False
    device: str = "cpu"
    plan_dir: str | None = None
    key: bytes | None = None
    ray: RaySettings | None = None
    name: str = "coach"


def _builtin(spec: EngineSpec) -> Compute:
    from coach_fx.runtime.cloud import CloudWorker
    return CloudWorker(spec.halves, None, spec.config, adaptive=spec.adaptive, device=spec.device)


def _ray(spec: EngineSpec) -> Compute:
    from coach_fx.runtime.ray_compute import RayCompute   # the optional extra, imported on use
    return RayCompute(str(spec.plan_dir), spec.key, spec.halves, spec.config, spec.ray or RaySettings(),
                      adaptive=spec.adaptive, name=spec.name, device=spec.device)


#: Where a server's cloud halves run, by name: ``"builtin"`` in its own process, ``"ray"`` on
#: Ray Serve. Adding an engine is a module with a ``Compute`` and one entry here.
ENGINES: dict[str, Callable[[EngineSpec], Compute]] = {"builtin": _builtin, "ray": _ray}


def engine(name: str, spec: EngineSpec) -> Compute:
    """The engine ``name`` built from ``spec`` (an unknown name is a ``ValueError`` naming them)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {name!r}")
    return ENGINES[name](spec)

