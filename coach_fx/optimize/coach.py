"""``coach``: divide and conquer over the DAG, then bits chosen lazily (DESIGN.md §4).

1-2. :func:`coach_fx.optimize.candidates.candidate_sets` gives every end set worth pricing.
3.   Each is priced optimistically: its end and cloud compute without quantization work and its
     link time with the cheapest allowed bits, a lower bound of any true price. Candidates are
     taken best-first; for each, the fewest bits that meet the accuracy budget are found by
     binary search over the bit list (``Problem.feasible_bits``, memoized by crossing set) and
     it is re-priced. The search stops as soon as the best resolved plan is no worse than the
     next optimistic bound: few accuracy evaluations, exact answer.
4.   ``throughput`` minimizes the period, then latency; ``latency`` minimizes latency.

Example::

    >>> plan = coach(Problem(dag, Network(10), oracle=oracle))   # doctest: +SKIP
"""

from __future__ import annotations

import heapq

from coach_fx.optimize.candidates import candidate_sets
from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


def _optimistic(p: Problem, s: frozenset[str]) -> tuple[float, float]:
    plan = p.price(s, p.bits[0], "coach")
    q_end, q_cloud = p.dag.quant_s_per_elem
    qn = sum(p.dag.info[x].numel for x in plan.cut if p.dag.info[x].quantizable)
    plan.t_end -= q_end * qn       # 32 bits would need no quantization at all
    plan.t_cloud -= q_cloud * qn
    return plan.score


def coach(p: Problem, block_limit: int = 4096) -> Plan:
    """The exact optimum over every closed set and bit width within the accuracy budget."""
    heap = []
    for k, s in enumerate(candidate_sets(p.dag, p.bits, exact_sets=p.oracle is not None,
                                         block_limit=block_limit)):
        heap.append((_optimistic(p, s), k, s))
    heapq.heapify(heap)
    best: Plan | None = None
    considered = len(heap)
    resolved = 0
    while heap:
        bound, _, s = heapq.heappop(heap)
        if best is not None and best.score <= bound:
            break
        resolved += 1
        best = better(best, p.resolve(s, "coach"))
    if best is None:
        raise ValueError("coach: no plan meets the accuracy budget with the allowed bits "
                         f"{p.bits}; raise accuracy_budget or allow more bits")
    best.extra.update(candidates=considered, resolved=resolved)
    return best
