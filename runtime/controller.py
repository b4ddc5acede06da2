"""Online control (DESIGN.md §6): bandwidth estimate, per-request bits, plan switching.

Pieces, each usable on its own (the end worker's integration and the online benchmark are
still to come):

* :class:`BandwidthEstimator`: bytes over receive duration of recent transfers (reported back
  by the cloud with each result), smoothed by a **harmonic mean** of the last ``window``
  samples. The harmonic mean is dominated by the low samples, so one lucky fast transfer
  cannot talk the controller into sending more than the link sustains (the smoother FESTIVE
  and Pensieve's baselines use for video bit rates), while a real drop shows within a few
  samples.
* :class:`BitController`: per request, the highest bits whose link time stays within the
  compute bottleneck (no link bubble), never below the accuracy-safe minimum found offline.
* :class:`PlanSwitcher`: plans compiled for a few bandwidth bands; it switches band only
  after the estimate has stayed in another band for ``hold`` consecutive requests.

Example::

    >>> est = BandwidthEstimator(window=5)
    >>> est.add(125_000, 0.1); est.mbps
    10.0
    >>> BitController(CutProfile(100_000, 0, 1, min_bits=3, compute_s=0.05)).choose(10.0)
    4
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from coach_fx.plan import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES


class BandwidthEstimator:
    """Harmonic mean of the last ``window`` throughput samples, in Mbit/s."""

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.samples: deque[float] = deque(maxlen=window)

    def add(self, nbytes: float, seconds: float) -> None:
        if seconds > 0 and nbytes > 0:
            self.samples.append(nbytes * 8 / seconds / 1e6)

    @property
    def mbps(self) -> float | None:
        if not self.samples:
            return None
        return len(self.samples) / sum(1.0 / s for s in self.samples)


@dataclass(frozen=True)
class CutProfile:
    """What the controller needs to know of one plan's cut."""

    quant_numel: int        # elements of the float tensors that cross (quantized per request)
    raw_bytes: int          # bytes that cross as they are (integers, the raw input...)
    n_tensors: int          # crossing values (each has a header on the wire)
    min_bits: int           # the accuracy-safe minimum found offline
    compute_s: float        # the compute bottleneck: max(T_end, T_cloud)

    def message_bytes(self, bits: int) -> int:
        body = self.quant_numel * (4 if bits >= 32 else 2 if bits == 16 else 0)
        if bits < 16:
            body = math.ceil(self.quant_numel * bits / 8)
        return body + self.raw_bytes + self.n_tensors * TENSOR_HEADER_BYTES + MESSAGE_HEADER_BYTES

    def link_seconds(self, bits: int, mbps: float) -> float:
        return self.message_bytes(bits) * 8 / (mbps * 1e6)


class BitController:
    """Highest bits that keep the link within the compute bottleneck, never below the floor."""

    def __init__(self, profile: CutProfile, bits: Sequence[int] = (2, 3, 4, 5, 6, 8, 16, 32)) -> None:
        self.profile = profile
        self.bits = sorted(b for b in bits if b >= profile.min_bits) or [profile.min_bits]

    def choose(self, mbps: float | None, floor: int | None = None) -> int:
        """Bits for the next request at estimated ``mbps`` (unknown: the safe minimum)."""
        lo = max(self.profile.min_bits, floor or 0)
        allowed = [b for b in self.bits if b >= lo] or [self.bits[-1]]
        if mbps is None:
            return allowed[0]
        for b in reversed(allowed):
            if self.profile.link_seconds(b, mbps) <= self.profile.compute_s:
                return b
        return allowed[0]

    def link_bound(self, mbps: float | None) -> bool:
        """Even the fewest safe bits make the link the bottleneck (time to switch plan)."""
        return mbps is not None and self.profile.link_seconds(self.bits[0], mbps) > self.profile.compute_s


class PlanSwitcher:
    """Bandwidth bands, each with its plan; switch only after ``hold`` estimates in a new band.

    ``edges_mbps`` are the band boundaries in increasing order (n edges: n + 1 bands);
    ``plans[i]`` serves band i.
    """

    def __init__(self, edges_mbps: Sequence[float], plans: Sequence[int], hold: int = 5,
                 start: int | None = None) -> None:
        if len(plans) != len(edges_mbps) + 1:
            raise ValueError(f"{len(edges_mbps)} band edges need {len(edges_mbps) + 1} plans, "
                             f"got {len(plans)}")
        if list(edges_mbps) != sorted(edges_mbps):
            raise ValueError("band edges must increase")
        self.edges = list(edges_mbps)
        self.plans = list(plans)
        self.hold = hold
        self.band = len(self.plans) - 1 if start is None else start
        self._candidate: int | None = None
        self._streak = 0
        self.switches = 0

    def band_of(self, mbps: float) -> int:
        return sum(1 for e in self.edges if mbps >= e)

    @property
    def plan(self) -> int:
        return self.plans[self.band]

    def update(self, mbps: float | None) -> int:
        """Feed one estimate; the plan to use for the next request."""
        if mbps is None:
            return self.plan
        b = self.band_of(mbps)
        if b == self.band:
            self._candidate, self._streak = None, 0
        elif b == self._candidate:
            self._streak += 1
        else:
            self._candidate, self._streak = b, 1
        if self._candidate is not None and self._streak >= self.hold:
            self.band, self._candidate, self._streak = self._candidate, None, 0
            self.switches += 1
        return self.plan
