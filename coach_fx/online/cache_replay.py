"""Many semantic caches replayed at once: the calibration's threshold search, vectorized.

``cache_calibration.replay`` runs one stream through one :class:`~coach_fx.runtime.cache.SemanticCache`,
a frame at a time in Python. Tuning the thresholds replays the same streams through a cache per
(threshold pair, context, feature grid, stream): thousands of replays per cut, which took most
of ``compile_online``'s minutes. Here every such cache is a row of a few arrays and each frame
is one step for all of them, with the same rules as the cache (lookup, hit thresholds, context,
audits drawn from the same seeded stream, answers learned ``lag`` requests late, capacity
with eviction by decayed score, a wrong audit dropping its center).

Similarities come from the Gram matrix of the normalized features: a center is the sum of the
unit features confirmed into it, so its dot product with every sample is a row that a confirm
updates by adding one Gram row; a lookup reads one entry per center. The cost no longer depends
on the feature size. Caches whose result is settled (their wrong hits already break the budget:
``Stops``) leave the arrays as they fail.

Example::

    >>> feats = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    >>> labels = torch.arange(4).repeat(5)
    >>> r = replay_many([feats], labels, Replays.every([list(range(20))], [0.9], [0.0]), capacity=4)
    >>> r.hits.shape
    (1,)
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np
import torch

from coach_fx.runtime.features import vec_rows

#: rows of dead caches tolerated before the arrays are compacted (a copy costs a few frames)
_COMPACT_SHARE = 0.05
_COMPACT_EVERY = 16


@dataclasses.dataclass
class Stops:
    """When replays stop: once a cache's wrong hits break its ``limit`` (``wrong + 1 >
    limit``), it fails, and so does every cache of its ``group`` with a ``rank`` at or above its
    own (the threshold search reads no result of a looser threshold after a failing one)."""

    limit: np.ndarray              # (caches,) inf: never
    group: np.ndarray              # (caches,)
    rank: np.ndarray               # (caches,)

    @classmethod
    def never(cls, n: int) -> "Stops":
        return cls(np.full(n, np.inf), np.arange(n), np.zeros(n, dtype=np.int64))


@dataclasses.dataclass
class Replays:
    """One cache per row: its stream, its settings and when it stops (``Stops``)."""

    table: np.ndarray              # (streams, frames) sample indices
    stream: np.ndarray             # (caches,) which stream (row of ``table``)
    sim: np.ndarray                # (caches,) similarity threshold
    margin: np.ndarray             # (caches,) top-1/top-2 margin
    context: np.ndarray            # (caches,) bool: hits only for the latest known answer's class
    grid: np.ndarray               # (caches,) which feature set (index into ``replay_many``'s)
    stops: Stops

    @classmethod
    def every(cls, streams: Sequence[Sequence[int]], sims: Sequence[float], margins: Sequence[float],
              contexts: Sequence[bool] = (False,), grids: int = 1) -> "Replays":
        """Every (grid, context, margin, similarity, stream), never stopping."""
        rows = [(s, st, mg, c, g) for g in range(grids) for c in contexts for mg in margins
                for st in sims for s in range(len(streams))]
        return cls.of(streams, rows, Stops.never(len(rows)))

    @classmethod
    def of(cls, streams: Sequence[Sequence[int]], rows: Sequence[tuple], stops: Stops) -> "Replays":
        """``rows``: (stream index, similarity, margin, context, grid) per cache."""
        length = max(len(s) for s in streams)
        if any(len(s) != length for s in streams):
            raise ValueError("replay_many needs streams of one length")
        table = np.asarray([list(s) for s in streams], dtype=np.int64)
        return cls(table, np.asarray([r[0] for r in rows], dtype=np.int64),
                   np.asarray([r[1] for r in rows], dtype=np.float64),
                   np.asarray([r[2] for r in rows], dtype=np.float64),
                   np.asarray([bool(r[3]) for r in rows]), np.asarray([r[4] for r in rows], dtype=np.int64),
                   Stops(np.asarray(stops.limit, dtype=np.float64), np.asarray(stops.group, dtype=np.int64),
                         np.asarray(stops.rank, dtype=np.int64)))


@dataclasses.dataclass
class Replayed:
    """Per cache: hits and wrong hits over its stream (where ``failed``: up to where it broke
    its limit, which the counts already show)."""

    hits: np.ndarray
    wrong: np.ndarray
    failed: np.ndarray


def replay_many(features: Sequence[torch.Tensor | np.ndarray], labels: torch.Tensor | Sequence[int],
                replays: Replays, capacity: int = 16, audit_rate: float = 0.1, lag: int = 0,
                decay: float = 0.98, seed: int = 0) -> Replayed:
    """Replay every row of ``replays`` through its own fresh ``SemanticCache(sim, margin,
    capacity, audit_rate, decay, seed, context)`` on ``features[grid]``, as
    ``cache_calibration.replay`` does one; returns the hits and wrong hits of each."""
    labels_np = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else list(labels), dtype=np.int64)
    n_all = len(replays.sim)
    out = Replayed(np.zeros(n_all, dtype=np.int64), np.zeros(n_all, dtype=np.int64), np.zeros(n_all, dtype=bool))
    if n_all == 0:
        return out
    frames = replays.table.shape[1]
    grams, local = _local_grams(features, replays.table)
    # every cache draws its audits from ``random.Random(seed)``, one draw per hit
    rng = random.Random(seed)
    audits = np.asarray([rng.random() < audit_rate for _ in range(frames + 1)])
    delay = max(lag, 1)     # a miss's answer is learned ``lag`` requests later (at the next, for 0)
    s = _State(replays, out, capacity, grams, local, labels_np, delay)
    for t in range(frames):
        if t >= delay:
            s.learn(t - delay, decay)
        s.lookup(t, audits)
        s.settle()
        if t % _COMPACT_EVERY == 0:
            s.compact()
    s.flush()
    return out


def _local_grams(features: Sequence[torch.Tensor | np.ndarray], table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (feature set, stream), the dot products of the unit features (a zero feature stays
    zero, as in the cache) of the samples that stream shows: a cache only ever needs those
    (calibration streams come from disjoint halves of the data). Returns the blocks
    (``grid * streams + stream``, m, m) and each stream's frames as indices into its block."""
    samples = [np.unique(row) for row in table]
    local = np.stack([np.searchsorted(u, row) for u, row in zip(samples, table)])
    m = max(len(u) for u in samples)
    grams = np.zeros((len(features) * len(table), m, m), dtype=np.float32)
    for g, feats in enumerate(features):
        f = vec_rows(feats).reshape(len(feats), -1)
        f = f / np.maximum(np.sqrt((f * f).sum(1, keepdims=True)), 1e-12)
        for k, u in enumerate(samples):
            grams[g * len(table) + k, :len(u), :len(u)] = f[u] @ f[u].T
    return grams, local


