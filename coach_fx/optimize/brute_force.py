"""``brute-force``: every predecessor-closed set, each with its true minimum bits. For tests."""

from __future__ import annotations

from typing import Callable, Sequence

from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


def brute_force(p: Problem, limit: int = 200_000, allowed: Sequence[int] | None = None,
                keep: Callable[[frozenset[str]], bool] | None = None,
                strategy: str = "brute-force") -> Plan:
    """Best plan over every closed set (those ``keep`` accepts); raises past ``limit`` sets."""
    best: Plan | None = None
    for s in p.dag.closed_sets(limit):
        if keep is not None and not keep(s):
            continue
        best = better(best, p.resolve(s, strategy, allowed))
    if best is None:
        raise ValueError("brute-force: no plan meets the accuracy budget with the allowed bits")
    return best


from coach_fx.optimize import Strategy, register  # noqa: E402 - the registry imports this module

register(Strategy("brute-force", brute_force, codes=True, compared=False,
                  options=lambda settings: {"limit": settings.max_plans}))
