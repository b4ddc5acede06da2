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

``runtime.policy.OnlinePolicy`` uses it per request in the end worker;
``coach_fx.online.cache_calibration`` calibrates it offline (thresholds on a replayed
calibration stream, similarity bands to bits). Features: ``runtime.features``.

Example::

    >>> cache = SemanticCache(sim_threshold=0.9, margin=0.05)
    >>> from coach_fx.runtime.features import pooled_features
    >>> f = pooled_features([torch.randn(1, 8, 4, 4)])
    >>> cache.lookup(f).hit      # nothing confirmed yet
    False
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch


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
        # the norm as sqrt of the dot product: what ``np.linalg.norm`` computes for a vector,
        # without its per-call overhead (a replay calls this per confirmed frame)
        return self.total / max(math.sqrt(float(self.total @ self.total)), 1e-12)


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
    teach it are still on their way back (see ``OnlineSettings.result_lag``), while the frame looks enough
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


__all__ = ["Lookup", "SemanticCache"]
