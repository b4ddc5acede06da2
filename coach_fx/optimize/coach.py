"""``coach``: divide and conquer over the DAG, then bits chosen lazily (DESIGN.md §4).

1-2. :func:`coach_fx.optimize.candidates.divide` lists every end set worth pricing; a block
     too wide to list is left to an exact program (:class:`coach_fx.optimize.milp.WideBlock`)
     that yields its plans best-first.
3.   Each is priced optimistically (vectorized over all candidates at once): its end and cloud
     compute without quantization work and its link time with the cheapest allowed bits, a
     lower bound of any true price. Candidates are taken best-first; for each, the fewest bits
     that meet the accuracy budget are found by binary search over the bit list
     (``Problem.feasible_bits``, memoized by crossing set) and it is re-priced exactly. The
     search stops as soon as the best resolved plan is no worse than the next optimistic
     bound: few accuracy evaluations, exact answer.
4.   ``throughput`` minimizes the period, then latency; ``latency`` minimizes latency.

Example::

    >>> plan = coach(Problem(dag, Network(10), oracle=oracle))   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from typing import Any, Iterator

import numpy as np

from coach_fx.optimize.candidates import divide
from coach_fx.optimize.linear_price import LinearPrice
from coach_fx.optimize.milp import WideBlock
from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


def _masks_to_matrix(masks: list[int], n: int) -> np.ndarray:
    nbytes = (n + 7) // 8
    raw = np.frombuffer(b"".join(m.to_bytes(nbytes, "little") for m in masks), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(masks), nbytes), axis=1, bitorder="little")
    return bits[:, :n].astype(bool)


def optimistic_scores(p: Problem, masks: list[int],
                      lp: LinearPrice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(primary, secondary) objective lower bounds per candidate mask."""
    lp = lp or LinearPrice.optimistic(p)
    n = len(p.dag.nodes)
    m = _masks_to_matrix(masks, n)
    out = ~m
    readers = np.zeros((n, n), dtype=np.int32)          # readers[u, r]: r reads u
    for u, rs in enumerate(lp.readers):
        readers[u, list(rs)] = 1
    full = m.all(axis=1)
    outputs = np.zeros(n, dtype=bool)
    outputs[list(lp.outputs)] = True
    crosses = m & (((out.astype(np.int32) @ readers.T) > 0) | outputs[None, :]) & ~full[:, None]
    nbytes = crosses.astype(np.float64) @ lp.node.wire
    e = m.astype(np.float64) @ lp.node.t_end + crosses @ lp.node.cross_end
    c = out.astype(np.float64) @ lp.node.t_cloud + crosses @ lp.node.cross_cloud
    for rs, (opt, *more) in lp.inputs:
        assert not more, "vectorized scores take one way per input (LinearPrice.optimistic)"
        crossed = out[:, list(rs)].any(axis=1)
        nbytes += crossed * opt.nbytes
        e += crossed * opt.t_end
        c += crossed * opt.t_cloud
    live = ~full
    t_link = np.where(live, nbytes * lp.link.up_s_per_byte + lp.link.link_fixed, 0.0)
    c += np.where(live, lp.link.down, 0.0)
    latency = e + t_link + c
    period = np.maximum(np.maximum(e, t_link), c)
    return (latency, period) if p.objective == "latency" else (period, latency)


def _undominated(p: Problem) -> list[tuple[int, LinearPrice]]:
    """(width, exact price) for each width and tensor codec whose program could hold the
    optimum: one is left out when another costs no more for every plan and is at least as
    accurate (more bits, or no accuracy check at all)."""
    prices = [(w, LinearPrice.exact(p, w, tc)) for w in p.bits for tc in (None, *p.tensor_codecs)]
    kept: list[tuple[int, LinearPrice]] = []
    for k, (w, lp) in enumerate(prices):
        if not any(j != k and (p.oracle is None or w2 >= w) and lp2.no_dearer(lp)
                   and (not lp.no_dearer(lp2) or j < k) for j, (w2, lp2) in enumerate(prices)):
            kept.append((w, lp))
    return kept


