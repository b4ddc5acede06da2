"""Offline calibration of the semantic cache: hit thresholds tuned on replayed calibration
streams with temporal locality, and similarity bands whose samples stay safe with fewer bits.
The runtime's cache (``coach_fx.runtime.cache``) only looks up; this decides its settings.

The calibration streams come from ``coach_fx.zoo.streams.locality_stream``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from coach_fx.online.cache_replay import Replays, Stops, replay_many
from coach_fx.runtime.cache import SemanticCache
from coach_fx.runtime.features import vec_rows
from coach_fx.online_settings import OnlineSettings


def replay(cache: SemanticCache, feats: torch.Tensor, labels: torch.Tensor, stream: Sequence[int],
           lag: int = 0) -> tuple[int, int]:
    """Run ``stream`` (sample indices) through this cache as the end worker would: misses
    and audits learn the label ``lag`` requests later (when the cloud's answer is back);
    returns (hits, wrong hits)."""
    hits = wrong = 0
    feats = vec_rows(feats)
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    pending: deque[tuple[int, int, np.ndarray, int, int | None]] = deque()
    for t, i in enumerate(stream):
        while pending and pending[0][0] <= t:
            _, seq, f0, y0, cached = pending.popleft()
            if cached is None:
                cache.confirm(f0, y0, seq)
            else:
                cache.audit(f0, cached, y0, seq)
        f, y = feats[i], int(labels[i])
        r = cache.lookup(f, t)
        if r.hit:
            hits += 1
            wrong += r.label != y
            if r.audit:
                pending.append((t + lag, t, f, y, r.label))
        else:
            pending.append((t + lag, t, f, y, None))
    return hits, wrong


@dataclasses.dataclass(frozen=True)
class Tuned:
    """The thresholds found for one feature set (``grid``: its index) and context."""

    sim: float
    margin: float
    rate: float      # hits over the frames of every stream (0: no thresholds pass)
    grid: int
    context: bool


@dataclasses.dataclass(frozen=True)
class ThresholdSearch:
    """The search for a semantic cache's hit thresholds: per feature set and context, the
    (similarity, margin) among ``sims`` x ``margins`` that maximize hits on replayed calibration
    streams while wrong hits stay within ``budget`` of the frames of *every* stream; one replay
    of every candidate at once (``cache_replay.replay_many``). A feature set and context whose
    hit rate on the streams' first quarter is well below the best one's there is not replayed
    in full (its result: rate 0).

    Per margin the thresholds are tried strictest first and the search stops at the first that
    fails (looser ones only add wrong hits): a failing replay stops its looser ones with it.

    The replay learns each answer ``lag`` requests late, as the pipeline does: most wrong
    hits fall in the frames after a class change, before the cloud's first answers for the
    new class are back (a replay that learns at once saw a third of the wrong hits that
    the pipeline made with the same thresholds). A context: calibrate a cache that answers
    only for the latest known answer's class (see :class:`SemanticCache`).

    Replaying streams through a cache of the deployed capacity matters: with few classes
    cached the top-1/top-2 margin is taken among them only, so a sample of an uncached
    class can look confident; calibrating with every class's center present would not see
    those wrong hits. Give streams drawn from disjoint parts of the calibration data:
    thresholds that pass on each are less fitted to the few samples a stream repeats.
    Besides the budget (one wrong hit more than seen must still fit), at most
    ``max_hit_error`` of the hits may be wrong: features that tell classes apart poorly
    should not answer at all.

    Example::

        >>> found = ThresholdSearch(budget=0.005, capacity=8).tune([feats], labels, streams)  # doctest: +SKIP
    """

    budget: float
    capacity: int = 16
    audit_rate: float = 0.1
    max_hit_error: float = 0.01
    sims: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
    margins: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2)
    lag: int = OnlineSettings().result_lag

    def tune(self, features: Sequence[torch.Tensor], labels: torch.Tensor, streams: Sequence[Sequence[int]],
             contexts: Sequence[bool] = (False,)) -> list[Tuned]:
        """Per feature set and context (in that order), what the search found; ``labels``:
        the cloud's answers, ``streams``: sample indices, of one length."""
        runs = [list(s) for s in streams]     # of one length: the replay runs them side by side
        cases = [(g, c) for g in range(len(features)) for c in contexts]
        # Screen the (feature set, context) cases on the streams' first quarter, then replay in
        # full only those within ``SCREEN_KEEP`` of the best one's hit rate there: the rest
        # cannot be the one that hits most (a case's hit rate settles within the first few
        # hundred frames; its wrong hits are what the whole streams are for).
        prefix = len(runs[0]) // 4
        if len(cases) > 1 and prefix >= SCREEN_MIN_FRAMES:
            first = self._run(features, labels, [r[:prefix] for r in runs], cases)
            top = max(t.rate for t in first)
            if top > 0:
                cases = [(t.grid, t.context) for t in first if t.rate >= SCREEN_KEEP * top]
        found = {(t.grid, t.context): t for t in self._run(features, labels, runs, cases)}
        return [found.get((g, c), Tuned(1.0, 1.0, 0.0, g, c)) for g in range(len(features)) for c in contexts]

    def _run(self, features: Sequence[torch.Tensor], labels: torch.Tensor, runs: list[list[int]],
             cases: list[tuple[int, bool]]) -> list[Tuned]:
        strict = sorted(self.sims, reverse=True)
        rows, limit, group, rank = [], [], [], []
        for case, (g, c) in enumerate(cases):
            for m, mg in enumerate(self.margins):
                for r, st in enumerate(strict):
                    for k, stream in enumerate(runs):
                        rows.append((k, st, mg, c, g))
                        limit.append(self.budget * len(stream))
                        group.append(case * len(self.margins) + m)
                        rank.append(r)
        got = replay_many(features, labels, Replays.of(runs, rows, Stops(np.asarray(limit), np.asarray(group),
                                                                         np.asarray(rank))),
                          self.capacity, self.audit_rate, self.lag)
        total = sum(len(s) for s in runs)
        out, k = [], 0
        for g, c in cases:
            best = (1.0, 1.0, 0.0)
            for mg in self.margins:
                stopped = False
                for st in strict:
                    part = slice(k, k + len(runs))
                    k += len(runs)
                    stopped = stopped or bool(got.failed[part].any())
                    hits, wrong = int(got.hits[part].sum()), int(got.wrong[part].sum())
                    if not stopped and wrong + 1 <= self.max_hit_error * hits and hits / total > best[2]:
                        best = (st, mg, hits / total)
            out.append(Tuned(*best, grid=g, context=c))
        return out


#: the screening of ``ThresholdSearch.tune``: its shortest first quarter, and the share of the
#: best screened hit rate that a case needs to be replayed in full
SCREEN_MIN_FRAMES = 250
SCREEN_KEEP = 0.95


def tune_thresholds(feats: torch.Tensor, labels: torch.Tensor, streams: Sequence[Sequence[int]],
                    budget: float, capacity: int = 16, audit_rate: float = 0.1, *,
                    context: bool = False, **search: Any) -> tuple[float, float, float]:
    """(sim_threshold, margin, hit rate) for one feature set (``ThresholdSearch``)."""
    t = ThresholdSearch(budget, capacity, audit_rate, **search).tune([feats], labels, streams, (context,))[0]
    return t.sim, t.margin, t.rate


def safe_floor(disagreement: dict[int, float], budget: float, below: int = 33) -> int | None:
    """The fewest bits (among ``disagreement``'s widths under ``below``) that keep ``budget``
    with room to spare: that width and every wider one pass, and so does the next narrower
    width (the narrowest: at half the budget). None where no width is safe.

    Why the room: a width just above the cliff where answers start to flip has a flip rate
    on unseen data that a few hundred calibration samples cannot pin down (one flip more or
    less is the budget); on the digits network the width that passed with none of 539
    calibration samples flipped 3 of 540 unseen ones, the next one none.
    """
    widths = sorted(w for w in disagreement if w < below)
    ok = {w: disagreement[w] <= budget for w in widths}
    for k, w in enumerate(widths):
        room = ok[widths[k - 1]] if k else disagreement[w] <= budget / 2
        if room and all(ok[v] for v in widths[k:]):
            return w
    return None


def similarity_bits(similarity: torch.Tensor, agrees: dict[int, torch.Tensor], min_bits: int,
                    budget: float, edges: Sequence[float] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8),
                    min_samples: int = 20) -> list[tuple[float, int]]:
    """Similarity bands -> bits below ``min_bits`` that stay safe in that band.

    ``similarity``: each calibration sample's top-1 similarity to the class centers;
    ``agrees[b]``: whether the cloud's answer with ``b`` bits equals the unquantized one,
    per sample. A band [edge, 1] gets the fewest bits below ``min_bits`` that are safe among
    its samples (``safe_floor``: every width up to ``min_bits`` passes, and the next narrower
    one too); returned as (edge, bits), highest edge first, only where there is one.
    """
    out: list[tuple[float, int]] = []
    for edge in sorted(edges, reverse=True):
        m = similarity >= edge
        if int(m.sum()) < min_samples:
            continue
        safe = safe_floor({b: 1.0 - a[m].float().mean().item() for b, a in agrees.items()}, budget,
                          below=min_bits)
        if safe is not None:
            out.append((edge, safe))
    return out


__all__ = ["ThresholdSearch", "Tuned", "replay", "safe_floor", "similarity_bits", "tune_thresholds"]
