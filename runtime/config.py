"""Run-time settings, one record per part: :class:`StreamConfig` (the end and cloud workers,
the simulator, ``stream()`` and the CLI), :class:`Bands` (which plan serves which bandwidth),
:class:`ControlConfig` (the online controller), :class:`CacheConfig` (the semantic cache) and
:class:`PolicyConfig` (the adaptive policy: the last three and finishing on the end).

Example::

    >>> cfg = StreamConfig(end_slowdown=8, fallback="local")
    >>> PolicyConfig(control=ControlConfig(adaptive=False)).control.switching
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

FALLBACKS = (None, "local", "error")


@dataclass(frozen=True)
class Batching:
    """Requests that have arrived together run through the cloud half as one batch, up to
    ``max_batch`` (a server batches the requests of all its ends for one plan; a lone worker
    only on a link that tells what has arrived: the in-process one). A server holds the first
    request of a batch at most ``max_wait_s`` for more (0: only what has already arrived is
    batched, no request waits for another).

    While several ends share a server and one of them sends now and then (a request sent with
    none of its own unanswered, within the last second), a batch is also kept to at most
    ``shared_latency`` times the time of one request alone (measured at warm-up: a batch's
    fixed cost and its cost per request): that end waits for at most about one batch in
    progress and its own, so its latency stays within a few times what it is alone however many
    ends keep the server busy. Batches still gain most of what batching gives where a call's
    fixed cost dominates (resnet18 at 32x32 here: batches of about 11, 6x less CPU per request
    than one at a time). Ends that all keep requests in flight are batched up to ``max_batch``
    (the most throughput: no one waits on them alone). None: ``max_batch`` always."""

    max_batch: int = 1
    max_wait_s: float = 0.0
    shared_latency: float | None = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.shared_latency is not None and not self.shared_latency >= 1:
            raise ValueError(f"shared_latency must be >= 1 (or None), got {self.shared_latency}")

    def shared_batch(self, fixed_s: float, per_request_s: float) -> int:
        """The largest batch within ``shared_latency`` times one request alone, for a half whose
        batch of n takes ``fixed_s + n * per_request_s`` (at least 1, at most ``max_batch``)."""
        if self.shared_latency is None or per_request_s <= 0:
            return self.max_batch
        one = fixed_s + per_request_s
        return max(1, min(self.max_batch, int((self.shared_latency * one - fixed_s) / per_request_s)))


@dataclass(frozen=True)
class StreamConfig:
    """How a stream runs: the emulated devices, the pipeline's queues, faults.

    ``fallback``: when the link or the cloud fails, ``None`` raises, ``"local"`` answers the
    affected and following requests on the end device, ``"error"`` gives them a
    ``RequestFailed`` result; meanwhile a reconnect is tried every ``retry_s``.
    """

    end_slowdown: float = 1.0
    cloud_slowdown: float = 1.0
    #: messages waiting for the sender (a full queue stops the end: backpressure)
    queue_size: int = 2
    #: requests waiting for the cloud at once (memory stays bounded however long the stream)
    max_inflight: int = 8
    #: no result for this long while requests are in flight: the cloud stalled
    timeout_s: float = 30.0
    retry_s: float = 0.5
    fallback: str | None = None
    #: how the cloud runs requests that arrive together (default: one at a time)
    batching: Batching = Batching()

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be None, 'local' or 'error', got {self.fallback!r}")
        for name in ("end_slowdown", "cloud_slowdown", "timeout_s", "retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("queue_size", "max_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerConfig:
    """How a cloud server shares itself among ends (``runtime.server.CloudServer``).

    At most ``max_ends`` ends are served at once, ``max_handshakes`` connections may be
    proving their token at once (``max_handshakes_per_peer`` of them from one address), and
    one peer address may hold ``max_per_peer`` connections (handshaking or served); a
    connection beyond any of these is told the server is busy and closed at once (counted, not
    logged one by one). A handshake must complete within ``handshake_s`` in all, however
    slowly its bytes trickle in. A session whose end sends nothing for ``idle_s`` is ended;
    when every end's place is taken, a new end takes the place of the session that has been
    idle longest, if it has sent nothing for ``evict_idle_s`` and waits for no reply. One end
    has at most ``session_inflight`` requests read and not yet answered (reading stops until
    replies go out: a flooding end holds that much memory, no more), and the ends' requests
    are taken into batches round robin, one per end at a time, so that each end with work
    gets an equal share of every batch.
    """

    max_ends: int = 64
    #: a pending handshake costs a thread for at most ``handshake_s``: hundreds are cheap
    max_handshakes: int = 256
    #: so that the sockets of a few addresses cannot hold every handshake place
    max_handshakes_per_peer: int = 8
    max_per_peer: int = 32
    handshake_s: float = 2.0
    idle_s: float = 30.0
    evict_idle_s: float = 5.0
    session_inflight: int = 16

    def __post_init__(self) -> None:
        for name in ("max_ends", "max_handshakes", "max_handshakes_per_peer", "max_per_peer",
                     "session_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("handshake_s", "idle_s", "evict_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class RaySettings:
    """How ``coach serve --engine ray`` runs the cloud halves: replicas of a Ray Serve
    deployment, on any node of the cluster at ``address`` (None: a local Ray instance is
    started), ``replicas`` of them or autoscaled between ``autoscale`` = (min, max) on the
    requests in flight. The front door (TLS, token, sessions, batching per plan) stays coach's
    own server; at most ``inflight_per_replica`` batches per replica are out at once."""

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    inflight_per_replica: int = 2

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.inflight_per_replica < 1:
            raise ValueError(f"replicas and inflight_per_replica must be >= 1, got "
                             f"{self.replicas}, {self.inflight_per_replica}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale must be (min, max) with 1 <= min <= max, got {self.autoscale}")
        if not self.cpus_per_replica >= 0:
            raise ValueError(f"cpus_per_replica must be >= 0, got {self.cpus_per_replica}")

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @staticmethod
    def parse_autoscale(text: str) -> tuple[int, int]:
        """``"MIN:MAX"`` -> (min, max), or a ``ValueError`` that says what is wrong."""
        try:
            lo, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}") from None
        return lo, hi


@dataclass(frozen=True)
class Bands:
    """Which plan serves which bandwidth: ``edges_mbps`` increasing (n edges), ``plans`` the
    n + 1 plan ids serving the bands between them (None: ``start`` everywhere); a stream begins
    on ``start``."""

    edges_mbps: tuple[float, ...] = ()
    plans: tuple[int, ...] | None = None
    start: int = 0

    @property
    def band_plans(self) -> list[int]:
        return list(self.plans) if self.plans is not None else [self.start] * (len(self.edges_mbps) + 1)


@dataclass(frozen=True)
class ControlConfig:
    """The online controller: ``adaptive`` bits per request (else each plan's offline bits),
    ``switching`` between the bands' plans after ``hold`` estimates in a new band, a bandwidth
    estimate over ``window`` results, the link kept at ``headroom`` of the compute bottleneck,
    and on an end-only plan one probe frame per ``probe_s`` (see ``OnlineController``)."""

    adaptive: bool = True
    switching: bool = True
    hold: int = 5
    window: int = 5
    headroom: float = 0.9
    probe_s: float = 0.5


@dataclass(frozen=True)
class CacheConfig:
    """The semantic cache: ``enabled`` answers hits on the end, ``similarity_bits`` lets near
    misses travel with their band's fewer bits; ``capacity`` classes, ``audit_rate`` of hits
    still sent to the cloud (a seeded draw)."""

    enabled: bool = True
    similarity_bits: bool = True
    capacity: int = 16
    audit_rate: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class PolicyConfig:
    """The adaptive policy: its controller, its cache, whether a request that finds the link
    backlogged or stalled is finished on the end device (``finish_on_end``: its plan's cloud
    half run there), and the end device's
    slowdown (its stage joins the cloud's as the bottleneck the bits are sized against)."""

    control: ControlConfig = field(default_factory=ControlConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    finish_on_end: bool = False
    end_slowdown: float = 1.0


@dataclass(frozen=True)
class Mode:
    """What an online mode turns on: per-request bits, band switching, the cache, near-miss
    bits, finishing a request on the end device when the link is backlogged or stalled."""

    adaptive: bool
    switching: bool
    cache: bool
    similarity_bits: bool
    finish_on_end: bool


#: The four ways an online model runs, for comparison (issue #5's variants): ``fixed`` the
#: offline plan with its bits; ``adaptive`` + bits per request, band switching and finishing on
#: the end; ``cache`` the fixed plan + the semantic cache; ``full`` all of it.
MODES = {
    "fixed": Mode(adaptive=False, switching=False, cache=False, similarity_bits=False, finish_on_end=False),
    "adaptive": Mode(adaptive=True, switching=True, cache=False, similarity_bits=False, finish_on_end=True),
    "cache": Mode(adaptive=False, switching=False, cache=True, similarity_bits=False, finish_on_end=False),
    "full": Mode(adaptive=True, switching=True, cache=True, similarity_bits=True, finish_on_end=True),
}


def mode_of(name: str) -> Mode:
    """The :class:`Mode` called ``name`` (a clear error for any other)."""
    if name not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {name!r}")
    return MODES[name]


__all__ = ["Bands", "Batching", "CacheConfig", "ControlConfig", "MODES", "Mode", "PolicyConfig",
           "ServerConfig", "StreamConfig", "mode_of"]
