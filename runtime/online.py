"""The online end side (DESIGN.md §6): per request, which plan, how many bits, or no request at all.

:class:`OnlinePolicy` plugs into :class:`coach_fx.runtime.pipeline.EndWorker` (``policy=``).
For each frame it

1. runs the end half of the current plan, which returns the crossing tensors unquantized (or,
   when the plan's cache looks up at an earlier node of the end half, ``Variant.probe``, the
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

    >>> policy = OnlinePolicy(variants, edges_mbps=[2.0], band_plans=[0, 1])   # doctest: +SKIP
    >>> EndWorker(None, None, link.end, out_spec, policy=policy).run(frames)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from coach_fx._compat import tree_flatten
from coach_fx.passes.partition import Boundary
from coach_fx.runtime.cache import SemanticCache, lookup_features
from coach_fx.runtime.codec import quantized_entry
from coach_fx.runtime.controller import CutProfile, OnlineController
from coach_fx.runtime.pipeline import Prepared
from coach_fx.runtime.wire import FLAG_CACHE_HIT, Entry, encode


@dataclass
class CacheSetup:
    """A plan's calibrated semantic-cache settings."""

    sim_threshold: float
    margin: float
    hit_rate: float                                   # on the calibration stream
    bits_by_similarity: list[tuple[float, int]] = field(default_factory=list)
    grid: int = 2
    #: the node of the end half whose features the cache looks up (None: the cut's crossing
    #: values); an earlier node answers a hit without running the rest of the end half
    at: str | None = None
    #: hits only for the latest known answer's class (see ``SemanticCache``)
    context: bool = False

    def floor(self, similarity: float) -> int | None:
        for edge, bits in self.bits_by_similarity:
            if similarity >= edge:
                return bits
        return None


@dataclass
class Variant:
    """One plan as the online end side runs it."""

    plan_id: int
    end_module: Callable[..., Any]    # model inputs -> crossing values, unquantized
    boundary: Boundary                # of that float split (every crossing "raw")
    profile: CutProfile
    #: per crossing: None = the controller picks its bits; otherwise fixed bits (model inputs
    #: keep ``Settings.input_bits``; non-float values go as they are)
    fixed_bits: tuple[int | None, ...]
    #: the offline plan's bits for the adaptive crossings (one for all, or one per crossing)
    plan_bits: int | tuple[int, ...]
    cache: CacheSetup | None = None
    reference_s: float | None = None  # end work on this host, measured alone (no cache)
    lookup_s: float = 0.0             # what the cache lookup adds to it
    #: end work of a hit answered on the end (end half and lookup; nothing quantized or
    #: encoded), measured alone; None: charged like a miss
    hit_s: float | None = None
    end_only: bool = False            # the end half returns the model's output: nothing to send
    #: per crossing, the most bits worth sending (a model input: the bits of its source, as
    #: an 8-bit camera frame gains nothing from 32); None: no limit
    caps: tuple[int | None, ...] | None = None
    #: the plan's cloud half on the unquantized crossing values, to finish on the end device a
    #: request the link has no room for (None: never finished there); its time on this host alone
    local_module: Callable[..., Any] | None = None
    local_s: float | None = None
    #: the end half split where the cache looks up, when that is before the cut (see
    #: ``CacheSetup.at``): (head: inputs -> that node's value as a 1-tuple, tail: the value ->
    #: the crossing values, as ``end_module`` returns them)
    probe: tuple[Callable[..., Any], Callable[..., Any]] | None = None

    def message_bytes(self, bits: int | None = None) -> int:
        """Bytes on the wire of one request with ``bits`` (None: the offline plan's)."""
        from coach_fx.passes.ops import packed_nbytes
        from coach_fx.plan import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES
        total = MESSAGE_HEADER_BYTES
        for k, c in enumerate(self.boundary.crossings):
            numel = math.prod(c.shape) if c.shape is not None else 1
            if c.kind == "image":   # coded size varies; its 8-bit codes bound it in practice
                total += TENSOR_HEADER_BYTES + numel
                continue
            b = self.bits_for(k, bits, None)
            size = c.dtype.itemsize if c.dtype is not None else 8
            total += TENSOR_HEADER_BYTES + (numel * size if b >= 32 else
                                            numel * 2 if b == 16 else packed_nbytes(numel, b))
        return total

    def bits_for(self, k: int, bits: int | None, floor: int | None) -> int:
        """Bits of crossing ``k``: ``bits`` from the controller, or (None) the offline plan's,
        lowered to ``floor`` for a near miss of the cache; never above the crossing's cap."""
        fixed = self.fixed_bits[k]
        if fixed is not None:
            return fixed
        if bits is None:
            bits = self.plan_bits if isinstance(self.plan_bits, int) else self.plan_bits[k]
            if floor is not None:
                bits = min(bits, floor)
        cap = self.caps[k] if self.caps is not None else None
        return min(bits, cap) if cap is not None else bits


