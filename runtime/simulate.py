"""Discrete-event simulation of the end -> link -> cloud pipeline over a bandwidth trace.

Hours of trace in seconds, with the rules of :mod:`coach_fx.runtime.end`:

* the end device takes frame k once it has arrived (a camera at ``fps``, or as fast as the
  pipeline allows), once frame k-1 is handed to the sender, and while fewer than
  ``max_inflight`` requests are unanswered; it computes for the plan's ``t_end``;
* the message waits in the send queue (``queue_size`` deep: a full queue stops the end); the
  link sends one message at a time and each transfer follows the trace exactly as the emulated
  link does (``Trace.finish_time``), then the link latency;
* the cloud computes requests in arrival order for the plan's ``t_cloud`` (downlink and the
  other half of the round trip included, as the cost model prices them);
* an end-only plan, or a frame the semantic cache answers, completes on the end.

Per-request choices come from :class:`coach_fx.runtime.controller.OnlineController` (the end
worker's own controller), fed with the simulated results as they complete: the same bandwidth
samples (bytes over time on the wire), the same band switching and bits. Each plan is its
:class:`~coach_fx.runtime.plans.CutProfile`, the record the controller reads too: stage times
from the planner's cost model (per bit width where they differ), message sizes from the wire's.

Example::

    >>> from coach_fx.runtime.plans import Sizes
    >>> plans = {0: CutProfile(Sizes(own_bytes=50_000), min_bits=32, t_end=0.01, t_cloud=0.005)}
    >>> stats = simulate(plans, 500, Trace.constant(20.0))
    >>> round(stats.throughput)          # the link: 50 kB at 20 Mbit/s = 20 ms per frame
    50
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.controller import OnlineController
from coach_fx.runtime.plans import CutProfile
from coach_fx.runtime.stats import Outcomes, StageBusy, Stats, steady_throughput
from coach_fx.runtime.traces import Trace


def simulate(plans: dict[int, CutProfile], n: int, trace: Trace | float, *, fps: float | None = None,
             controller: OnlineController | None = None, plan: int | None = None,
             config: StreamConfig = StreamConfig(), latency_s: float = 0.0,
             start_s: float = 0.0, audit_rate: float = 0.1, seed: int = 0) -> Stats:
    """Run ``n`` frames through ``plans`` over ``trace`` (a Trace or a fixed Mbit/s).

    ``controller`` picks the plan and bits per frame (otherwise ``plan``, default the first,
    with its own widths: ``Sizes.own_bytes``). ``fps``: frames arrive from a camera at that
    rate and latency counts from arrival (queueing included); otherwise frames are always ready
    and latency counts from when the end worker takes the frame, as the real pipeline measures it. ``config``: the
    pipeline's send queue and in-flight limit. ``start_s``: where in the trace the stream
    begins. A plan's ``hit_rate`` answers that share of frames on the end (a seeded draw), of
    which ``audit_rate`` are still sent.
    """
    if n <= 0:
        return Stats(0, [], 0.0, 0.0, StageBusy(), 0)
    sim = _Pipeline(trace if isinstance(trace, Trace) else Trace.constant(float(trace)),
                    config, latency_s, start_s)
    rng = random.Random(seed)
    fixed = plan if plan is not None else next(iter(plans))
    for k in range(n):
        arrival = k / fps if fps else 0.0
        t = max(arrival, sim.put_prev)
        taken = t
        # the controller learns every result that has come back by now, in order
        for p, nb, wire, cloud in sim.results_by(t):
            if controller is not None:
                controller.on_result(p, nb, wire, cloud)
        pid = controller.next_plan(t) if controller is not None else fixed
        sp = plans[pid]
        bits = controller.bits(pid, None, sp.t_end) if controller is not None else None
        hit = sp.hit_rate > 0 and rng.random() < sp.hit_rate
        audit = hit and rng.random() < audit_rate
        if not (sp.end_only or hit) or audit:
            t = sim.room_in_flight(t)
        t_end = sp.end_s(bits)
        if hit and not audit and sp.t_hit is not None:
            t_end = sp.t_hit
        sim.busy_end += t_end
        sim.started.append(arrival if fps else taken)
        if sp.end_only or (hit and not audit):
            sim.done.append(t + t_end)
            sim.answered += 1
            sim.put_prev = t + t_end
            continue
        finish = sim.send(k, pid, t + t_end, sp.message_bytes(bits), sp.t_cloud)
        sim.answered += hit
        sim.done.append(t + t_end if hit else finish)
    wall = max(sim.done) - min(sim.started) if sim.done else 0.0
    lat = [d - s for d, s in zip(sim.done, sim.started)]
    return Stats(n, lat, wall, steady_throughput(sim.done, wall),
                 StageBusy(sim.busy_end, sim.busy_link, sim.busy_cloud), sim.sent_bytes,
                 outcomes=Outcomes(answered_on_end=sim.answered))


class _Pipeline:
    """The simulated link and cloud: when each stage is free, what is in flight, the busy
    times and the results not yet seen by the end."""

    def __init__(self, trace: Trace, config: StreamConfig, latency_s: float, start_s: float) -> None:
        self.trace, self.config, self.latency_s, self.start_s = trace, config, latency_s, start_s
        self.out_q: deque[float] = deque()        # completion times of sent, unanswered requests
        self.link_starts: deque[float] = deque()  # when the sender took each of the last messages
        self.pending: list[tuple[float, int, int, int, float, float]] = []   # results not yet seen
        self.put_prev = self.link_free = self.cloud_free = 0.0
        self.started: list[float] = []
        self.done: list[float] = []
        self.busy_end = self.busy_link = self.busy_cloud = 0.0
        self.sent_bytes = self.answered = 0

    def results_by(self, t: float) -> list[tuple[int, int, float, float]]:
        """The results back by ``t`` in order (plan, bytes, wire s, cloud s); frees their room."""
        out = []
        while self.pending and self.pending[0][0] <= t:
            out.append(heapq.heappop(self.pending)[2:])
        while self.out_q and self.out_q[0] <= t:
            self.out_q.popleft()
        return out

    def room_in_flight(self, t: float) -> float:
        """When the end may send at or after ``t`` (fewer than ``max_inflight`` unanswered)."""
        while len(self.out_q) >= self.config.max_inflight:
            t = max(t, self.out_q.popleft())
            while self.out_q and self.out_q[0] <= t:
                self.out_q.popleft()
        return t

    def send(self, k: int, pid: int, e_end: float, nb: int, t_cloud: float) -> float:
        """Request ``k`` leaves the end at ``e_end``: queue, link, cloud; when its result is back."""
        qs = self.config.queue_size
        put = e_end if len(self.link_starts) < qs else max(e_end, self.link_starts[-qs])
        l_start = max(put, self.link_free)
        l_end = self.trace.finish_time(l_start + self.start_s, nb) - self.start_s
        self.link_free = l_end
        self.link_starts.append(l_start)
        if len(self.link_starts) > qs + 1:
            self.link_starts.popleft()
        self.busy_link += l_end - l_start
        self.sent_bytes += nb
        c_end = max(l_end + self.latency_s, self.cloud_free) + t_cloud
        self.cloud_free = c_end
        self.busy_cloud += t_cloud
        finish = c_end + self.latency_s
        heapq.heappush(self.pending, (finish, k, pid, nb, l_end - l_start, t_cloud))
        self.out_q.append(finish)
        self.put_prev = put
        return finish


__all__ = ["simulate"]
