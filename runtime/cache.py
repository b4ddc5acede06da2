"""Semantic cache at the cut (DESIGN.md §6): answer easy inputs on the end device.

Per class, a *label semantic center*: the mean of normalized, spatially pooled features at the
cut (or at an earlier node of the end half that tells classes apart as well, where a hit skips
the rest of the end half: see ``coach_fx.online``), learned only from labels the cloud
confirmed. A lookup is a **hit** when the top-1 cosine
similarity and the top-1/top-2 margin both clear their thresholds (calibrated offline so that
the accuracy lost to hits stays within the budget); a hit answers on the end and nothing is
sent. Capacity is bounded: the class with the lowest score (frequency, decayed with age) goes
first, which keeps recent and frequent classes (streams have temporal locality). A share of
hits (``audit_rate``) is still sent to the cloud; when the cloud disagrees, the wrong center
is dropped and the right one learns the sample. The cache never answers for a class it has
not seen confirmed. A context-aware cache (``context=True``) answers only for the class of the
latest request whose answer the end knows: the stream's temporal locality as a prior.

``runtime.online.OnlinePolicy`` uses it per request in the end worker; ``coach_fx.online``
calibrates it (thresholds on a replayed calibration stream, similarity bands to bits).

Example::

    >>> cache = SemanticCache(sim_threshold=0.9, margin=0.05)
    >>> f = pooled_features([torch.randn(1, 8, 4, 4)])
    >>> cache.lookup(f).hit      # nothing confirmed yet
    False
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


#: requests the end looks up between a request's lookup and the cloud's answer for it coming
#: back: in a three-stage pipeline a request's answer returns while the end works a few
#: requests on (one on the link, one in the cloud, those queued; the online benchmark's fixed
#: plans: latency 3.5-5 periods)
RESULT_LAG = 4


def pooled_features(tensors: Sequence[torch.Tensor], grid: int = 1) -> np.ndarray:
    """One normalized vector per sample: each tensor average-pooled over its spatial dims
    (to ``grid`` x ``grid`` cells for images: 2 keeps the coarse layout that tells a 6 from a
    9, which a global mean loses), each part normalized, then joined.

    It runs on every request on the (slow) end device, so it is a handful of calls: one
    pooling op in torch for an image, the norms in numpy (torch's per-op overhead would cost
    more than the arithmetic on these short vectors).
    """
    if len(tensors) == 1:
        v = _pooled_one(tensors[0], grid)
        if v is not None:
            return v / max(math.sqrt(float(v @ v)), 1e-12)
    parts = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.detach().float().cpu()
            if t.dim() == 4:
                h, w = t.shape[2:]
                g = grid if grid > 1 else 1
                if (h, w) != (g, g):     # already one cell per grid cell: nothing to pool
                    t = (torch.nn.functional.avg_pool2d(t, (h // g, w // g)) if h % g == 0 and w % g == 0
                         else torch.nn.functional.adaptive_avg_pool2d(t, g))
            a = t.numpy()
        else:
            a = np.asarray(t, np.float32)
        if a.ndim > 2 and not (a.ndim == 4 and isinstance(t, torch.Tensor)):
            a = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2)
        a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        parts.append(a)
    if len(parts) == 1:
        v = parts[0]
    else:
        v = np.concatenate([a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
                            for a in parts], axis=1)
    v = v / np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v))[:, None], 1e-12)
    return v[0] if v.shape[0] == 1 else v


def lookup_features(tensors: Sequence[torch.Tensor], grid: int = 1) -> np.ndarray:
    """``pooled_features`` up to a positive factor: what :meth:`SemanticCache.lookup` and
    :meth:`SemanticCache.confirm` take (cosine similarity and the centers' normalization do
    not see the factor). Per request on the end device: for one image tensor of one sample
    (the usual case) it is one pooling op, nothing normalized there."""
    if len(tensors) == 1:
        v = _pooled_one(tensors[0], grid)
        if v is not None:
            return v
    return pooled_features(tensors, grid)


def _pooled_one(t: object, grid: int) -> np.ndarray | None:
    """One float32 CPU image tensor of one sample whose sides the grid divides, average-pooled
    and flattened (not normalized); None: not that case."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1
            and t.dtype == torch.float32 and t.device.type == "cpu"):
        return None
    h, w = t.shape[2:]
    g = grid if grid > 1 else 1
    if h % g or w % g:
        return None
    t = t.detach()
    if (h, w) == (g, g):
        # a copy: the value runs on through the rest of the end half, maybe into an in-place op
        return t.numpy().reshape(-1).copy()
    return torch.nn.functional.avg_pool2d(t, (h // g, w // g)).numpy().reshape(-1)


def _vec_rows(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    return np.asarray(feats, dtype=np.float64)


def locality_stream(labels: torch.Tensor, n: int, mean_run: float = 10.0, seed: int = 0) -> list[int]:
    """Indices of ``n`` samples forming a stream with temporal locality: a class persists for a
    geometric number of frames (mean ``mean_run``), each frame a random sample of that class."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(int(c), []).append(i)
    classes = sorted(by_class)
    out: list[int] = []
    while len(out) < n:
        c = rng.choice(classes)
        run = 1
        while rng.random() > 1.0 / mean_run:
            run += 1
        out += [rng.choice(by_class[c]) for _ in range(run)]
    return out[:n]


@dataclass
class Lookup:
    label: int | None     # the answer on a hit (None otherwise)
    best: int | None      # the closest confirmed class, hit or not
    similarity: float
    margin: float
    hit: bool
    audit: bool = False   # a hit that is still sent to the cloud to check the cache


@dataclass
class _Center:
    total: np.ndarray
    count: int
    score: float
    last: int

    @property
    def vector(self) -> np.ndarray:
        return self.total / max(float(np.linalg.norm(self.total)), 1e-12)


def _vec(feat: torch.Tensor | np.ndarray) -> np.ndarray:
    # numpy for the per-request arithmetic on a few short vectors: torch's per-op overhead
    # would be most of a lookup, on the end device and in the calibration's replays
    if isinstance(feat, torch.Tensor):
        feat = feat.detach().cpu().numpy()
    return np.asarray(feat, dtype=np.float64).reshape(-1)


class SemanticCache:
    """Label semantic centers with hit thresholds, bounded capacity and audits.

    ``context``: a hit must also name the class of the latest request whose answer the end
    knows (a hit's own, or one the cloud returned; ``seq`` orders them). In a stream with
    temporal locality the class changes on few frames, and those are where the wrong hits
    come from: the new class's center is not cached yet, or the cloud's answers that would
    teach it are still on their way back (see ``RESULT_LAG``), while the frame looks enough
    like a cached class to clear the thresholds. With the context the thresholds can be looser
    for the same wrong hits (the calibration tries both and keeps the one that hits more).
    """

    def __init__(self, sim_threshold: float = 0.95, margin: float = 0.05, capacity: int = 16,
                 audit_rate: float = 0.1, decay: float = 0.98, seed: int = 0,
                 context: bool = False) -> None:
        self.sim_threshold, self.margin = sim_threshold, margin
        self.capacity, self.audit_rate, self.decay = capacity, audit_rate, decay
        self.context = context
        self.centers: dict[int, _Center] = {}
        self.rng = random.Random(seed)
        self.t = 0
        self._seq = 0                                  # requests seen (when no ``seq`` is given)
        self.latest: tuple[int, int] | None = None     # (seq, label) of the latest known answer
        self.hits = self.lookups = self.corrections = self.evictions = 0
        #: the unit centers as one matrix, with each class's row (kept current by ``confirm``:
        #: rebuilding it per lookup was most of a replay's time)
        self._matrix: tuple[list[int], np.ndarray, dict[int, int]] | None = None

    def _centers(self) -> tuple[list[int], np.ndarray]:
        if self._matrix is None:
            labels = list(self.centers)
            # float32: the features come as float32 (no cast per lookup)
            self._matrix = (labels, np.stack([self.centers[c].vector for c in labels]).astype(np.float32),
                            {c: k for k, c in enumerate(labels)})
        return self._matrix[:2]

    def _order(self, seq: int | None) -> int:
        if seq is None:
            self._seq += 1
            return self._seq
        self._seq = max(self._seq, seq)
        return seq

    def note(self, seq: int, label: int) -> None:
        """Request ``seq``'s answer is ``label`` (the context, see the class docstring)."""
        if self.latest is None or seq >= self.latest[0]:
            self.latest = (seq, label)

    def lookup(self, feat: torch.Tensor | np.ndarray, seq: int | None = None) -> Lookup:
        """Closest confirmed class; a hit when it clears the thresholds (and, with ``context``,
        is the latest known answer's class). ``seq``: the request's place in the stream."""
        seq = self._order(seq)
        self.lookups += 1
        if not self.centers:
            return Lookup(None, None, 0.0, 0.0, False)
        labels, m = self._centers()
        f = feat if isinstance(feat, np.ndarray) and feat.ndim == 1 else _vec(feat)
        # cosine against unit centers: one product and the feature's norm (the feature may
        # come unnormalized, see ``lookup_features``); a handful of centers: the top two in
        # plain Python beat numpy's per-call overhead
        norm = max(math.sqrt(float(f @ f)), 1e-12)
        sims = [x / norm for x in (m @ f).tolist()]
        i = max(range(len(sims)), key=sims.__getitem__)
        top = sims[i]
        second = max((x for j, x in enumerate(sims) if j != i), default=-1.0)
        best = labels[i]
        hit = top >= self.sim_threshold and top - second >= self.margin and \
            (not self.context or (self.latest is not None and self.latest[1] == best))
        if not hit:
            return Lookup(None, best, top, top - second, False)
        self.hits += 1
        self.note(seq, best)
        return Lookup(best, best, top, top - second, True, self.rng.random() < self.audit_rate)

    def confirm(self, feat: torch.Tensor | np.ndarray, label: int, seq: int | None = None) -> None:
        """Learn from a label the cloud returned (for request ``seq``: results may come back
        after later requests were answered)."""
        self.note(self._order(seq), label)
        self.t += 1
        for c in self.centers.values():
            c.score *= self.decay
        c = self.centers.get(label)
        v = _vec(feat)
        v = v / max(math.sqrt(float(v @ v)), 1e-12)     # ``lookup_features`` are not normalized
        if c is None:
            if len(self.centers) >= self.capacity:
                victim = min(self.centers, key=lambda k: (self.centers[k].score, self.centers[k].last))
                del self.centers[victim]
                self.evictions += 1
            self.centers[label] = _Center(v.copy(), 1, 1.0, self.t)
            self._matrix = None
            return
        c.total += v
        c.count += 1
        c.score += 1.0
        c.last = self.t
        if self._matrix is not None:
            self._matrix[1][self._matrix[2][label]] = c.vector

    def audit(self, feat: torch.Tensor, cached: int, cloud: int, seq: int | None = None) -> bool:
        """Check a hit against the cloud; a disagreeing center is dropped and relearned.
        Returns whether the cache was right."""
        if cached == cloud:
            self.confirm(feat, cloud, seq)
            return True
        self.corrections += 1
        self.centers.pop(cached, None)
        self._matrix = None
        self.confirm(feat, cloud, seq)
        return False

    def replay(self, feats: torch.Tensor, labels: torch.Tensor, stream: Sequence[int],
               lag: int = 0) -> tuple[int, int]:
        """Run ``stream`` (sample indices) through this cache as the end worker would: misses
        and audits learn the label ``lag`` requests later (when the cloud's answer is back);
        returns (hits, wrong hits)."""
        hits = wrong = 0
        feats = _vec_rows(feats)
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        pending: deque[tuple[int, int, np.ndarray, int, int | None]] = deque()
        for t, i in enumerate(stream):
            while pending and pending[0][0] <= t:
                _, seq, f0, y0, cached = pending.popleft()
                if cached is None:
                    self.confirm(f0, y0, seq)
                else:
                    self.audit(f0, cached, y0, seq)
            f, y = feats[i], int(labels[i])
            r = self.lookup(f, t)
            if r.hit:
                hits += 1
                wrong += r.label != y
                if r.audit:
                    pending.append((t + lag, t, f, y, r.label))
            else:
                pending.append((t + lag, t, f, y, None))
        return hits, wrong

    @classmethod
    def calibrate_on_stream(cls, feats: torch.Tensor, labels: torch.Tensor,
                            streams: Sequence[Sequence[int]], budget: float, capacity: int = 16,
                            audit_rate: float = 0.1, max_hit_error: float = 0.01,
                            sims: Sequence[float] = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99),
                            margins: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2),
                            lag: int = RESULT_LAG, context: bool = False,
                            ) -> tuple[float, float, float]:
        """(sim_threshold, margin, hit rate) that maximize hits on replayed calibration streams
        while wrong hits stay within ``budget`` of the frames of *every* stream.

        The replay learns each answer ``lag`` requests late, as the pipeline does: most wrong
        hits fall in the frames after a class change, before the cloud's first answers for the
        new class are back (a replay that learns at once saw a third of the wrong hits that
        the pipeline made with the same thresholds). ``context``: calibrate a cache that answers
        only for the latest known answer's class (see :class:`SemanticCache`).

        Replaying streams through a cache of the deployed capacity matters: with few classes
        cached the top-1/top-2 margin is taken among them only, so a sample of an uncached
        class can look confident; calibrating with every class's center present would not see
        those wrong hits. Give streams drawn from disjoint parts of the calibration data:
        thresholds that pass on each are less fitted to the few samples a stream repeats.
        Besides the budget (one wrong hit more than seen must still fit), at most
        ``max_hit_error`` of the hits may be wrong: features that tell classes apart poorly
        should not answer at all. ``labels``: the cloud's answers (the model's predictions).
        """
        best = (1.0, 1.0, 0.0)
        total = sum(len(s) for s in streams)
        feats, labels = _vec_rows(feats), labels.tolist()
        for mg in margins:
            for st in sorted(sims, reverse=True):   # strictest first
                hits = wrong = 0
                fail = False
                for stream in streams:
                    h, w = cls(st, mg, capacity, audit_rate, context=context).replay(
                        feats, labels, stream, lag)
                    hits, wrong = hits + h, wrong + w
                    fail = fail or w + 1 > budget * len(stream)
                if fail:
                    break       # looser thresholds only add wrong hits
                if wrong + 1 <= max_hit_error * hits and hits / total > best[2]:
                    best = (st, mg, hits / total)
        return best

    @staticmethod
    def similarity_bits(similarity: torch.Tensor, agrees: dict[int, torch.Tensor], min_bits: int,
                        budget: float, edges: Sequence[float] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8),
                        min_samples: int = 20) -> list[tuple[float, int]]:
        """Similarity bands -> bits below ``min_bits`` that stay safe in that band.

        ``similarity``: each calibration sample's top-1 similarity to the class centers;
        ``agrees[b]``: whether the cloud's answer with ``b`` bits equals the unquantized one,
        per sample. A band [edge, 1] gets the fewest bits whose disagreement among its samples
        stays within ``budget``; returned as (edge, bits), highest edge first, only where that
        is below ``min_bits``.
        """
        out: list[tuple[float, int]] = []
        for edge in sorted(edges, reverse=True):
            m = similarity >= edge
            if int(m.sum()) < min_samples:
                continue
            ok = [b for b in sorted(agrees) if b < min_bits
                  and 1.0 - agrees[b][m].float().mean().item() <= budget]
            # the fewest bits from which every width up to min_bits passes (as for min_bits:
            # one lucky width below a failing one is noise, not safety)
            safe = [b for b in ok if all(w in ok for w in agrees if b <= w < min_bits)]
            if safe:
                out.append((edge, min(safe)))
        return out