class _State:
    """The live caches' state, one row each (``ids``: their rows in ``Replays``). Per-cache
    constants are kept gathered for the live rows, streams frame-major: each frame reads
    contiguous rows."""

    def __init__(self, r: Replays, out: Replayed, capacity: int, grams: np.ndarray, local: np.ndarray,
                 labels: np.ndarray, delay: int) -> None:
        c, m = len(r.sim), grams.shape[1]
        self.r, self.out, self.slots, self.m = r, out, capacity, m
        self.ids = np.arange(c)
        # per frame, per cache: the sample (an index into its Gram block) and its answer
        self.at = np.ascontiguousarray(local[r.stream].T)
        self.answer = np.ascontiguousarray(labels[r.table][r.stream].T)
        self.sim, self.margin, self.context, self.limit = r.sim, r.margin, r.context, r.stops.limit
        self.block = (r.grid * len(r.table) + r.stream) * m     # the row of its Gram block's first sample
        self.grams = grams.reshape(-1, m)
        self.label = np.full((c, capacity), -1, dtype=np.int64)   # a center's class, -1: empty slot
        self.score = np.zeros((c, capacity))                       # frequency decayed with age
        self.last = np.zeros((c, capacity), dtype=np.int64)        # when last confirmed
        #: per center (row ``cache * slots + slot``), its sum of unit features . each sample of
        #: its stream; its squared norm and 1 / its norm
        self.dots = np.zeros((c * capacity, m), dtype=np.float32)
        self.norm2 = np.zeros((c, capacity))
        self.inv = np.zeros((c, capacity))
        self.seen_seq = np.full(c, -1, dtype=np.int64)     # the latest known answer: its request
        self.seen = np.full(c, -1, dtype=np.int64)         # and its class (-1: none yet)
        self.confirms = np.zeros(c, dtype=np.int64)
        self.drawn = np.zeros(c, dtype=np.int64)           # hits so far: the next audit draw
        self.hits = np.zeros(c, dtype=np.int64)
        self.wrong = np.zeros(c, dtype=np.int64)
        self.kind = np.zeros((delay, c), dtype=np.int8)    # per frame on its way: 0, 1 confirm, 2 audit
        self.cached = np.zeros((delay, c), dtype=np.int64)  # an audited hit's answer

    def learn(self, frame: int, decay: float) -> None:
        """The answers of ``frame`` arrive: misses confirm, audits confirm or correct."""
        slot = frame % len(self.kind)
        kind, cached = self.kind[slot], self.cached[slot]
        j, y = self.at[frame], self.answer[frame]
        bad = np.nonzero((kind == 2) & (cached != y))[0]
        if len(bad):      # a wrong audit: that center goes, the right one learns the sample
            self.label[bad] = np.where(self.label[bad] == cached[bad, None], -1, self.label[bad])
        rows = np.nonzero(kind)[0]
        if not len(rows):
            return
        j, y = j[rows], y[rows]
        newer = rows[self.seen_seq[rows] <= frame]
        self.seen_seq[newer] = frame
        self.seen[newer] = self.answer[frame, newer]
        self.confirms[rows] += 1
        self.score[rows] *= decay
        has = self.label[rows] == y[:, None]
        old = has.any(1)
        s = np.where(old, has.argmax(1), 0)
        new = np.nonzero(~old)[0]
        if len(new):
            s[new] = self._free_or_victim(rows[new])
            self.label[rows[new], s[new]] = y[new]
            self.dots[rows[new] * self.slots + s[new]] = 0.0
        flat = rows * self.slots + s
        g = self.block[rows] + j
        # |sum + f|^2 = |sum|^2 + 2 sum.f + f.f, with sum.f read before the update
        before = self.dots[flat, j].astype(np.float64)
        f2 = self.grams[g, j].astype(np.float64)
        self.norm2[rows, s] = np.where(old, self.norm2[rows, s] + 2 * before, 0.0) + f2
        self.inv[rows, s] = 1.0 / np.maximum(np.sqrt(self.norm2[rows, s]), 1e-12)
        self.dots[flat] += self.grams[g]
        self.score[rows, s] = np.where(old, self.score[rows, s] + 1.0, 1.0)
        self.last[rows, s] = self.confirms[rows]

    def _free_or_victim(self, rows: np.ndarray) -> np.ndarray:
        """Per cache, the slot a new center takes: the first empty one, else the center with
        the lowest score (the earliest confirmed among equals) goes."""
        label, score, last = self.label[rows], self.score[rows], self.last[rows]
        empty = label < 0
        low = score == score.min(1, keepdims=True)
        victim = np.where(low, last, np.iinfo(np.int64).max).argmin(1)
        return np.where(empty.any(1), empty.argmax(1), victim)

    def lookup(self, t: int, audits: np.ndarray) -> None:
        """Frame ``t`` looks up in every cache; hits and misses queue what they will learn."""
        c = np.arange(len(self.ids))
        i = self.at[t]
        present = self.label >= 0
        d = self.dots.reshape(len(c), self.slots, self.m)[c, :, i]
        sims = np.where(present, d * self.inv, -np.inf)
        k = sims.argmax(1)
        top = sims[c, k]
        sims[c, k] = -np.inf
        second = sims.max(1)
        second[second == -np.inf] = -1.0        # one center: the margin is from -1
        best = self.label[c, k]
        hit = (top >= self.sim) & (top - second >= self.margin) & (~self.context | (self.seen == best))
        hit &= present.any(1)
        h = np.nonzero(hit)[0]
        self.seen_seq[h] = t
        self.seen[h] = best[h]
        audit = np.zeros(len(c), dtype=bool)
        audit[h] = audits[self.drawn[h]]
        self.drawn[h] += 1
        self.hits += hit
        self.wrong += hit & (best != self.answer[t])
        slot = t % len(self.kind)
        self.kind[slot] = np.where(hit, np.where(audit, 2, 0), 1)
        self.cached[slot] = best

    def settle(self) -> None:
        """Caches whose wrong hits broke their limit fail, with the looser ones of their group."""
        broke = (self.wrong + 1 > self.limit) & ~self.out.failed[self.ids]
        if not broke.any():
            return
        self.flush()
        for row in self.ids[broke]:
            stops = self.r.stops
            self.out.failed |= (stops.group == stops.group[row]) & (stops.rank >= stops.rank[row])

    def flush(self) -> None:
        self.out.hits[self.ids], self.out.wrong[self.ids] = self.hits, self.wrong

    def compact(self) -> None:
        """Drop the rows of failed caches (their counts are flushed) once they are a few."""
        keep = ~self.out.failed[self.ids]
        if keep.mean() > 1 - _COMPACT_SHARE:
            return
        self.flush()
        for name in ("ids", "sim", "margin", "context", "limit", "block", "label", "score", "last", "norm2", "inv",
                     "seen_seq", "seen", "confirms", "drawn", "hits", "wrong"):
            setattr(self, name, getattr(self, name)[keep])
        for name in ("at", "answer", "kind", "cached"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[:, keep]))
        self.dots = self.dots.reshape(-1, self.slots, self.m)[keep].reshape(-1, self.m)


__all__ = ["Replayed", "Replays", "Stops", "replay_many"]
