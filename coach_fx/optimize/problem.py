"""The planning problem every strategy solves: one DAG, one network, one accuracy oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from coach_fx.graph import LayerDAG
from coach_fx.plan import Plan, evaluate, plan_bits
from coach_fx.settings import Network


class Oracle(Protocol):
    """Accuracy oracle (``coach_fx.accuracy.AccuracyOracle`` or a stand-in in tests)."""

    def min_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None) -> int | None: ...


@dataclass
class Problem:
    """A DAG priced on ``network``; ``oracle=None`` means every allowed bit width is accurate
    enough (the cheapest allowed is then always chosen)."""

    dag: LayerDAG
    network: Network
    objective: str = "throughput"
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8, 16, 32)
    input_bits: int = 8
    oracle: Oracle | None = None

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits)))
        self.min_bits_calls = 0

    def price(self, end_nodes: Iterable[str], bits: int, strategy: str) -> Plan:
        s = frozenset(end_nodes)
        cut = self.dag.crossing(s)
        return evaluate(self.dag, s, plan_bits(self.dag, cut, bits, self.input_bits),
                        self.network, strategy=strategy, objective=self.objective)

    def feasible_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None) -> int | None:
        """Fewest allowed bits that keep the accuracy budget (None: none does)."""
        allowed = tuple(sorted(allowed or self.bits))
        if self.oracle is None:
            return allowed[0]
        self.min_bits_calls += 1
        return self.oracle.min_bits(frozenset(end_nodes), allowed)

    def resolve(self, end_nodes: Iterable[str], strategy: str,
                allowed: Sequence[int] | None = None) -> Plan | None:
        """The best plan for this end set over the bit widths that meet the budget; None if none.

        Accuracy is monotone in bits, so the feasible widths are those from the fewest that
        pass; the cheapest of them is usually the fewest, but not always: a tensor sent as is
        (32) needs no quantize/pack work, which can outweigh its extra bytes on a fast link.
        """
        b = self.feasible_bits(end_nodes, allowed)
        if b is None:
            return None
        best = None
        for w in sorted(allowed or self.bits):
            if w >= b:
                best = better(best, self.price(end_nodes, w, strategy))
        return best


def better(a: Plan | None, b: Plan | None) -> Plan | None:
    """The plan with the smaller objective (ties keep ``a``)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.score < a.score else a
