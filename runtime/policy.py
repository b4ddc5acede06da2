"""Policies: per frame, what the end side sends (DESIGN.md §6). The end worker asks its
:class:`Policy` to ``prepare`` each frame and tells it each result; :class:`StaticPolicy` runs
one compiled plan with its bits, :class:`OnlinePolicy` decides per request which plan, how many
bits, or no request at all.

:class:`OnlinePolicy`, for each frame:
For each frame it

1. runs the end half of the current plan, which returns the crossing tensors unquantized (or,
   when the plan's cache looks up at an earlier node of the end half, ``EndHalf.lookup_split``, the
   end half up to that node first);
2. asks that plan's semantic cache: a **hit** answers on the end with the class's last
   cloud-confirmed output and sends nothing (a share of hits still goes to the cloud, flagged
   ``FLAG_CACHE_HIT``, to audit the cache), and an early lookup point skips the rest of the
   end half; a near miss lowers the bits to its similarity band's calibrated floor;
3. quantizes each float crossing with the bits the :class:`BitController` picks for the
   current bandwidth estimate (the highest whose link time stays within the compute
   bottleneck) and sends them with the plan's id, so the cloud runs the matching half
   (``CloudWorker(plans=..., adaptive=True)``).

Each result brings the cloud's receive duration and message size: a bandwidth sample for the
:class:`BandwidthEstimator`; the :class:`PlanSwitcher` moves to another band's plan once the
estimate has stayed there; the cache learns the cloud's label.

Example::

    >>> policy = OnlinePolicy(variants, Bands((2.0,), (0, 1)))                # doctest: +SKIP
    >>> EndWorker(link.end, out_spec, policy).run(frames)                      # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from coach_fx.passes._compat import tree_flatten
from coach_fx.passes.boundary import Boundary
from coach_fx.runtime.timing import median_time
from coach_fx.runtime.cache import SemanticCache
from coach_fx.runtime.codec import payload_to_entries, quantized_entry
from coach_fx.runtime.config import Bands, PolicyConfig
from coach_fx.runtime.controller import OnlineController
from coach_fx.runtime.features import lookup_features
from coach_fx.runtime.plans import OnlinePlans, Variant
from coach_fx.runtime.wire import FLAG_CACHE_HIT, Entry, ReplyStats, encode


@dataclass
class Prepared:
    """What the end side does with one frame: the message to send (None: nothing is sent) and,
    for a frame answered on the end device (a semantic-cache hit), the answer; a message sent
    with an answer is an audit copy whose reply only checks the answer."""

    msg: bytes | bytearray | None
    answer: Any = None
    answered: bool = False
    #: this work's time on this host measured alone (the emulated device takes slowdown x it)
    end_host_s: float | None = None


class Policy(Protocol):
    """What the end worker asks per frame and tells per result."""

    #: whether ``prepare`` may answer on the end: then the worker prepares a frame before
    #: waiting for room in flight (its answers go on while the link is stalled)
    answers_on_end: bool

    def warm_up(self, x: tuple, slowdown: float) -> None:
        """Before the stream, with its first frame (e.g. measure the end work alone)."""

    def prepare(self, i: int, x: tuple) -> Prepared:
        """Frame ``i``: the message to send and/or its answer on the end."""

    def on_result(self, i: int, out: Any, stats: ReplyStats | None, audit: bool) -> None:
        """A result came back (``audit``: for a frame already answered on the end)."""

    def finish_on_end_wait_s(self, i: int, inflight: int, silence_s: float) -> float:
        """How much longer request ``i`` waits for room in flight before it is finished on the
        end device (inf: never)."""

    def finish_on_end(self, i: int) -> Prepared:
        """Finish request ``i`` on the end device."""


class StaticPolicy:
    """One plan, its bits fixed at compile time: run the end half, encode what it returns.

    ``end_host_s``: the end half's time on this host measured alone (the emulated device
    takes ``slowdown ×`` it); measured on the first frame when None and ``measure``."""

    answers_on_end = False

    def __init__(self, end_module: Callable[..., Any], boundary: Boundary, plan_id: int = 0,
                 end_host_s: float | None = None, measure: bool = True) -> None:
        self.end_module, self.boundary, self.plan_id = end_module, boundary, plan_id
        self.end_host_s, self.measure = end_host_s, measure

    def prepare(self, i: int, x: tuple) -> Prepared:
        return Prepared(encode(i, payload_to_entries(self.boundary, self.end_module(*x)), 0,
                               self.plan_id), end_host_s=self.end_host_s)

    def on_result(self, i: int, out: Any, stats: ReplyStats | None, audit: bool) -> None:
        """A result came back (``audit``: for a frame already answered on the end)."""

    def warm_up(self, x: tuple, slowdown: float) -> None:
        """Measure the end half's own time on this host before the stream (median of 9 runs
        after 10 warm-up runs: in a fresh process the first runs of an exported module are
        several times slower)."""
        if not self.measure or self.end_host_s is not None or slowdown <= 1.0:
            return
        with torch.no_grad():
            self.end_host_s = median_time(lambda: self.prepare(0, x), 9, warmup=10)

    def finish_on_end_wait_s(self, i: int, inflight: int, silence_s: float) -> float:
        """Never finishes a request on the end: it waits for room in flight."""
        return math.inf

    def finish_on_end(self, i: int) -> Prepared:
        raise RuntimeError("StaticPolicy never finishes a request on the end device")


def as_tuple(vals: Any) -> tuple:
    """An end half's payload as a tuple (a half with one crossing returns it bare)."""
    return vals if isinstance(vals, tuple) else (vals,)


