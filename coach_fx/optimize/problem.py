"""The planning problem every strategy solves: one DAG, one network, one accuracy oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from coach_fx.dag import LayerDAG
from coach_fx.plan import Plan, evaluate, plan_bits, usable_codecs
from coach_fx.settings import DEFAULT_BITS, Network


class Oracle(Protocol):
    """Accuracy oracle (``coach_fx.accuracy.AccuracyOracle`` or a stand-in in tests)."""

    def min_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None,
                 codecs: Mapping[str, str] | None = None) -> int | None: ...


@dataclass
class Problem:
    """A DAG priced on ``network``; ``oracle=None`` means every allowed bit width is accurate
    enough (the cheapest allowed is then always chosen). ``codecs``: image codecs a crossing
    model input may use besides raw ``input_bits`` (those the DAG has costs for)."""

    dag: LayerDAG
    network: Network
    objective: str = "throughput"
    bits: Sequence[int] = DEFAULT_BITS
    input_bits: int = 8
    oracle: Oracle | None = None
    codecs: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits)))
        self.codecs = tuple(self.codecs)

    def price(self, end_nodes: Iterable[str], bits: int, strategy: str,
              codec: str | None = None) -> Plan:
        s = frozenset(end_nodes)
        cut = self.dag.crossing(s)
        return evaluate(self.dag, s, plan_bits(self.dag, cut, bits, self.input_bits),
                        self.network, strategy=strategy, objective=self.objective, codecs=codec)

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


def better(a: Plan | None, b: Plan | None) -> Plan | None:
    """The plan with the smaller objective (ties keep ``a``)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.score < a.score else a
