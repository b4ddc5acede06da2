"""What ``coach_fx.compile_online`` prepares online control with: ``OnlineSettings``
(``Settings.online``), one flat record: the bandwidth bands, the semantic cache and the
calibration streams its thresholds are tuned on.

    >>> OnlineSettings.of(capacity=4, hold=3).hold
    3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


def _pipeline_depth() -> int:
    """The most requests an end has out at once: waiting for the cloud and queued to send."""
    from coach_fx.runtime.config import StreamConfig
    cfg = StreamConfig()
    return cfg.max_inflight + cfg.queue_size


@dataclass(frozen=True)
class OnlineSettings:
    """What ``coach_fx.compile_online`` prepares online control with (``Settings.online``).

    Example::

        >>> OnlineSettings.of(cache_share=0.25).budgets(0.01)
        (0.0075, 0.0025)
    """

    # ---- the bandwidth bands online plans are made for
    #: the rates to plan for (None: ``band_rates``)
    bands_mbps: Sequence[float] | None = None
    #: the plan switches after this many estimates in a new band
    hold: int = 5
    #: A band gets its own plan only when that plan's period there is this much shorter than
    #: the offline plan's (a switch follows the estimate with a lag).
    switch_gain: float = 0.9

    # ---- the semantic cache: ``cache_share`` of the accuracy budget goes to its wrong hits,
    # the rest to the bits; it holds ``capacity`` classes, audits ``audit_rate`` of its hits,
    # and its features are pooled on the best of ``grid``
    cache: bool = True
    cache_share: float = 0.5
    grid: int | Sequence[int] = (2, 4, 8)
    capacity: int = 16
    audit_rate: float = 0.1
    #: The cache may look up at a node before the cut (a hit then skips the rest of the end
    #: half) when its calibrated hit rate is at least this share of the cut's own: a hit also
    #: spares the link and the cloud, which an earlier node with fewer hits would give away.
    early_lookup_hits: float = 0.75

    # ---- the calibration streams the cache's thresholds are tuned on
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
    result_lag: int = field(default_factory=_pipeline_depth)

    def __post_init__(self) -> None:
        if self.bands_mbps is not None and (not self.bands_mbps or min(self.bands_mbps) <= 0):
            raise ValueError(f"bands_mbps must be positive rates, got {list(self.bands_mbps)}")
        if self.hold < 1:
            raise ValueError(f"hold must be >= 1, got {self.hold}")
        if not 0 <= self.cache_share < 1:
            raise ValueError(f"cache_share must be in [0, 1), got {self.cache_share}")
        if self.capacity < 1 or not 0 <= self.audit_rate <= 1:
            raise ValueError("capacity must be >= 1 and audit_rate in [0, 1]; got "
                             f"{self.capacity}, {self.audit_rate}")

    @classmethod
    def of(cls, **kw: Any) -> "OnlineSettings":
        """From keywords (an unknown name is a ``TypeError`` naming it)."""
        from coach_fx.settings import replace_checked   # settings imports this module
        return replace_checked(cls(), kw, "online option")

    @classmethod
    def keys(cls) -> set[str]:
        """Every keyword :meth:`of` takes."""
        return set(cls.__dataclass_fields__)

    def budgets(self, accuracy_budget: float) -> tuple[float, float]:
        """(the bits' share, the cache's share) of ``accuracy_budget``."""
        if not self.cache:
            return accuracy_budget, 0.0
        return accuracy_budget * (1 - self.cache_share), accuracy_budget * self.cache_share


__all__ = ["OnlineSettings"]
