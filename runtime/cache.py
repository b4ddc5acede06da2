"""Semantic cache at the cut (DESIGN.md §6): answer easy inputs on the end device.

Per class, a *label semantic center*: the mean of normalized, spatially pooled features at the
cut, learned only from labels the cloud confirmed. A lookup is a **hit** when the top-1 cosine
similarity and the top-1/top-2 margin both clear their thresholds (calibrated offline so that
the accuracy lost to hits stays within the budget); a hit answers on the end and nothing is
sent. Capacity is bounded: the class with the lowest score (frequency, decayed with age) goes
first, which keeps recent and frequent classes (streams have temporal locality). A share of
hits (``audit_rate``) is still sent to the cloud; when the cloud disagrees, the wrong center
is dropped and the right one learns the sample. The cache never answers for a class it has
not seen confirmed.

The end worker's use of it and the online benchmark are still to come; this module is the
data structure and its calibration.

Example::

    >>> cache = SemanticCache(sim_threshold=0.9, margin=0.05)
    >>> f = pooled_features([torch.randn(1, 8, 4, 4)])
    >>> cache.lookup(f).hit      # nothing confirmed yet
    False
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch


def pooled_features(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One normalized vector per sample: each tensor averaged over its spatial dims, joined."""
    parts = []
    for t in tensors:
        t = t.detach().float()
        if t.dim() > 2:
            t = t.flatten(2).mean(2)
        parts.append(t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1))
    v = torch.cat(parts, dim=1)
    return torch.nn.functional.normalize(v, dim=1).squeeze(0)


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
    total: torch.Tensor
    count: int
    score: float
    last: int

    @property
    def vector(self) -> torch.Tensor:
        return torch.nn.functional.normalize(self.total, dim=0)


class SemanticCache:
    """Label semantic centers with hit thresholds, bounded capacity and audits."""

    def __init__(self, sim_threshold: float = 0.95, margin: float = 0.05, capacity: int = 16,
                 audit_rate: float = 0.1, decay: float = 0.98, seed: int = 0) -> None:
        self.sim_threshold, self.margin = sim_threshold, margin
        self.capacity, self.audit_rate, self.decay = capacity, audit_rate, decay
        self.centers: dict[int, _Center] = {}
        self.rng = random.Random(seed)
        self.t = 0
        self.hits = self.lookups = self.corrections = self.evictions = 0

    def lookup(self, feat: torch.Tensor) -> Lookup:
        self.lookups += 1
        if not self.centers:
            return Lookup(None, None, 0.0, 0.0, False)
        labels = list(self.centers)
        sims = torch.stack([self.centers[c].vector for c in labels]) @ feat
        order = torch.argsort(sims, descending=True)
        top = float(sims[order[0]])
        second = float(sims[order[1]]) if len(labels) > 1 else -1.0
        best = labels[int(order[0])]
        hit = top >= self.sim_threshold and top - second >= self.margin
        if not hit:
            return Lookup(None, best, top, top - second, False)
        self.hits += 1
        return Lookup(best, best, top, top - second, True, self.rng.random() < self.audit_rate)

    def confirm(self, feat: torch.Tensor, label: int) -> None:
        """Learn from a label the cloud returned."""
        self.t += 1
        for c in self.centers.values():
            c.score *= self.decay
        c = self.centers.get(label)
        if c is None:
            if len(self.centers) >= self.capacity:
                victim = min(self.centers, key=lambda k: (self.centers[k].score, self.centers[k].last))
                del self.centers[victim]
                self.evictions += 1
            self.centers[label] = _Center(feat.clone(), 1, 1.0, self.t)
            return
        c.total += feat
        c.count += 1
        c.score += 1.0
        c.last = self.t

    def audit(self, feat: torch.Tensor, cached: int, cloud: int) -> bool:
        """Check a hit against the cloud; a disagreeing center is dropped and relearned.
        Returns whether the cache was right."""
        if cached == cloud:
            self.confirm(feat, cloud)
            return True
        self.corrections += 1
        self.centers.pop(cached, None)
        self.confirm(feat, cloud)
        return False

    @staticmethod
    def calibrate(feats: torch.Tensor, labels: torch.Tensor, budget: float,
                  sims: Sequence[float] = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99),
                  margins: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.15)) -> tuple[float, float, float]:
        """(sim_threshold, margin, hit rate) that maximize hits while the share of samples a
        hit would answer wrongly stays within ``budget``; centers from the same samples'
        labels (the cloud's answers on calibration data)."""
        classes = sorted(set(labels.tolist()))
        centers = torch.stack([torch.nn.functional.normalize(feats[labels == c].mean(0), dim=0)
                               for c in classes])
        s = feats @ centers.T
        top2 = s.topk(min(2, len(classes)), dim=1)
        top = top2.values[:, 0]
        margin = top - (top2.values[:, 1] if len(classes) > 1 else -1.0)
        pred = torch.tensor(classes)[top2.indices[:, 0]]
        wrong = pred != labels
        best = (1.0, 1.0, 0.0)
        for st in sims:
            for mg in margins:
                hit = (top >= st) & (margin >= mg)
                if (hit & wrong).float().mean().item() <= budget and hit.float().mean().item() > best[2]:
                    best = (st, mg, hit.float().mean().item())
        return best
