"""Planning over a bandwidth trace: the plan COACH finds for the mean rate is not the best
plan for a rate that varies. Candidates from the trace's quantiles, scored over its rates
(throughput) or over arrival times (latency).

Example::

    >>> plan = plan_for_trace(problem, solve("coach", problem), input_bits=8)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from coach_fx.optimize import Problem, solve
from coach_fx.plan import Plan, evaluate


def varies(network: Any) -> bool:
    tr = network.trace
    return tr is not None and math.isfinite(tr.duration) and max(tr.mbps) > min(tr.mbps)


#: Time-weighted quantiles of a trace's rate that a plan for the trace is scored on.
TRACE_QUANTILES = tuple((k + 0.5) / 20 for k in range(20))
#: Start times, evenly spread over a trace, a single request's expected latency averages.
TRACE_STARTS = 100


def expected_latency(plan: Plan, network: Any) -> float:
    """A single request's latency averaged over ``TRACE_STARTS`` arrival times spread over the
    network's trace, its message crossing the trace as it varies (``Trace.finish_time``)."""
    tr = network.trace
    if tr is None or not math.isfinite(tr.duration) or plan.bytes_sent == 0:
        return plan.latency
    fixed = plan.latency - plan.t_link + network.rtt_ms / 2e3
    nbytes = plan.bytes_sent / network.efficiency
    starts = [tr.duration * i / TRACE_STARTS + plan.t_end for i in range(TRACE_STARTS)]
    return fixed + sum(tr.finish_time(t, nbytes) - t for t in starts) / len(starts)


def plan_for_trace(problem: Problem, plan: Plan, input_bits: int) -> Plan:
    """Over a trace, the plan that does best across its rates.

    The plan for the mean rate is not the best plan for a rate that varies: throughput over
    time averages 1 / period over the trace (not 1 / the period at the mean rate), and a single
    request's expected latency averages its latency over arrival times (transfer time goes with
    1 / rate, so the slow stretches dominate it; see :func:`expected_latency`). The candidates
    are the plans COACH finds for the trace's quantiles (10 %..90 %); each is scored on 20
    time-weighted quantiles of the rate (throughput) or on ``TRACE_STARTS`` arrival times
    (latency), and priced at the mean as usual.
    """
    net = problem.network
    rates = [max(r, 1e-3) for r in net.trace.quantiles(TRACE_QUANTILES)]
    cands = {(plan.end_nodes, tuple(sorted(plan.codecs.items())), plan.tensor_codec): plan}
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        r = max(net.trace.quantiles([q])[0], 1e-3)
        sub = dataclasses.replace(problem, network=dataclasses.replace(net, uplink_mbps=r))
        p = solve("coach", sub)
        cands.setdefault((p.end_nodes, tuple(sorted(p.codecs.items())), p.tensor_codec), p)

    def cost(p: Plan) -> float:
        if plan.objective == "latency":
            return expected_latency(evaluate(problem.dag, p.end_nodes, p.bits, net, objective="latency",
                                             input_bits=input_bits, codecs=p.codecs,
                                             tensor_codec=p.tensor_codec), net)
        at = [evaluate(problem.dag, p.end_nodes, p.bits, dataclasses.replace(net, uplink_mbps=r),
                       objective=plan.objective, input_bits=input_bits, codecs=p.codecs,
                                             tensor_codec=p.tensor_codec)
              for r in rates]
        return -sum(1.0 / e.period for e in at) / len(at)

    best = min(cands.values(), key=cost)
    if best is plan:
        return plan
    out = evaluate(problem.dag, best.end_nodes, best.bits, net, strategy=plan.strategy,
                   objective=plan.objective, input_bits=input_bits, codecs=best.codecs,
                   tensor_codec=best.tensor_codec)
    return dataclasses.replace(out, extra={**out.extra, "for_trace": f"best of {len(cands)} plans "
                                                                      "for the trace's rate quantiles"})


__all__ = ["TRACE_QUANTILES", "TRACE_STARTS", "expected_latency", "plan_for_trace", "varies"]
