"""What ``coach_fx.compile_online`` prepares online control with: ``OnlineSettings``
(``Settings.online``) and its groups, the bandwidth bands, the semantic cache and the
calibration streams its thresholds are tuned on.

    >>> OnlineSettings.of(capacity=4, hold=3).bands.hold
    3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class BandSettings:
    """The bandwidth bands online plans are made for (``OnlineSettings.bands``).

    ``bands_mbps``: the rates to plan for (None: ``band_rates``); the plan switches after
    ``hold`` estimates in a new band."""

    bands_mbps: Sequence[float] | None = None
    hold: int = 5
    #: A band gets its own plan only when that plan's period there is this much shorter than
    #: the offline plan's (a switch follows the estimate with a lag).
    switch_gain: float = 0.9

    def __post_init__(self) -> None:
        if self.bands_mbps is not None and (not self.bands_mbps or min(self.bands_mbps) <= 0):
            raise ValueError(f"bands_mbps must be positive rates, got {list(self.bands_mbps)}")
        if self.hold < 1:
            raise ValueError(f"hold must be >= 1, got {self.hold}")


@dataclass(frozen=True)
class CacheSettings:
    """The semantic cache (``OnlineSettings.caching``): ``cache_share`` of the accuracy budget
    goes to its wrong hits, the rest to the bits; it holds ``capacity`` classes, audits
    ``audit_rate`` of its hits, and its features are pooled on the best of ``grid``."""

    cache: bool = True
    cache_share: float = 0.5
    grid: int | Sequence[int] = (2, 4, 8)
    capacity: int = 16
    audit_rate: float = 0.1
    #: The cache may look up at a node before the cut (a hit then skips the rest of the end
    #: half) when its calibrated hit rate is at least this share of the cut's own: a hit also
    #: spares the link and the cloud, which an earlier node with fewer hits would give away.
    early_lookup_hits: float = 0.75

    def __post_init__(self) -> None:
        if not 0 <= self.cache_share < 1:
            raise ValueError(f"cache_share must be in [0, 1), got {self.cache_share}")
        if self.capacity < 1 or not 0 <= self.audit_rate <= 1:
            raise ValueError("capacity must be >= 1 and audit_rate in [0, 1]; got "
                             f"{self.capacity}, {self.audit_rate}")


def _pipeline_depth() -> int:
    """The most requests an end has out at once: waiting for the cloud and queued to send."""
    from coach_fx.runtime.config import StreamConfig
    cfg = StreamConfig()
    return cfg.max_inflight + cfg.queue_size


@dataclass(frozen=True)
class ReplaySettings:
    """The calibration streams the cache's thresholds are tuned on (``OnlineSettings.replay``)."""

    #: mean frames a class persists in them
    locality: float = 10.0
    #: Frames in each of the two streams. Wrong hits come from a few confusable samples; a
    #: short stream may hold none of them (with 1000 frames thresholds passed that went wrong
    #: 3x as often on unseen data).
    calibration_frames: int = 4000
    #: Requests the end looks up between a request's lookup and the cloud's answer for it
    #: coming back: in a three-stage pipeline a request's answer returns while the end works a
    #: few requests on (one on the link, one in the cloud, those queued). In process that was
    #: 3.5-5 periods; over a real TCP link the end keeps as many requests out as it may
    #: (``StreamConfig.max_inflight`` waiting for the cloud, ``queue_size`` for the sender),
    #: and wrong hits after a class change grow with the lag (mahimahi LTE: 0.54 pt over TCP
    #: with the thresholds calibrated at 4, 0.40 in process). The replay learns answers as
    #: late as the pipeline can give them.
    result_lag: int = field(default_factory=lambda: _pipeline_depth())


@dataclass(frozen=True)
class OnlineSettings:
    """What ``coach_fx.compile_online`` prepares online control with (``Settings.online``).

    ``OnlineSettings.of(capacity=4, hold=3)`` takes the groups' fields by their own names;
    ``online.capacity`` and the like read them.

    Example::

        >>> OnlineSettings.of(cache_share=0.25).budgets(0.01)
        (0.0075, 0.0025)
    """

    bands: BandSettings = field(default_factory=BandSettings)
    caching: CacheSettings = field(default_factory=CacheSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)

    # the groups' fields, read by their own names
    bands_mbps = property(lambda self: self.bands.bands_mbps)
    hold = property(lambda self: self.bands.hold)
    switch_gain = property(lambda self: self.bands.switch_gain)
    cache = property(lambda self: self.caching.cache)
    cache_share = property(lambda self: self.caching.cache_share)
    grid = property(lambda self: self.caching.grid)
    capacity = property(lambda self: self.caching.capacity)
    audit_rate = property(lambda self: self.caching.audit_rate)
    early_lookup_hits = property(lambda self: self.caching.early_lookup_hits)
    locality = property(lambda self: self.replay.locality)
    calibration_frames = property(lambda self: self.replay.calibration_frames)
    result_lag = property(lambda self: self.replay.result_lag)

    @classmethod
    def of(cls, **kw: Any) -> "OnlineSettings":
        """From keywords: a group, or any field of a group by its own name."""
        from coach_fx.settings import replace_grouped   # settings imports this module
        return replace_grouped(cls(), ONLINE_GROUPS, kw)

    @classmethod
    def keys(cls) -> set[str]:
        """Every keyword :meth:`of` takes."""
        return set(cls.__dataclass_fields__) | {f for c in ONLINE_GROUPS.values() for f in c.__dataclass_fields__}

    def budgets(self, accuracy_budget: float) -> tuple[float, float]:
        """(the bits' share, the cache's share) of ``accuracy_budget``."""
        if not self.cache:
            return accuracy_budget, 0.0
        return accuracy_budget * (1 - self.cache_share), accuracy_budget * self.cache_share


ONLINE_GROUPS = {"bands": BandSettings, "caching": CacheSettings, "replay": ReplaySettings}
