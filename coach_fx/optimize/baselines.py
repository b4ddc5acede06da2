"""The published partitioners, faithful to their papers (each minimizes latency):

* ``neurosurgeon`` (Kang et al., ASPLOS 2017): a chain view; cuts only where exactly one tensor
  crosses; float32 transfer.
* ``dads`` (Hu et al., INFOCOM 2019): minimum s-t cut of the DAG for latency; float32 transfer;
  each tensor paid once however many readers it has.
* ``qdmp`` (Zhang et al., IMWUT 2020): the same cut, searched block by block between
  articulation nodes (smaller flow problems, same optimum).

Each has a ``+int8`` variant sending 8 bits per crossing tensor, so that the gain of joint
partition-and-bits search is not confused with the gain of quantizing at all. Baselines do not
check the accuracy budget; ``coach_fx.compile`` measures and reports the accuracy of their plan.
"""

from __future__ import annotations

from dataclasses import replace

from coach_fx.optimize.candidates import candidate_sets
from coach_fx.optimize.mincut import min_cut_end_set
from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


def _latency_problem(p: Problem) -> Problem:
    return replace(p, objective="latency", oracle=None)


def neurosurgeon(p: Problem, bits: int = 32, name: str = "neurosurgeon") -> Plan:
    lp = _latency_problem(p)
    best: Plan | None = None
    for s in candidate_sets(p.dag, (bits,), exact_sets=True):
        plan = lp.price(s, bits, name)
        if len(plan.cut) <= 1:
            best = better(best, plan)
    assert best is not None  # end-only always qualifies
    return best


def dads(p: Problem, bits: int = 32, name: str = "dads") -> Plan:
    lp = _latency_problem(p)
    s = min_cut_end_set(lp, bits, lp.dag.nodes)
    return better(lp.price(lp.dag.nodes, bits, name), lp.price(s, bits, name))


def qdmp(p: Problem, bits: int = 32, name: str = "qdmp") -> Plan:
    lp = _latency_problem(p)
    dag = lp.dag
    bounds = [-1] + [dag.index[a] for a in dag.articulation_nodes()] + [len(dag.nodes)]
    best = lp.price(dag.nodes, bits, name)
    for j in range(len(bounds) - 1):
        prefix = dag.nodes[: bounds[j] + 1]
        block = dag.nodes[bounds[j] + 1: bounds[j + 1]]
        s = min_cut_end_set(lp, bits, block, prefix) if block else frozenset(prefix)
        best = better(best, lp.price(s, bits, name))
    return best


def int8(fn, name: str):  # noqa: ANN001, ANN201 - small adapter
    def run(p: Problem) -> Plan:
        return fn(p, bits=8, name=name)
    run.__name__ = name
    return run
