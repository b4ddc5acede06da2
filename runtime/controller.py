"""Online control (DESIGN.md §6): bandwidth estimate, per-request bits, plan switching.

Pieces, each usable on its own; ``runtime.policy.OnlinePolicy`` joins them (and the semantic
cache) per request in the end worker:

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
* :class:`OnlineController`: the three together, per request, without tensors (the end
  worker's policy and the simulator both run it).

Example::

    >>> est = BandwidthEstimator(window=5)
    >>> est.add(125_000, 0.1); est.mbps
    10.0
    >>> from coach_fx.runtime.plans import Sizes
    >>> BitController(CutProfile(Sizes((100_000,)), min_bits=3, t_end=0.05, t_cloud=0.01)).choose(10.0)
    4
"""

from __future__ import annotations

import dataclasses

from collections import deque
from typing import Sequence

from coach_fx.runtime.wire import ReplyStats
from coach_fx.runtime.config import Bands, ControlConfig
from coach_fx.runtime.plans import CutProfile
from coach_fx.passes.wire_sizes import ALL_BITS

#: A cloud shared by several ends moves the controller to another plan only when that plan's
#: period under the load is this much shorter than the band's plan's.
LOAD_SWITCH_GAIN = 0.9
#: Weight of the newest message in a plan's learned size factor (``BitController.observe``).
SIZE_SMOOTHING = 0.2


#: on a real link that did not queue (``on_result(lower_bound=True)``), the estimate rises by
#: this factor per result, so that the bits (and plans) climb until the link queues and shows
#: its rate; a queued result then brings it down at once. Per result, so it climbs faster the
#: more requests go: 1.25 (BBR's probing gain) and 1.05 overshot a shaped link (42-72 plan
#: switches where the in-process stream made 14-25, bits up to 32 where it used 3-5)
PROBE_GAIN = 1.01


#: an idle link's lower bound (the previous request's bytes over the time between two sends)
#: is taken only from sends at most this far apart
BOUND_MAX_GAP_S = 0.05
#: frames sent with the next band's plan per probe of an end-only plan's link (a pair)
PROBE_FRAMES = 2
#: a request counts as having waited behind the one before when the gap between their
#: arrivals exceeds the gap between their sends by this much (clock and scheduling noise)
QUEUED_MARGIN_S = 0.0005


class ArrivalSampler:
    """Bandwidth samples from a real link's replies (one per link epoch: the end session's).

    Each reply reports when its request's last byte arrived at the cloud. Arrival minus send
    is the one-way delay plus the clocks' offset; above its least value so far, it is the time
    the request spent in the link. When the previous request was still in the link as this one
    was sent, the link was busy between their arrivals: that gap is this request's time on the
    wire, whatever its size (a one-segment message on a real link shows no other). Otherwise
    the link had drained the previous request before this one was sent: its rate was at least
    that request's bytes over the time between the two sends, a lower bound (the controller
    probes above it: an idle link tells no more). The in-process link's wire time is exact and
    its arrival unknown (0): such a reply stays as it is.
    """

    def __init__(self) -> None:
        self.sent_at: dict[int, float] = {}    # requests in flight: when their send began
        #: the previous request's (sent, arrived, delay, bytes)
        self._prev: tuple[float, float, float, float] | None = None
        self._min_delay: float | None = None

    def sent(self, req: int, t: float) -> None:
        self.sent_at[req] = t

    def forget(self, req: int) -> None:
        """Request ``req`` will bring no figures (an error reply)."""
        self.sent_at.pop(req, None)

    def sample(self, req: int, st: ReplyStats | None) -> ReplyStats | None:
        """A reply's figures with its wire time made the bandwidth sample (``wire_s``; 0 where
        the arrival told nothing) and ``lower_bound`` set where that is only a lower bound."""
        sent = self.sent_at.pop(req, None)
        if st is None or sent is None or st.arrival_s <= 0:
            return st
        delay = st.arrival_s - sent
        self._min_delay = delay if self._min_delay is None else min(self._min_delay, delay)
        prev, self._prev = self._prev, (sent, st.arrival_s, delay, st.request_bytes)
        if prev is None or st.arrival_s <= prev[1]:
            return dataclasses.replace(st, wire_s=0.0)
        between = sent - prev[0]
        if prev[2] - self._min_delay > between + QUEUED_MARGIN_S:
            return dataclasses.replace(st, wire_s=st.arrival_s - prev[1])
        if between > BOUND_MAX_GAP_S:     # sends this far apart bound the rate too low to tell
            return dataclasses.replace(st, wire_s=0.0)
        # the bound is the previous request's rate; sized as this one, it takes this long
        return dataclasses.replace(st, wire_s=st.request_bytes * (between + QUEUED_MARGIN_S) / prev[3],
                                   lower_bound=True)


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
        # a snapshot: the end thread reads while the receiver thread adds (copying a deque
        # runs in C, so no other thread can change it meanwhile)
        samples = tuple(self.samples)
        if not samples:
            return None
        return len(samples) / sum(1.0 / s for s in samples)


