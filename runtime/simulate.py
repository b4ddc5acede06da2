"""Discrete-event simulation of the end -> link -> cloud pipeline over a bandwidth trace.

Hours of trace in seconds, with the rules of :mod:`coach_fx.runtime.pipeline`:

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
samples (bytes over time on the wire), the same band switching and bits. Stage times come
from the planner's cost model (``coach_fx.evaluate`` on the plan's end set, per bit width).

Example::

    >>> plans = {0: SimPlan(t_end=0.01, t_cloud=0.005, nbytes=lambda bits: 50_000)}
    >>> stats = simulate(plans, 500, Trace.constant(20.0))
    >>> round(stats.throughput)          # the link: 50 kB at 20 Mbit/s = 20 ms per frame
    50
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable

from coach_fx.runtime.controller import OnlineController
from coach_fx.runtime.pipeline import Stats, steady_throughput
from coach_fx.traces import Trace


@dataclass
class SimPlan:
    """One plan as the simulator runs it."""

    t_end: float                              # end stage, seconds (on the emulated device)
    t_cloud: float                            # cloud stage, seconds (downlink included)
    nbytes: Callable[[int | None], int]       # message bytes at the given bits (None: the plan's)
    end_only: bool = False
    #: end stage at the given bits, when quantizing costs differ by width (default: t_end)
    t_end_at: Callable[[int | None], float] | None = None
    hit_rate: float = 0.0                     # share of frames the semantic cache answers
    #: end stage of a hit answered on the end (no quantize, no encode); None: ``t_end``
    t_hit: float | None = None


def simulate(plans: dict[int, SimPlan], n: int, trace: Trace | float, *, fps: float | None = None,
             controller: OnlineController | None = None, plan: int | None = None,
             queue_size: int = 2, max_inflight: int = 8, latency_s: float = 0.0,
             start_s: float = 0.0, audit_rate: float = 0.1, seed: int = 0) -> Stats:
    """Run ``n`` frames through ``plans`` over ``trace`` (a Trace or a fixed Mbit/s).

    ``controller`` picks the plan and bits per frame (otherwise ``plan``, default the first,
    with its own bits). ``fps``: frames arrive from a camera at that rate and latency counts
    from arrival (queueing included); otherwise frames are always ready and latency counts from
    when the end worker takes the frame, as the real pipeline measures it. ``start_s``: where in
    the trace the stream begins. A plan's ``hit_rate`` answers that share of frames on the end
    (a seeded draw), of which ``audit_rate`` are still sent.
    """
    tr = trace if isinstance(trace, Trace) else Trace.constant(float(trace))
    if n <= 0:
        return Stats(0, [], 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    rng = random.Random(seed)
    fixed = plan if plan is not None else next(iter(plans))
    out_q: deque[float] = deque()        # completion times of sent, unanswered requests
    link_starts: deque[float] = deque()  # when the sender took each of the last messages
    pending: list[tuple[float, int, int, int, float, float]] = []   # results not yet seen
    put_prev = link_free = cloud_free = 0.0
    started, done = [], []
    busy_end = busy_link = busy_cloud = 0.0
    sent_bytes = answered = 0
    for k in range(n):
        arrival = k / fps if fps else 0.0
        t = max(arrival, put_prev)
        taken = t
        # the controller learns every result that has come back by now, in order
        while pending and pending[0][0] <= t:
            _, _, p, nb, wire, cloud = heapq.heappop(pending)
            if controller is not None:
                controller.on_result(p, nb, wire, cloud)
        while out_q and out_q[0] <= t:
            out_q.popleft()
        pid = controller.next_plan(t) if controller is not None else fixed
        sp = plans[pid]
        bits = controller.bits(pid, None, sp.t_end) if controller is not None else None
        hit = sp.hit_rate > 0 and rng.random() < sp.hit_rate
        audit = hit and rng.random() < audit_rate
        if not (sp.end_only or hit) or audit:
            while len(out_q) >= max_inflight:     # wait for room in flight
                t = max(t, out_q.popleft())
                while out_q and out_q[0] <= t:
                    out_q.popleft()
        t_end = sp.t_end_at(bits) if sp.t_end_at is not None else sp.t_end
        if hit and not audit and sp.t_hit is not None:
            t_end = sp.t_hit
        e_end = t + t_end
        busy_end += t_end
        started.append(arrival if fps else taken)
        if sp.end_only or (hit and not audit):
            done.append(e_end)
            answered += 1
            put_prev = e_end
            continue
        nb = sp.nbytes(bits)
        put = e_end if len(link_starts) < queue_size else max(e_end, link_starts[-queue_size])
        l_start = max(put, link_free)
        l_end = tr.finish_time(l_start + start_s, nb) - start_s
        link_free = l_end
        link_starts.append(l_start)
        if len(link_starts) > queue_size + 1:
            link_starts.popleft()
        busy_link += l_end - l_start
        sent_bytes += nb
        c_start = max(l_end + latency_s, cloud_free)
        c_end = c_start + sp.t_cloud
        cloud_free = c_end
        busy_cloud += sp.t_cloud
        finish = c_end + latency_s
        heapq.heappush(pending, (finish, k, pid, nb, l_end - l_start, sp.t_cloud))
        out_q.append(finish)
        if hit:
            answered += 1
            done.append(e_end)
        else:
            done.append(finish)
        put_prev = put
    wall = max(done) - min(started) if done else 0.0
    lat = [d - s for d, s in zip(done, started)]
    return Stats(n, lat, wall, steady_throughput(done, wall), busy_end, busy_link, busy_cloud,
                 sent_bytes, answered_on_end=answered)


__all__ = ["SimPlan", "simulate"]
