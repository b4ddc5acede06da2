"""The fixed strategies: ``manual`` (the caller's cut), ``end-only`` and ``cloud-only``."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

from coach_fx.optimize.problem import Problem
from coach_fx.plan import Plan, evaluate, plan_bits


def manual(p: Problem, end_nodes: Sequence[str] | None, bits: int | Mapping[str, int]) -> Plan:
    """The caller's end set and bits (an int for every crossing tensor, or name -> bits)."""
    if end_nodes is None:
        raise ValueError("strategy='manual' needs end_nodes=[...] (names from cm.dag.nodes)")
    s = p.dag.resolve(end_nodes)
    cut = p.dag.crossing(s) if p.dag.is_closed(s) else ()
    b = plan_bits(p.dag, cut, bits) if not isinstance(bits, Mapping) else dict(bits)
    plan = evaluate(p.dag, s, b, p.network, strategy="manual", objective=p.objective)
    ignored = p.dag.ignored(end_nodes)
    if ignored:   # parameters and input-independent tensors: computed by whichever half reads them
        plan.extra["ignored_end_nodes"] = ignored
        warnings.warn(f"strategy='manual': {len(ignored)} of end_nodes name no DAG node (parameters or tensors "
                      f"that depend on no input, e.g. {ignored[:3]}): they are computed by whichever half "
                      "reads them, and were left out", stacklevel=4)
    return plan


def end_only(p: Problem) -> Plan:
    return p.price(p.dag.nodes, 32, "end-only")


def cloud_only(p: Problem) -> Plan:
    """Everything in the cloud; the raw input crosses at ``input_bits``."""
    return p.price((), 32, "cloud-only")


from coach_fx.optimize import Strategy, register  # noqa: E402 - the registry imports this module

register(Strategy("end-only", end_only, needs_oracle=False))
register(Strategy("cloud-only", cloud_only))