class BitController:
    """Highest bits that keep the link within the compute bottleneck, never below the floor."""

    def __init__(self, profile: CutProfile, bits: Sequence[int] = ALL_BITS) -> None:
        self.profile = profile
        self.all_bits = sorted(bits)
        self.bits = sorted(b for b in bits if b >= profile.min_bits) or [profile.min_bits]
        #: per bit width, sent bytes over the profile's expected bytes (smoothed): coded sizes
        #: vary with the frames, so the byte estimate follows what was sent
        self.size_factor: dict[int, float] = {}

    def observe(self, bits: int, nbytes: int) -> None:
        """A message of ``nbytes`` went with ``bits``: learn how its size compares."""
        expected = self.profile.message_bytes(bits)
        if expected > 0 and nbytes > 0:
            prev = self.size_factor.get(bits)
            f = nbytes / expected
            self.size_factor[bits] = f if prev is None else (1 - SIZE_SMOOTHING) * prev + SIZE_SMOOTHING * f

    def link_seconds(self, bits: int, mbps: float) -> float:
        """The link time of a message with ``bits`` at ``mbps``, on the sizes seen so far."""
        return self.profile.link_seconds(bits, mbps) * self.size_factor.get(bits, 1.0)

    def choose(self, mbps: float | None, floor: int | None = None,
               compute_s: float | None = None, headroom: float = 1.0) -> int:
        """Bits for the next request at estimated ``mbps`` (unknown: the safe minimum).

        ``floor`` replaces the accuracy-safe minimum for this request: the semantic cache lowers
        it for a sample close to a known class (its similarity band's calibrated bits).
        ``compute_s`` replaces the profile's compute bottleneck (measured while running).
        """
        lo = self.profile.min_bits if floor is None else floor
        limit = (self.profile.compute_s if compute_s is None else compute_s) * headroom
        allowed = [b for b in self.all_bits if b >= lo] or [self.all_bits[-1]]
        if mbps is None:
            return allowed[0]
        stages = {b: (e, c) for b, e, c in self.profile.stage_s or ()}
        if all(b in stages for b in allowed):
            # the shortest period over the widths (link time with the headroom), and among
            # those within 2 % of it the most bits
            def period(b: int) -> float:
                e, c = stages[b]
                return max(e, c, self.link_seconds(b, mbps) / headroom)
            best = min(period(b) for b in allowed)
            return max(b for b in allowed if period(b) <= 1.02 * best)
        for b in reversed(allowed):
            if self.link_seconds(b, mbps) <= limit:
                return b
        return allowed[0]

    def link_bound(self, mbps: float | None) -> bool:
        """Even the fewest safe bits make the link the bottleneck (time to switch plan)."""
        return mbps is not None and self.link_seconds(self.bits[0], mbps) > self.profile.compute_s


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


