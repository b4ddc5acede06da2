"""The planning problem every strategy solves: one DAG, one network, one accuracy oracle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from coach_fx.dag import LayerDAG
from coach_fx.plan import Plan, evaluate, plan_bits, usable_codecs
from coach_fx.settings import DEFAULT_BITS, Network


class Oracle(Protocol):
    """Accuracy oracle (``coach_fx.accuracy.AccuracyOracle`` or a stand-in in tests)."""

    def min_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None,
                 codecs: Mapping[str, str] | None = None) -> int | None: ...

    def ok(self, end_nodes: Iterable[str], bits: dict[str, int],
           codecs: Mapping[str, str] | None = None) -> bool: ...


@dataclass
class Problem:
    """A DAG priced on ``network``; ``oracle=None`` means every allowed bit width is accurate
    enough (the cheapest allowed is then always chosen). ``codecs``: image codecs a crossing
    model input may use besides raw ``input_bits`` (those the DAG has costs for);
    ``tensor_codecs``: lossless codecs the quantized crossings may use (lossless: they change
    the price, never the accuracy, so each plan is priced with and without them)."""

    dag: LayerDAG
    network: Network
    objective: str = "throughput"
    bits: Sequence[int] = DEFAULT_BITS
    input_bits: int = 8
    oracle: Oracle | None = None
    codecs: Sequence[str] = ()
    tensor_codecs: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits)))
        self.codecs = tuple(self.codecs)
        self.tensor_codecs = tuple(c for c in self.tensor_codecs if c in self.dag.tensor_codecs)

    def price(self, end_nodes: Iterable[str], bits: int | Mapping[str, int], strategy: str,
              codec: str | None = None) -> Plan:
        """The plan for this end set at ``bits`` (one width for every quantized crossing, or
        crossing -> width) and input ``codec``, with the better of no tensor codec and each of
        ``tensor_codecs``."""
        s = frozenset(end_nodes)
        cut = self.dag.crossing(s)
        b = plan_bits(self.dag, cut, bits, self.input_bits)
        best = None
        for tc in (None, *self.tensor_codecs):
            best = better(best, evaluate(self.dag, s, b, self.network, strategy=strategy,
                                         objective=self.objective, codecs=codec, tensor_codec=tc))
        return best

    def input_options(self, end_nodes: Iterable[str]) -> list[str | None]:
        """How the crossing model inputs may travel: raw (None) and each usable codec."""
        cut = self.dag.crossing(frozenset(end_nodes))
        return [None] + [c for c in self.codecs if usable_codecs(self.dag, cut, c)]

    def feasible_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None,
                      codec: str | None = None) -> int | None:
        """Fewest allowed bits that keep the accuracy budget (None: none does)."""
        allowed = tuple(sorted(allowed or self.bits))
        if self.oracle is None:
            return allowed[0]
        s = frozenset(end_nodes)
        coded = usable_codecs(self.dag, self.dag.crossing(s), codec)
        if coded:
            return self.oracle.min_bits(s, allowed, coded)
        return self.oracle.min_bits(s, allowed)

    def resolve(self, end_nodes: Iterable[str], strategy: str,
                allowed: Sequence[int] | None = None) -> Plan | None:
        """The best plan for this end set over the bit widths (and, where the model's input
        crosses, the input codecs) that meet the budget; None if none.

        Accuracy is monotone in bits, so the feasible widths are those from the fewest that
        pass; the cheapest of them is usually the fewest, but not always: a tensor sent as is
        (32) needs no quantize/pack work, which can outweigh its extra bytes on a fast link.
        """
        best = None
        for codec in self.input_options(end_nodes):
            b = self.feasible_bits(end_nodes, allowed, codec)
            if b is None:
                continue
            for w in sorted(allowed or self.bits):
                if w >= b:
                    best = better(best, self.price(end_nodes, w, strategy, codec))
        return best


def per_tensor_bits(p: Problem, plan: Plan) -> Plan:
    """``plan`` with a width per crossing tensor where that is cheaper: greedily, the tensor
    with the most bytes first, one allowed width lower while the plan gets cheaper and the
    budget holds (accuracy is checked for the whole plan each time). The search over cuts and
    one width per plan is exact; this step after it only improves on its answer, it does not
    search the (exponential) space of per-tensor widths."""
    dag = p.dag
    free = [x for x in plan.cut if dag.info[x].quantizable and x not in dag.inputs and x not in plan.codecs]
    if p.oracle is None or len(free) < 2:
        return plan
    best, codec = plan, next(iter(plan.codecs.values()), None)
    improved = True
    while improved:
        improved = False
        for x in sorted(free, key=lambda v: -dag.info[v].numel * best.bits[v]):
            lower = [w for w in p.bits if w < best.bits[x]]
            if not lower:
                continue
            trial = p.price(best.end_nodes, {**best.bits, x: lower[-1]}, best.strategy, codec)
            if trial.score < best.score and p.oracle.ok(best.end_nodes, trial.bits, trial.codecs):
                best, improved = dataclasses.replace(trial, extra=dict(plan.extra)), True
    return best


def better(a: Plan | None, b: Plan | None) -> Plan | None:
    """The plan with the smaller objective (ties keep ``a``)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.score < a.score else a