def mean_end_s(miss_s: float, hit_s: float, answered: float) -> float:
    """Mean end work per request with cache lookups: the ``answered`` share are hits answered
    on the end (end half and lookup only), the rest (misses, audited hits) pays the lookup on
    top of quantize and encode."""
    return answered * hit_s + (1 - answered) * miss_s


#: how much longer the pipeline's slowest stage may get by cache lookups before the policy
#: skips them (``OnlinePolicy._cache_pays``)
LOOKUP_SLACK = 1.25


def bottleneck_with_cache(end_s: float, link_s: float, cloud_s: float, sent: float) -> float:
    """The pipeline's slowest stage per request with semantic-cache lookups: the end's mean
    work with them (``end_s``), the link and the cloud for the ``sent`` share of requests (the
    rest answered on the end); ``sent=1``: without lookups. The planner prices a cut with the
    better of the two, the runtime looks up while it stays within ``LOOKUP_SLACK`` of it."""
    return max(end_s, link_s * sent, cloud_s * sent)


def label_of(out: Any) -> int:
    """The class a classifier's output names: argmax of its first tensor."""
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError("the semantic cache needs a model whose output holds a tensor of scores")
    return int(leaves[0].reshape(-1).argmax())


class OnlinePolicy:
    """Bandwidth estimate, adaptive bits, plan switching and the semantic cache, per request.

    ``bands``: which plan serves which bandwidth; ``config``: the controller (adaptive bits,
    switching), the cache (hits answered on the end, near misses with their band's fewer
    bits) and ``local``: a request that finds the link backlogged or stalled is finished on the
    end device (its plan's cloud half run there on the unquantized crossing values) instead of
    waiting for room in flight, see :meth:`finish_on_end_wait_s`; ``label``: the class an output names.
    """

    def __init__(self, variants: Sequence[Variant], bands: Bands = Bands(),
                 config: PolicyConfig = PolicyConfig(), label: Callable[[Any], int] = label_of) -> None:
        self.variants = {v.plan_id: v for v in variants}
        self.control = OnlineController({k: dataclasses.replace(v.profile, end_only=v.end_only)
                                         for k, v in self.variants.items()}, bands, config.control)
        cc = config.cache
        self.adaptive = config.control.adaptive
        self.use_cache, self.similarity_bits = cc.enabled, cc.similarity_bits
        self.caches = {k: SemanticCache(v.cache.sim_threshold, v.cache.margin, cc.capacity,
                                        cc.audit_rate, seed=cc.seed + k, context=v.cache.context)
                       for k, v in self.variants.items() if v.cache is not None}
        self.label = label
        #: the end stage (its work measured alone × the slowdown) joins the cloud's reported
        #: compute time as the bottleneck the controller sizes the bits against
        self.end_slowdown = config.end_slowdown
        self.answers: dict[int, Any] = {}      # class -> its last cloud-confirmed output
        self._ctx: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.bits_used: Counter = Counter()
        self.plans_used: Counter = Counter()
        self.hits = self.audits = self.corrections = self.lowered = self.finished_on_end = 0
        self.may_finish_on_end = config.finish_on_end
        #: the request now waiting for room in flight (one at a time: the end worker is one
        #: thread): (request, variant, its crossing values, its message's bytes, its bits)
        self._waiting: tuple[int, Variant, tuple, int, int] | None = None
        self.audit_rate = cc.audit_rate
        self._looked: Counter = Counter()
        self._answered: Counter = Counter()

    @classmethod
    def of(cls, plans: OnlinePlans, mode: str = "full", seed: int = 0) -> "OnlinePolicy":
        """A fresh policy running ``plans`` in ``mode`` (``runtime.config.MODES``)."""
        bands, config = plans.config(mode, seed)
        return cls(list(plans.variants.values()), bands, config)

    #: it answers on the end (cache hits, requests finished there)
    answers_on_end = True

    def warm_up(self, x: tuple, slowdown: float) -> None:
        """Nothing to measure: each variant's end work was measured at compile time."""

    # ------------------------------------------------------------------ per frame
    def prepare(self, i: int, x: tuple) -> Prepared:
        v = self.variants[self.control.next_plan(time.perf_counter())]
        ref = v.times.host_s
        if v.end_only:
            self.plans_used[v.plan_id] += 1
            out = v.end.module(*x)
            if self.caches:
                try:
                    with self._lock:
                        self._note(i, self.label(out))    # the stream's class, for the caches
                except ValueError:
                    pass
            return Prepared(None, out, True, ref)
        feat, cached, floor, vals = None, None, None, None
        cache = self.caches.get(v.plan_id) if self.use_cache else None
        if cache is not None and self.adaptive and not self._cache_pays(v):
            cache = None
        if cache is not None:
            ref = ref + v.times.lookup_s if ref is not None else None
            if v.end.lookup_split is not None:
                # the cache looks up at a node inside the end half: a hit skips the rest of it
                head = v.end.lookup_split[0](*x)
                feat = lookup_features(list(head), v.cache.grid)
            else:
                vals = as_tuple(v.end.module(*x))
                feat = lookup_features([t for t, b in zip(vals, v.bits.pinned)
                                        if b is None and isinstance(t, torch.Tensor)], v.cache.grid)
            with self._lock:
                r = cache.lookup(feat, i)
                answer = self.answers.get(r.label) if r.hit else None
                if answer is not None:
                    self._note(i, r.label)
            self._looked[v.plan_id] += 1
            if r.hit and answer is not None:
                self.hits += 1
                self.plans_used[v.plan_id] += 1
                if not r.audit:
                    self._answered[v.plan_id] += 1
                    return Prepared(None, answer, True, v.times.hit_s if v.times.hit_s is not None else ref)
                self.audits += 1
                cached = r.label
            elif self.similarity_bits:
                floor = v.cache.floor(r.similarity)
            if vals is None:
                vals = as_tuple(v.end.lookup_split[1](*head))
        else:
            vals = as_tuple(v.end.module(*x))
        bits = self.control.bits(v.plan_id, floor, self.end_stage_s(v))
        per = [v.bits.of(k, bits, floor) for k in range(len(vals))]
        adaptive_bits = [b for b, f in zip(per, v.bits.pinned) if f is None]
        if floor is not None and adaptive_bits and min(adaptive_bits) < v.profile.min_bits:
            self.lowered += 1
        # an image crossing is already coded (JPEG/PNG): it goes as it is, never re-quantized
        images = {k for k, c in enumerate(v.boundary.crossings) if c.kind == "image"}
        entries = [Entry.of_value(t) if k in images or not isinstance(t, torch.Tensor)
                   else quantized_entry(t, b, v.profile.sizes.codec)
                   for k, (t, b) in enumerate(zip(vals, per))]
        msg = encode(i, entries, FLAG_CACHE_HIT if cached is not None else 0, v.plan_id)
        if bits is not None and all(b == bits for b in adaptive_bits):   # as the controller chose
            self.control.on_sent(v.plan_id, bits, len(msg))
        with self._lock:
            self._ctx[i] = (v.plan_id, feat, cached)
        key = max(adaptive_bits) if adaptive_bits else 32
        if self.may_finish_on_end and v.finish_on_end is not None:
            self._waiting = (i, v, vals, len(msg), key)
        if cached is None:
            self.bits_used[key] += 1
            self.plans_used[v.plan_id] += 1
            return Prepared(msg, None, False, ref)
        return Prepared(msg, self.answers[cached], True, ref)

    def on_result(self, i: int, out: Any, stats: ReplyStats | None, audit: bool) -> None:
        with self._lock:
            ctx = self._ctx.pop(i, None)
            if stats is not None:
                self.control.on_result(ctx[0] if ctx else None, stats.request_bytes, stats.wire_s, stats.cloud_s,
                                       lower_bound=stats.lower_bound, ends=stats.ends)
            try:
                y = self.label(out)
            except ValueError:
                return
            self.answers[y] = out
            self._note(i, y)
            if ctx is None or ctx[1] is None:
                return
            plan_id, feat, cached = ctx
            cache = self.caches[plan_id]
            if cached is not None:
                if not cache.audit(feat, cached, y, i):
                    self.corrections += 1
            else:
                cache.confirm(feat, y, i)

    def learn(self, plan_id: int, feat: Any, label: int, out: Any = None) -> None:
        """Learn an answer as if the cloud had confirmed it for plan ``plan_id``'s cache: the
        lookup features ``feat`` are of class ``label``, whose output is ``out`` (None: keep
        the last one). For a warm start, and for timing a lookup at compile time on a cache
        in a known state (``coach_fx.online.deploy.end_path``).

        >>> policy.learn(0, features, 3, torch.zeros(1, 10))       # doctest: +SKIP
        """
        with self._lock:
            if out is not None:
                self.answers[label] = out
            cache = self.caches.get(plan_id)
            if cache is None:
                raise ValueError(f"plan {plan_id} has no semantic cache (plans with one: {sorted(self.caches)})")
            cache.confirm(feat, label)

    def _note(self, i: int, label: int) -> None:
        # the stream's latest known answer, for every plan's cache: the context is the
        # stream's, whichever plan (or none, lookups skipped) answered
        for cache in self.caches.values():
            cache.note(i, label)

    # ------------------------------------------------------------------ finishing on the end
    def finish_on_end_wait_s(self, i: int, inflight: int, silence_s: float) -> float:
        """How much longer request ``i``, waiting for room in flight, should wait before it is
        finished on the end device instead (0: now; inf: not while nothing changes).

        Finishing a request on the end costs the end its plan's cloud half (× the slowdown)
        and takes nothing from the link, so it pays whenever the link stays busy meanwhile: when
        the ``inflight`` requests ahead of it hold at least that much link time at the current
        estimate (the link, not the end, is the bottleneck now), or when nothing has come back
        for that long (``silence_s``: the link is stalled, say in an outage, where the estimate,
        learned from results, is blind). Otherwise waiting for the link is cheaper.
        """
        w = self._waiting
        if not self.may_finish_on_end or w is None or w[0] != i:
            return math.inf
        _, v, _, nbytes, _ = w
        t_local = v.finish_on_end.host_s * self.end_slowdown
        mbps = self.control.estimator.mbps
        if mbps is not None and (inflight - 1) * nbytes * 8 / (mbps * 1e6) >= t_local:
            return 0.0
        return max(0.0, t_local - silence_s)

    def finish_on_end(self, i: int) -> Prepared:
        """Finish request ``i`` on the end device (see :meth:`finish_on_end_wait_s`): its answer, and
        the work's time on this host alone. The result teaches the cache like a cloud result
        (the same weights, unquantized); an audit copy is checked here instead."""
        assert self._waiting is not None and self._waiting[0] == i
        _, v, vals, _, bits = self._waiting
        self._waiting = None
        out = v.finish_on_end.module(*vals)
        with self._lock:
            audit = self._ctx.get(i, (None, None, None))[2] is not None
        self.on_result(i, out, None, audit)
        if not audit:
            self.finished_on_end += 1
            self.bits_used[bits] -= 1     # counted as sent in prepare; it went nowhere
        return Prepared(None, out, True, v.finish_on_end.host_s)

    def answered_share(self, v: Variant) -> float:
        """The share of plan ``v``'s lookups answered on the end (hits not audited): the
        calibrated rate, worth 20 lookups, updated with what this stream has seen."""
        if v.cache is None:
            return 0.0
        prior = v.cache.hit_rate * (1 - self.audit_rate)
        looked, answered = self._looked.get(v.plan_id, 0), self._answered.get(v.plan_id, 0)
        return (answered + 20 * prior) / (looked + 20)

    def _cached_end_s(self, v: Variant) -> float:
        miss = v.times.host_s + v.times.lookup_s
        return mean_end_s(miss, v.times.hit_s if v.times.hit_s is not None else miss, self.answered_share(v))

    def _cache_pays(self, v: Variant) -> bool:
        """Whether a lookup is worth its end time now: the pipeline's bottleneck with lookups
        (the end's mean work with them; the link and the cloud only for the share not answered
        on the end, ``bottleneck_with_cache``, the planner's rule) against it without, which
        lookups may lengthen by up to ``LOOKUP_SLACK`` (a hit is answered at once and sends
        nothing: latency and bytes that a few percent of throughput buy)."""
        mbps = self.control.estimator.mbps
        if mbps is None or v.times.host_s is None:
            return True
        link = self.control.link_seconds(v.plan_id, v.profile.min_bits, mbps)
        cloud = self.control.cloud_s.get(v.plan_id, 0.0)
        with_cache = bottleneck_with_cache(self._cached_end_s(v) * self.end_slowdown, link, cloud,
                                           1.0 - self.answered_share(v))
        return with_cache <= LOOKUP_SLACK * bottleneck_with_cache(v.times.host_s * self.end_slowdown, link, cloud, 1.0)

    def end_stage_s(self, v: Variant) -> float | None:
        """The end stage of plan ``v`` on the emulated device (None: not measured)."""
        if v.times.host_s is None:
            return None
        if self.use_cache and v.cache is not None:
            return self._cached_end_s(v) * self.end_slowdown
        return v.times.host_s * self.end_slowdown

    # ------------------------------------------------------------------ reporting
    @property
    def current(self) -> int:
        return self.control.current

    @property
    def switches(self) -> int:
        return self.control.switches

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "audits": self.audits, "corrections": self.corrections,
                "finished_on_end": self.finished_on_end,
                "lowered_bits": self.lowered, "switches": self.switches,
                "bits": dict(sorted((+self.bits_used).items())),
                "plans": dict(sorted(self.plans_used.items())),
                "estimate_mbps": self.control.estimator.mbps}


__all__ = ["OnlinePolicy", "Policy", "Prepared", "StaticPolicy", "bottleneck_with_cache", "label_of",
           "mean_end_s"]
