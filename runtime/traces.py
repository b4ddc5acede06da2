"""Bandwidth traces: read both formats of ``../shared/traces`` (and a user's own file).

* two columns ``seconds<TAB>Mbit/s`` (norway-hsdpa, fcc): one sample per line;
* Mahimahi: one millisecond timestamp per 1500-byte delivery opportunity (lines repeat when
  several packets fit in that millisecond); binned here into a rate per ``bin_s``.

Example::

    >>> t = Trace.load("../shared/traces/norway-hsdpa/norway_bus_1")   # doctest: +SKIP
    >>> t = Trace.load("norway_bus_1")          # the same trace, shipped with coach_fx
    >>> t.rate_at(3.0), t.mean_mbps                                     # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MAHIMAHI_PACKET_BYTES = 1500
#: Traces that ship with the package (``runtime/data/traces``, installed with ``coach_fx.runtime``), loadable by name alone.
SHIPPED_TRACES = Path(__file__).resolve().parent / "data" / "traces"


@dataclass(frozen=True)
class Trace:
    """A piecewise-constant rate: ``mbps[i]`` holds from ``times[i]`` to ``times[i+1]``; loops."""

    times: tuple[float, ...]
    mbps: tuple[float, ...]
    duration: float
    name: str = ""

    @classmethod
    def load(cls, path: str | Path, scale: float = 1.0, bin_s: float = 0.1) -> "Trace":
        path = Path(path)
        shipped = SHIPPED_TRACES / path.name
        if not path.is_file() and path.name == str(path) and shipped.is_file():
            path = shipped    # a trace that ships with coach_fx, named alone
        if not path.is_file():
            names = sorted(p.name for p in SHIPPED_TRACES.iterdir() if p.suffix != ".md")
            raise FileNotFoundError(f"bandwidth trace {path} does not exist (traces that ship "
                                    f"with coach_fx, by name: {', '.join(names)})")
        rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        if not rows:
            raise ValueError(f"bandwidth trace {path} is empty")
        try:
            if all(len(r) == 1 for r in rows):
                return cls._from_mahimahi([int(r[0]) for r in rows], scale, bin_s, path.name)
            if all(len(r) == 2 for r in rows):
                pts = [(float(a), float(b)) for a, b in rows]
                return cls._from_pairs(pts, scale, path.name)
        except ValueError as e:
            raise ValueError(f"bandwidth trace {path}: bad number ({e})") from None
        raise ValueError(f"bandwidth trace {path}: expected 'seconds<TAB>Mbit/s' lines or "
                         "Mahimahi millisecond timestamps, one per line")

    @classmethod
    def constant(cls, mbps: float) -> "Trace":
        return cls((0.0,), (float(mbps),), math.inf, f"{mbps} Mbit/s")

    @classmethod
    def _from_pairs(cls, pts: list[tuple[float, float]], scale: float, name: str) -> "Trace":
        t0 = pts[0][0]
        times = tuple(t - t0 for t, _ in pts)
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError(f"bandwidth trace {name}: timestamps go backwards")
        step = (times[-1] / (len(times) - 1)) if len(times) > 1 else 1.0
        if any(r < 0 for _, r in pts):
            raise ValueError(f"bandwidth trace {name}: negative rate")
        return cls(times, tuple(r * scale for _, r in pts), times[-1] + step, name)

    @classmethod
    def _from_mahimahi(cls, ms: list[int], scale: float, bin_s: float, name: str) -> "Trace":
        if any(b < a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"bandwidth trace {name}: timestamps go backwards")
        duration = max(ms[-1] / 1000.0, bin_s)
        nbins = max(1, math.ceil(duration / bin_s))
        counts = [0] * nbins
        for m in ms:
            counts[min(nbins - 1, int(m / 1000.0 / bin_s))] += 1
        per_bin = MAHIMAHI_PACKET_BYTES * 8 / 1e6 / bin_s
        return cls(tuple(i * bin_s for i in range(nbins)),
                   tuple(c * per_bin * scale for c in counts), nbins * bin_s, name)

    def faster(self, factor: float) -> "Trace":
        """The same rates played ``factor`` times faster (each sample lasts 1/factor as long):
        a long recording's ups and downs within a short run."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return Trace(tuple(t / factor for t in self.times), self.mbps, self.duration / factor,
                     f"{self.name} x{factor:g} speed")

    def rate_at(self, t: float) -> float:
        """Mbit/s at time ``t`` (the trace loops)."""
        if math.isfinite(self.duration):
            t = t % self.duration
        return self.mbps[max(0, bisect.bisect_right(self.times, t) - 1)]

    def finish_time(self, start: float, nbytes: float) -> float:
        """When ``nbytes`` sent from time ``start`` have crossed a link that follows this trace
        (the trace loops; a stretch at rate 0 just passes)."""
        bits = nbytes * 8.0
        if not math.isfinite(self.duration):
            return start + bits / (self.mbps[0] * 1e6)
        if max(self.mbps) <= 0:
            raise ValueError(f"trace {self.name} has rate 0 everywhere: nothing can be sent")
        base = math.floor(start / self.duration) * self.duration
        t = start - base
        i = max(0, bisect.bisect_right(self.times, t) - 1)
        while True:
            end = self.times[i + 1] if i + 1 < len(self.times) else self.duration
            rate = self.mbps[i] * 1e6
            cap = (end - t) * rate
            if bits <= cap and rate > 0:
                return base + t + bits / rate
            bits -= cap
            t = end
            i += 1
            if i == len(self.times):
                i, t, base = 0, 0.0, base + self.duration

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Time-weighted quantiles of the rate (``qs`` in [0, 1])."""
        if not math.isfinite(self.duration):
            return [self.mbps[0] for _ in qs]
        ends = self.times[1:] + (self.duration,)
        pts = sorted((r, e - s) for r, s, e in zip(self.mbps, self.times, ends) if e > s)
        total = sum(w for _, w in pts)
        out = []
        for q in qs:
            acc = 0.0
            for r, w in pts:
                acc += w
                if acc >= q * total:
                    out.append(r)
                    break
            else:
                out.append(pts[-1][0])
        return out

    def share_below(self, mbps: float) -> float:
        """Share of the trace's time whose rate is below ``mbps``."""
        if not math.isfinite(self.duration):
            return float(self.mbps[0] < mbps)
        ends = self.times[1:] + (self.duration,)
        return sum(e - s for r, s, e in zip(self.mbps, self.times, ends) if r < mbps) / self.duration

    def scale_for_median(self, mbps: float) -> float:
        """The rate scale that puts the trace's time-weighted median at ``mbps`` (so that a
        plan whose link is its bottleneck below ``mbps`` is link-bound half of the time)."""
        return mbps / max(self.quantiles([0.5])[0], 1e-6)

    @property
    def mean_mbps(self) -> float:
        """Time-weighted mean rate."""
        if not math.isfinite(self.duration):
            return self.mbps[0]
        ends = self.times[1:] + (self.duration,)
        return sum(r * (e - s) for r, s, e in zip(self.mbps, self.times, ends)) / self.duration