class OnlineController:
    """The per-request decisions of DESIGN.md §6 without any tensor: which plan, how many bits,
    and what each result teaches. ``runtime.policy.OnlinePolicy`` runs it in the end worker and
    ``runtime.simulate`` in the discrete-event simulator, so both follow the same rules.

    ``profiles``: plan id -> :class:`CutProfile`; ``bands``: which plan serves which rate
    (``PlanSwitcher``), ``control``: see :class:`~coach_fx.runtime.config.ControlConfig`; ``end_s``: plan id -> the end stage's time, used with the cloud's
    reported compute time as the bottleneck the bits are sized against (``headroom`` keeps the
    link a little under it: the estimate trails the link).
    """

    def __init__(self, profiles: dict[int, CutProfile], bands: Bands = Bands(),
                 control: ControlConfig = ControlConfig(),
                 end_s: dict[int, float] | None = None) -> None:
        start = bands.start
        if start not in profiles:
            raise ValueError(f"start plan {start} is not among the plans {sorted(profiles)}")
        band_plans = bands.band_plans
        unknown = set(band_plans) - set(profiles)
        if unknown:
            raise ValueError(f"band plans {sorted(unknown)} are not among the plans")
        self.profiles = profiles
        self.switcher = PlanSwitcher(bands.edges_mbps, band_plans, hold=control.hold,
                                     start=band_plans.index(start) if start in band_plans else None) \
            if control.switching else None
        self.current = start
        self._switches = 0
        self.adaptive, self.headroom = control.adaptive, control.headroom
        self.estimator = BandwidthEstimator(control.window)
        self.bit_controllers = {k: BitController(p) for k, p in profiles.items()}
        self.end_s = dict(end_s or {})
        #: per plan, its cloud stage as the replies report it (× the ends sharing the cloud)
        self.cloud_s: dict[int, float] = {}
        self.ends = 1.0
        #: on an end-only plan nothing crosses, so no result measures the link: every
        #: ``probe_s`` one frame goes with the next band's plan, or the controller could never
        #: see the link recover
        self.probe_s = control.probe_s
        self._last_probe: float | None = None
        self._probe_left = 0
        self.probes = 0

    def next_plan(self, now: float) -> int:
        """The plan for the next frame at time ``now`` (a probe now and then, see above: two
        frames back to back, so that a real link, which tells nothing of its rate by one small
        message, shows it by the second's arrival behind the first)."""
        if not self.profiles[self.current].end_only or self.switcher is None:
            return self.current
        if self._last_probe is None:
            self._last_probe = now
        if self._probe_left == 0 and now - self._last_probe < self.probe_s:
            return self.current
        plans = self.switcher.plans
        above = [p for p in plans[self.switcher.band + 1:] if not self.profiles[p].end_only]
        if not above:
            return self.current
        if self._probe_left == 0:
            self._last_probe, self._probe_left = now, PROBE_FRAMES
        self._probe_left -= 1
        self.probes += 1
        return above[0]

    def bits(self, plan: int, floor: int | None = None, end_s: float | None = None) -> int | None:
        """Bits for the next request on ``plan`` (None when not adaptive: the offline bits)."""
        if not self.adaptive:
            return None
        # quick down, slow up: the latest sample alone can lower the estimate (a drop shows at
        # once), only the harmonic mean of the window can raise it
        est = self.estimator.mbps
        if est is not None and self.estimator.samples:
            est = min(est, self.estimator.samples[-1])
        return self.bit_controllers[plan].choose(est, floor, self.compute_s(plan, end_s),
                                                 self.headroom)

    def compute_s(self, plan: int, end_s: float | None = None) -> float:
        """The compute bottleneck of ``plan`` as measured so far."""
        end = end_s if end_s is not None else self.end_s.get(plan, 0.0)
        cloud = self.cloud_s.get(plan)
        if cloud is None:
            return self.profiles[plan].compute_s
        return max(end, cloud)

    def on_sent(self, plan: int, bits: int, nbytes: int) -> None:
        """A request of ``nbytes`` went on ``plan`` with ``bits`` (its coded size teaches the
        plan's byte estimate)."""
        self.bit_controllers[plan].observe(bits, nbytes)

    def link_seconds(self, plan: int, bits: int, mbps: float) -> float:
        """Link time of a request on ``plan`` with ``bits`` at ``mbps`` (sizes as sent so far)."""
        return self.bit_controllers[plan].link_seconds(bits, mbps)

    def on_result(self, plan: int | None, nbytes: float, wire_s: float, cloud_s: float | None,
                  lower_bound: bool = False, ends: float = 1.0) -> None:
        """A result came back: a bandwidth sample (its message's bytes over its time on the
        wire; ``lower_bound``: the rate is at least that, which raises the estimate, never
        lowers it), the cloud's compute time and the ``ends`` that share the cloud (a server's
        sessions: each end's cloud stage is that many requests' time); may switch the plan."""
        self.ends = max(1.0, ends)
        if plan is not None and cloud_s is not None:
            stage = cloud_s * self.ends
            prev = self.cloud_s.get(plan)
            self.cloud_s[plan] = stage if prev is None else 0.8 * prev + 0.2 * stage
        est = self.estimator.mbps
        if lower_bound and nbytes > 0 and wire_s > 0 and est is not None:
            # the link did not queue: it has room, so the estimate rises by the probing gain
            # (at least to the bound) until a queued request shows the rate itself
            wire_s = min(wire_s, nbytes * 8 / (est * PROBE_GAIN * 1e6))
        if nbytes > 0 and wire_s > 0:
            self.estimator.add(nbytes, wire_s)
            if self.switcher is not None:
                plan = self._under_load(self.switcher.update(self.estimator.mbps))
                # from a start plan that serves no band (or one band for all rates), the first
                # estimate moves to its band's plan
                self._switches += plan != self.current
                self.current = plan

    def _under_load(self, plan: int) -> int:
        """With ends sharing the cloud, the plan whose period is shortest when each request's
        cloud stage is ``ends`` times its own (as ``Device(ends=K)`` prices plans), where it
        beats the band's ``plan`` by ``LOAD_SWITCH_GAIN``: a loaded cloud pushes work to the ends."""
        if self.ends <= 1:
            return plan
        est = self.estimator.mbps

        def period(p: int) -> float:
            prof = self.profiles[p]
            if prof.end_only:
                return self.end_s.get(p, prof.t_end)
            link = self.bit_controllers[p].link_seconds(prof.min_bits, est) if est else 0.0
            return max(self.end_s.get(p, prof.t_end), prof.t_cloud * self.ends, link)
        best = min(self.profiles, key=period)
        return best if period(best) < LOAD_SWITCH_GAIN * period(plan) else plan

    @property
    def switches(self) -> int:
        """How often the plan changed."""
        return self._switches