def _as_tuple(vals: Any) -> tuple:
    return vals if isinstance(vals, tuple) else (vals,)


def mean_end_s(miss_s: float, hit_s: float, answered: float) -> float:
    """Mean end work per request with cache lookups: the ``answered`` share are hits answered
    on the end (end half and lookup only), the rest (misses, audited hits) pays the lookup on
    top of quantize and encode."""
    return answered * hit_s + (1 - answered) * miss_s


def label_of(out: Any) -> int:
    """The class a classifier's output names: argmax of its first tensor."""
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError("the semantic cache needs a model whose output holds a tensor of scores")
    return int(leaves[0].reshape(-1).argmax())


class OnlinePolicy:
    """Bandwidth estimate, adaptive bits, plan switching and the semantic cache, per request.

    ``adaptive``: pick bits per request (else each plan's offline bits); ``switching``: follow
    the bandwidth bands (else stay on ``start``); ``cache``: answer hits on the end;
    ``similarity_bits``: let near misses travel with their band's fewer bits; ``local``: a
    request that finds the link backlogged or stalled is finished on the end device (its plan's
    cloud half run there on the unquantized crossing values) instead of waiting for room in
    flight, see :meth:`local_wait_s`.
    """

    def __init__(self, variants: Sequence[Variant], edges_mbps: Sequence[float] = (),
                 band_plans: Sequence[int] | None = None, *, start: int = 0, adaptive: bool = True,
                 switching: bool = True, cache: bool = True, similarity_bits: bool = True,
                 capacity: int = 16, audit_rate: float = 0.1, hold: int = 5, window: int = 5,
                 seed: int = 0, label: Callable[[Any], int] = label_of, end_slowdown: float = 1.0,
                 headroom: float = 0.9, local: bool = False) -> None:
        self.variants = {v.plan_id: v for v in variants}
        self.control = OnlineController({k: dataclasses.replace(v.profile, end_only=v.end_only)
                                         for k, v in self.variants.items()},
                                        edges_mbps, band_plans, start=start, adaptive=adaptive,
                                        switching=switching, hold=hold, window=window,
                                        headroom=headroom)
        self.adaptive, self.use_cache, self.similarity_bits = adaptive, cache, similarity_bits
        self.caches = {k: SemanticCache(v.cache.sim_threshold, v.cache.margin, capacity, audit_rate,
                                        seed=seed + k, context=v.cache.context)
                       for k, v in self.variants.items() if v.cache is not None}
        self.label = label
        #: the end stage (its work measured alone × the slowdown) joins the cloud's reported
        #: compute time as the bottleneck the controller sizes the bits against
        self.end_slowdown = end_slowdown
        self.answers: dict[int, Any] = {}      # class -> its last cloud-confirmed output
        self._ctx: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.bits_used: Counter = Counter()
        self.plans_used: Counter = Counter()
        self.hits = self.audits = self.corrections = self.lowered = self.finished_locally = 0
        self.local = local
        #: the request now waiting for room in flight (one at a time: the end worker is one
        #: thread): (request, variant, its crossing values, its message's bytes, its bits)
        self._waiting: tuple[int, Variant, tuple, int, int] | None = None
        self.audit_rate = audit_rate
        self._looked: Counter = Counter()
        self._answered: Counter = Counter()

    # ------------------------------------------------------------------ per frame
    def prepare(self, i: int, x: tuple) -> Prepared:
        v = self.variants[self.control.next_plan(time.perf_counter())]
        ref = v.reference_s
        if v.end_only:
            self.plans_used[v.plan_id] += 1
            out = v.end_module(*x)
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
            ref = ref + v.lookup_s if ref is not None else None
            if v.probe is not None:
                # the cache looks up at a node inside the end half: a hit skips the rest of it
                head = v.probe[0](*x)
                feat = lookup_features(list(head), v.cache.grid)
            else:
                vals = _as_tuple(v.end_module(*x))
                feat = lookup_features([t for t, b in zip(vals, v.fixed_bits)
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
                    return Prepared(None, answer, True, v.hit_s if v.hit_s is not None else ref)
                self.audits += 1
                cached = r.label
            elif self.similarity_bits:
                floor = v.cache.floor(r.similarity)
            if vals is None:
                vals = _as_tuple(v.probe[1](*head))
        else:
            vals = _as_tuple(v.end_module(*x))
        bits = self.control.bits(v.plan_id, floor, self.end_stage_s(v))
        per = [v.bits_for(k, bits, floor) for k in range(len(vals))]
        adaptive_bits = [b for b, f in zip(per, v.fixed_bits) if f is None]
        if floor is not None and adaptive_bits and min(adaptive_bits) < v.profile.min_bits:
            self.lowered += 1
        # an image crossing is already coded (JPEG/PNG): it goes as it is, never re-quantized
        images = {k for k, c in enumerate(getattr(v.boundary, "crossings", ())) if c.kind == "image"}
        entries = [Entry.of_value(t) if k in images or not isinstance(t, torch.Tensor)
                   else quantized_entry(t, b)
                   for k, (t, b) in enumerate(zip(vals, per))]
        msg = encode(i, entries, FLAG_CACHE_HIT if cached is not None else 0, v.plan_id)
        with self._lock:
            self._ctx[i] = (v.plan_id, feat, cached)
        key = max(adaptive_bits) if adaptive_bits else 32
        if self.local and v.local_module is not None and v.local_s is not None:
            self._waiting = (i, v, vals, len(msg), key)
        if cached is None:
            self.bits_used[key] += 1
            self.plans_used[v.plan_id] += 1
            return Prepared(msg, None, False, ref)
        return Prepared(msg, self.answers[cached], True, ref)

    def on_result(self, i: int, out: Any, stats: Sequence[float], audit: bool) -> None:
        with self._lock:
            ctx = self._ctx.pop(i, None)
            if len(stats) >= 3:
                self.control.on_result(ctx[0] if ctx else None, stats[1], stats[2], stats[0])
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

    def _note(self, i: int, label: int) -> None:
        # the stream's latest known answer, for every plan's cache: the context is the
        # stream's, whichever plan (or none, lookups skipped) answered
        for cache in self.caches.values():
            cache.note(i, label)

    # ------------------------------------------------------------------ finishing on the end
    def local_wait_s(self, i: int, inflight: int, silence_s: float) -> float:
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
        if not self.local or w is None or w[0] != i:
            return math.inf
        _, v, _, nbytes, _ = w
        t_local = v.local_s * self.end_slowdown
        mbps = self.control.estimator.mbps
        if mbps is not None and (inflight - 1) * nbytes * 8 / (mbps * 1e6) >= t_local:
            return 0.0
        return max(0.0, t_local - silence_s)

    def finish_locally(self, i: int) -> Prepared:
        """Finish request ``i`` on the end device (see :meth:`local_wait_s`): its answer, and
        the work's time on this host alone. The result teaches the cache like a cloud result
        (the same weights, unquantized); an audit copy is checked here instead."""
        assert self._waiting is not None and self._waiting[0] == i
        _, v, vals, _, bits = self._waiting
        self._waiting = None
        out = v.local_module(*vals)
        with self._lock:
            audit = self._ctx.get(i, (None, None, None))[2] is not None
        self.on_result(i, out, (), audit)
        if not audit:
            self.finished_locally += 1
            self.bits_used[bits] -= 1     # counted as sent in prepare; it went nowhere
        return Prepared(None, out, True, v.local_s)

    def answered_share(self, v: Variant) -> float:
        """The share of plan ``v``'s lookups answered on the end (hits not audited): the
        calibrated rate, worth 20 lookups, updated with what this stream has seen."""
        if v.cache is None:
            return 0.0
        prior = v.cache.hit_rate * (1 - self.audit_rate)
        looked, answered = self._looked.get(v.plan_id, 0), self._answered.get(v.plan_id, 0)
        return (answered + 20 * prior) / (looked + 20)

    def _cached_end_s(self, v: Variant) -> float:
        miss = v.reference_s + v.lookup_s
        return mean_end_s(miss, v.hit_s if v.hit_s is not None else miss, self.answered_share(v))

    def _cache_pays(self, v: Variant) -> bool:
        """Whether a lookup is worth its end time now: a hit saves link and cloud time (and the
        end's quantize and encode), a miss costs the lookup; while the end device is the
        bottleneck by a margin and lookups cost it more than its hits save, skip them."""
        mbps = self.control.estimator.mbps
        if mbps is None or v.reference_s is None:
            return True
        if self._cached_end_s(v) <= v.reference_s:
            return True
        end = self._cached_end_s(v) * self.end_slowdown
        link = v.profile.link_seconds(v.profile.min_bits, mbps)
        return max(link, self.control.cloud_s.get(v.plan_id, 0.0)) > 0.8 * end

    def end_stage_s(self, v: Variant) -> float | None:
        """The end stage of plan ``v`` on the emulated device (None: not measured)."""
        if v.reference_s is None:
            return None
        if self.use_cache and v.cache is not None:
            return self._cached_end_s(v) * self.end_slowdown
        return v.reference_s * self.end_slowdown

    # ------------------------------------------------------------------ reporting
    @property
    def current(self) -> int:
        return self.control.current

    @property
    def switches(self) -> int:
        return self.control.switches

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "audits": self.audits, "corrections": self.corrections,
                "finished_locally": self.finished_locally,
                "lowered_bits": self.lowered, "switches": self.switches,
                "bits": dict(sorted((+self.bits_used).items())),
                "plans": dict(sorted(self.plans_used.items())),
                "estimate_mbps": self.control.estimator.mbps}


__all__ = ["OnlinePolicy", "Variant", "CacheSetup", "label_of", "mean_end_s"]
