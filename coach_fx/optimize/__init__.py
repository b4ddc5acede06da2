"""Offline optimizer: every strategy maps a ``Problem`` (LayerDAG + network + accuracy oracle)
to a ``Plan`` on the same DAG and the same cost model.

Example::

    >>> plan = solve("brute-force", Problem(dag, Network(10)))    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

from coach_fx.optimize.baselines import cloud_only_coded, dads, dads_dsh, int8, neurosurgeon, qdmp
from coach_fx.optimize.brute_force import brute_force
from coach_fx.optimize.coach import coach
from coach_fx.optimize.problem import Problem, better
from coach_fx.optimize.simple import cloud_only, end_only
from coach_fx.plan import Plan

STRATEGIES: dict[str, Callable[..., Plan]] = {
    "coach": coach,
    "neurosurgeon": neurosurgeon,
    "neurosurgeon+int8": int8(neurosurgeon, "neurosurgeon+int8"),
    "dads": dads,
    "dads+int8": int8(dads, "dads+int8"),
    "dads-dsh": dads_dsh,
    "dads-dsh+int8": int8(dads_dsh, "dads-dsh+int8"),
    "qdmp": qdmp,
    "qdmp+int8": int8(qdmp, "qdmp+int8"),
    "end-only": end_only,
    "cloud-only": cloud_only,
    "cloud-only+jpeg95": cloud_only_coded("jpeg95"),
    "cloud-only+jpeg90": cloud_only_coded("jpeg90"),
    "cloud-only+jpeg75": cloud_only_coded("jpeg75"),
    "cloud-only+png": cloud_only_coded("png"),
    "brute-force": brute_force,
}


def solve(strategy: str, problem: Problem, **kw) -> Plan:
    """Run one named strategy (see ``STRATEGIES``)."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                         f"{sorted(STRATEGIES) + ['manual']}") from None
    return fn(problem, **kw)


#: Strategies compared by ``coach plan --strategy all`` (brute-force and manual left out).
COMPARED = ("coach", "neurosurgeon", "neurosurgeon+int8", "dads", "dads+int8", "dads-dsh",
            "dads-dsh+int8", "qdmp", "qdmp+int8", "end-only", "cloud-only", "cloud-only+jpeg90",
            "cloud-only+png")

__all__ = ["Problem", "STRATEGIES", "COMPARED", "solve", "better", "brute_force", "coach"]
