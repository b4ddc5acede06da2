"""Bandwidth bands: the rates to plan for, the plan each band runs, and the band edges (the
one home of the band rule; ``benchmarks/compare.py`` uses it too).

Example::

    >>> band_edges([1.0, 4.0, 16.0], [0, 0, 1])     # neighbouring bands with one plan merge
    ((8.0,), (0, 1))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from coach_fx.settings import Network

if TYPE_CHECKING:
    from coach_fx.online.analysis import CutAnalysis


def band_rates(network: Network, n: int = 5) -> list[float]:
    """Representative uplink rates to plan for: a trace's time-weighted quantiles (10 %..90 %),
    or the fixed rate × 1/4..4."""
    tr = network.trace
    if tr is None or not math.isfinite(tr.duration):
        return [network.uplink_mbps * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)][:n]
    return sorted({max(r, 1e-3) for r in tr.quantiles([(k + 0.5) / n for k in range(n)])})


def band_edges(rates: Sequence[float], band_ids: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """(edges, plans) for plans ``band_ids`` serving the increasing ``rates``: an edge at the
    geometric midpoint between two rates whose plans differ; neighbours with one plan merge."""
    edges, plans = [], [band_ids[0]]
    for (r0, r1), pid in zip(zip(rates, rates[1:]), band_ids[1:]):
        if pid != plans[-1]:
            edges.append(math.sqrt(r0 * r1))
            plans.append(pid)
    return tuple(edges), tuple(plans)


def choose_plans(cal: "CutAnalysis", offline: tuple, planned: dict[float, tuple],
                 rates: Sequence[float]) -> dict[bool, dict[float, tuple]]:
    """Per band rate, the end set with the shortest expected period: once as the cache will
    run (its hits take requests off the link and the cloud), once without it (the modes that
    run without the cache follow these). Candidates: the offline plan, the planner's plan per
    band and, with the cache, cloud-only and the single-tensor cuts whose end work alone is
    shorter than the slowest band's planned period (the others cannot win whatever their hit
    rate). A band leaves the offline plan only for a clear gain
    (``OnlineSettings.switch_gain``): a switch follows the estimate with a lag, and a plan a
    few percent better at the band's rate can lose that back."""
    dag, online = cal.dag, cal.settings.online
    candidates = {offline, *planned.values()}
    single = [(), *(tuple(v for v in dag.nodes if v in dag.ancestors([a])) for a in dag.articulation_nodes())]
    cal.measure([*candidates, *(single if online.cache else ())])
    if online.cache:
        slowest = max(cal.expected(planned[r], r, with_cache=False)[0] for r in rates)
        candidates |= {c for c in single if c not in candidates and cal.end_time(c) < slowest}
    chosen: dict[bool, dict[float, tuple]] = {}
    for with_cache in ([False, True] if online.cache else [False]):
        chosen[with_cache] = {}
        for r in rates:
            best = None
            for c in sorted(candidates, key=len):
                score = cal.expected(c, r, with_cache)
                if score is not None and (best is None or score < best[0]):
                    best = (score, c)
            c = best[1] if best else planned[r]
            base = cal.expected(offline, r, with_cache)
            if best is not None and base is not None and best[0][0] > online.switch_gain * base[0]:
                c = offline
            chosen[with_cache][r] = c
    return chosen


__all__ = ["band_edges", "band_rates", "choose_plans"]
