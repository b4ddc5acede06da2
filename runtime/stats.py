"""Measured figures of one stream (:class:`Stats`) and the steady-state throughput rule.

Example::

    >>> Stats(2, [0.1, 0.2], 0.3, 10.0, StageBusy(0.1, 0.1, 0.1), 2_000).pct(0.5)
    0.2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from tabulate import tabulate


@dataclass(frozen=True)
class StageBusy:
    """Each stage's busy time over a stream, in seconds."""

    end_s: float = 0.0
    link_s: float = 0.0
    cloud_s: float = 0.0


@dataclass
class Outcomes:
    """How the requests of a stream were settled other than by the cloud's reply, counted
    where it happens (the stream session) and reported as they are (``Stats.outcomes``)."""

    fell_back: int = 0        # requests run on the end device after a fault (fallback="local")
    failed: int = 0           # requests given a RequestFailed result (fallback="error")
    dropped: int = 0          # late or repeated replies dropped (already settled)
    reconnects: int = 0
    answered_on_end: int = 0  # answered by the end device's policy (semantic-cache hits)
    #: requests the policy finished on the end device because the link was backlogged or
    #: stalled (``PolicyConfig(finish_on_end=True)``)
    finished_on_end: int = 0


@dataclass
class Stats:
    """Measured figures of one stream."""

    n: int
    latencies: list[float]
    wall_s: float
    throughput: float
    busy: StageBusy
    bytes_sent: int
    predicted: dict = field(default_factory=dict)
    outcomes: Outcomes = field(default_factory=Outcomes)

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    @property
    def stage_means(self) -> tuple[float, float, float]:
        n, b = max(self.n, 1), self.busy
        return b.end_s / n, b.link_s / n, b.cloud_s / n

    @property
    def utilization(self) -> tuple[float, float, float]:
        w, b = max(self.wall_s, 1e-12), self.busy
        return b.end_s / w, b.link_s / w, b.cloud_s / w

    @property
    def period(self) -> float:
        return 1.0 / self.throughput if self.throughput > 0 else float("inf")

    @property
    def bubble_ratio(self) -> float:
        """1 - (mean stage times) / (3 × measured period): the idle share of the pipeline."""
        e, l_, c = self.stage_means
        return max(0.0, 1.0 - (e + l_ + c) / (3 * self.period)) if self.throughput > 0 else 0.0

    def table(self) -> str:
        e, l_, c = self.stage_means
        ue, ul, uc = self.utilization
        p = self.predicted
        def pr(key: str, scale: float = 1e3) -> Any:
            return p[key] * scale if key in p else "-"
        rows = [["requests", self.n, "-"],
                ["latency p50 ms", self.pct(0.5) * 1e3, pr("latency")],
                ["latency p95 ms", self.pct(0.95) * 1e3, "-"],
                ["throughput /s", self.throughput, pr("throughput", 1)],
                ["period ms", self.period * 1e3, pr("period")],
                ["end stage ms (util)", f"{e*1e3:.2f} ({ue:.0%})", pr("t_end")],
                ["uplink ms (util)", f"{l_*1e3:.2f} ({ul:.0%})", pr("t_link")],
                ["cloud stage ms (util)", f"{c*1e3:.2f} ({uc:.0%})", pr("t_cloud")],
                ["bubble ratio", self.bubble_ratio, pr("bubble_ratio", 1)],
                ["KB sent / request", self.bytes_sent / max(self.n, 1) / 1e3, pr("bytes_sent", 1e-3)]]
        def fmt(v: Any) -> Any:
            return f"{v:.3f}" if isinstance(v, float) else v
        rows = [[name, fmt(v), fmt(p_)] for name, v, p_ in rows]
        return tabulate(rows, headers=["measured", "value", "predicted"], disable_numparse=True)


def steady_throughput(done: Sequence[float], wall: float) -> float:
    """Requests per second once the pipeline is full: the first few completions (warm-up and
    pipeline fill) are left out."""
    ts = sorted(done)
    skip = min(5, len(ts) // 5)
    ts = ts[skip:]
    if len(ts) > 1 and ts[-1] > ts[0]:
        return (len(ts) - 1) / (ts[-1] - ts[0])
    return len(done) / wall if wall > 0 else 0.0


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


#: A request not yet settled (its place in ``Ledger.results``).
PENDING = _Pending()
#: A stream that hands its results on keeps the records of at least this many settled
#: requests for its stats; older ones are only counted (``Ledger``).
LEDGER_WINDOW = 50_000


class Ledger:
    """Per-request records of one stream, by request index: its result (``PENDING`` until
    settled), when it started and when it was settled.

    With ``keep=False`` (each result handed on as it settles: ``EndWorker(deliver=...)``) it
    keeps no outputs, and once it holds twice ``LEDGER_WINDOW`` records it drops the settled
    ones before the oldest pending request, all but the latest ``LEDGER_WINDOW``, counting
    them in ``folded``: a camera stream of any length holds memory for a bounded number of
    requests. Stats then cover the records held (``n`` counts all)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.base = 0          # the request index of the first record held
        self.folded = 0        # settled requests whose records were dropped
        self.results: list[Any] = []
        self.started: list[float] = []
        self.done: list[float] = []

    def __len__(self) -> int:
        return self.base + len(self.results)

    def add(self, t: float) -> int:
        """A new request started at ``t``: its index."""
        self.results.append(PENDING)
        self.started.append(t)
        self.done.append(0.0)
        return len(self) - 1

    def pending(self, i: int) -> bool:
        return i >= self.base and self.results[i - self.base] is PENDING

    def settle(self, i: int, out: Any, t: float) -> None:
        k = i - self.base
        self.results[k] = out if self.keep else None
        self.done[k] = t
        if not self.keep and len(self.results) >= 2 * LEDGER_WINDOW and k % 1024 == 0:
            first = next((j for j, r in enumerate(self.results) if r is PENDING), len(self.results))
            drop = min(first, len(self.results) - LEDGER_WINDOW)
            if drop > 0:
                del self.results[:drop], self.started[:drop], self.done[:drop]
                self.base += drop
                self.folded += drop

    def pending_ids(self) -> list[int]:
        return [self.base + k for k, r in enumerate(self.results) if r is PENDING]

    def settled(self) -> list[tuple[float, float]]:
        """(settled, started) of each settled request held."""
        return [(d, s) for d, s, r in zip(self.done, self.started, self.results) if r is not PENDING]