class _Search:
    """Candidates best-first from every source: the listed end sets by their optimistic bound
    (each resolved over all widths), and per wide block, width and tensor codec the program's
    plans by their exact price (each only checked for accuracy at that width). A wide block's
    program starts only when its linear relaxation's bound is reached."""

    def __init__(self, p: Problem, block_limit: int, program_limit: int | None) -> None:
        division = divide(p.dag, p.bits, p.oracle is not None, block_limit, program_limit)
        self.masks = list(division.masks)
        first, second = optimistic_scores(p, self.masks)
        self.first, self.second = first, second
        self.order = np.lexsort((second, first))
        self.heap: list = []
        self.seq = itertools.count()
        if len(self.order):
            self._push(first[self.order[0]], second[self.order[0]], ("listed", 0))
        prices = _undominated(p) if division.wide else []
        for prefix, block in division.wide:
            # the optimistic price's relaxation bounds every program of the block
            bound = WideBlock(p, LinearPrice.optimistic(p), prefix, block).lower_bound()
            for w, lp in prices:
                self._push(bound, -np.inf, ("bound", WideBlock(p, lp, prefix, block), w))
        self.wide = len(division.wide)
        self.programs = len(prices) * len(division.wide)

    def _push(self, first: float, second: float, item: tuple) -> None:
        heapq.heappush(self.heap, (float(first), float(second), next(self.seq), item))

    def __iter__(self) -> Iterator[tuple[float, float, int, Any, int | None]]:
        """(first, second, mask, input codecs, width): width None means every width."""
        while self.heap:
            first, second, _, item = heapq.heappop(self.heap)
            if item[0] == "listed":
                j = item[1]
                if j + 1 < len(self.order):
                    k = self.order[j + 1]
                    self._push(self.first[k], self.second[k], ("listed", j + 1))
                yield first, second, self.masks[self.order[j]], None, None
                continue
            if item[0] == "bound":   # the shared bound reached: this program's own bound
                self._push(item[1].lower_bound(), -np.inf, ("start", *item[1:]))
                continue
            if item[0] == "start":
                # a bound, not a plan: the search stops here when the best plan is no worse
                yield first, second, -1, None, None
                it, w = iter(item[1]), item[2]
            else:
                _, it, w, found = item
                yield first, second, found.mask, found.codecs or None, w
            found = next(it, None)
            if found is not None:
                self._push(found.first, found.second, ("plan", it, w, found))


def coach(p: Problem, block_limit: int = 4096, program_limit: int | None = None,
          time_limit_s: float | None = None) -> Plan:
    """The exact optimum over every closed set and bit width within the accuracy budget.
    ``block_limit``: how many closed subsets of a block the divide step lists before it
    recurses into the block's branches; a block it cannot divide, or one with more than
    ``program_limit`` plans listed, is solved by the program (``optimize.milp``).
    ``time_limit_s``: past it, the best plan found so far is returned, marked unproven
    (``plan.extra["proven"]`` False, with the gap to the bound still open)."""
    search = _Search(p, block_limit, program_limit)
    names = p.dag.nodes
    best: Plan | None = None
    resolved = 0
    seen: set[tuple] = set()
    slack = 1e-12   # float sums in another order: do not stop on a rounding difference
    started = time.perf_counter()
    proven, gap = True, 0.0
    for first, second, mask, codecs, width in search:
        if best is not None and best.score[0] <= first * (1 - slack) or (
                best is not None and best.score[0] <= first and best.score[1] <= second):
            break
        if best is not None and time_limit_s is not None and time.perf_counter() - started > time_limit_s:
            proven, gap = False, 1 - first / best.score[0]
            break
        if mask < 0 or (mask, width, codecs and tuple(sorted(codecs.items()))) in seen:
            continue
        seen.add((mask, width, codecs and tuple(sorted(codecs.items()))))
        s = frozenset(names[i] for i in range(len(names)) if mask >> i & 1)
        if width is not None:   # a program's plan: exact at this width, if accurate enough
            b = p.feasible_bits(s, None, codecs)
            if b is not None and b <= width:
                best = better(best, p.price(s, width, "coach", codecs))
            resolved += 1
            continue
        # only bit widths that could still beat the best plan are worth an accuracy check
        options = p.input_options(s)
        allowed = [b for b in p.bits if best is None or any(
            p.price(s, b, "coach", c).score < best.score for c in options)]
        if not allowed:
            continue
        resolved += 1
        best = better(best, p.resolve(s, "coach", allowed))
    if best is None:
        raise ValueError("coach: no plan meets the accuracy budget with the allowed bits "
                         f"{p.bits}; raise accuracy_budget or allow more bits")
    extra = {"candidates": len(search.masks), "wide_blocks": search.wide, "programs": search.programs,
             "resolved": resolved}
    if not proven:
        extra.update(proven=False, gap=gap)
    return dataclasses.replace(best, extra={**best.extra, **extra})


def _options(settings: Any) -> dict:
    return {"time_limit_s": settings.max_search_s}


from coach_fx.optimize import Strategy, register  # noqa: E402 - the registry imports this module

register(Strategy("coach", coach, codes=True, options=_options, trace_aware=True))
