"""Candidate end sets by divide and conquer (DESIGN.md §4, steps 1-2).

*Divide*: the articulation nodes a_1 < ... < a_k cut the DAG into a chain of blocks. Every node
is an ancestor or a descendant of each a_j, so every predecessor-closed set is
``prefix(a_j) ∪ T`` with T a closed subset of the block between a_j and a_{j+1}: the plans of
the whole model are the sum, not the product, of the blocks' plans.

*Conquer*: a block with few closed subsets is enumerated. A larger block is split into its
parallel branches (weakly connected components, independent of each other), each branch is
again divided at its own articulation nodes and conquered, and the branch choices are combined
keeping only Pareto-optimal (end time, cloud time, bytes at every bit width) combinations
among those that agree on everything else the price depends on: which readers of nodes
outside the branch they cover (such a node crosses unless all its readers are in) and, when an accuracy oracle decides the bits, the crossing
set itself (accuracy depends on the set, not only on its size). So the search stays exact.

Sets are bitmasks over ``dag.index`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from coach_fx.dag import LayerDAG
from coach_fx.dag_sets import PlanSpaceTooLarge, articulations, closed_masks
from coach_fx.passes.wire_sizes import tensor_bytes


class _Space:
    """Bitmask views of a DAG shared by the helpers below."""

    def __init__(self, dag: LayerDAG, bits: Sequence[int]) -> None:
        self.dag = dag
        self.bits = tuple(bits)
        n = len(dag.nodes)
        self.n = n
        self.pred = [0] * n
        self.readers = [0] * n       # data readers (bitmask)
        self.is_output = [False] * n
        self.reads_input = [False] * n
        for x in dag.inputs:
            for r in dag.readers(x):
                self.reads_input[dag.index[r]] = True
        for v in dag.nodes:
            i = dag.index[v]
            self.pred[i] = sum(1 << dag.index[p] for p in dag.preds(v))
            self.readers[i] = sum(1 << dag.index[r] for r in dag.readers(v))
        for o in dag.outputs:
            if o in dag.index:
                self.is_output[dag.index[o]] = True
        info = [dag.info[v] for v in dag.nodes]
        self.t_end = [d.t_end for d in info]
        self.t_cloud = [d.t_cloud for d in info]
        self.qnumel = [d.numel if d.quantizable else 0 for d in info]
        self.wire = [tuple(tensor_bytes(d.numel, d.bytes, d.quantizable, b, d.rows) for b in self.bits)
                     for d in info]


def _closed_subsets(sp: _Space, nodes: Sequence[int], limit: int) -> list[int] | None:
    """Closed subsets of ``nodes`` (preds outside ``nodes`` count as present); None past limit."""
    try:
        return list(closed_masks(sp.pred, nodes, limit))
    except PlanSpaceTooLarge:
        return None


def _components(sp: _Space, nodes: Sequence[int]) -> list[list[int]]:
    inside = set(nodes)
    adj: dict[int, set[int]] = {v: set() for v in nodes}
    for v in nodes:
        for u in range(sp.n):
            if sp.pred[v] >> u & 1 and u in inside:
                adj[v].add(u)
                adj[u].add(v)
    seen: set[int] = set()
    comps = []
    for v in nodes:
        if v in seen:
            continue
        comp, todo = [], [v]
        seen.add(v)
        while todo:
            w = todo.pop()
            comp.append(w)
            for x in adj[w]:
                if x not in seen:
                    seen.add(x)
                    todo.append(x)
        comps.append(sorted(comp))
    return comps


@dataclass
class _Cand:
    mask: int
    e: float                 # Σ t_end inside
    cl: float                # Σ t_cloud inside (saved from the cloud)
    wire: tuple[int, ...]    # bytes of the crossing tensors inside, per bit width
    qn: int                  # elements to quantize
    key: tuple               # what must match for dominance to be safe


def _describe(sp: _Space, mask: int, ext: int, exact_sets: bool) -> _Cand:
    e = cl = 0.0
    qn = 0
    wire = [0] * len(sp.bits)
    crossing = 0
    m, i = mask, 0
    while m:
        if m & 1:
            e += sp.t_end[i]
            cl += sp.t_cloud[i]
            # a node of the block crosses if a reader is outside the set (or it is an output)
            if sp.readers[i] & ~mask or sp.is_output[i]:
                crossing |= 1 << i
                qn += sp.qnumel[i]
                for k, w in enumerate(sp.wire[i]):
                    wire[k] += w
        m >>= 1
        i += 1
    # nodes outside that this set reads cross unless all their readers are inside: group by
    # which such readers are covered
    key = (mask & ext, crossing if exact_sets else None)
    return _Cand(mask, e, cl, tuple(wire), qn, key)


def _dominates(a: _Cand, b: _Cand) -> bool:
    return (a.e <= b.e and a.cl >= b.cl and a.qn <= b.qn
            and all(x <= y for x, y in zip(a.wire, b.wire)))


def _pareto(cands: list[_Cand]) -> list[_Cand]:
    groups: dict[tuple, list[_Cand]] = {}
    for c in cands:
        groups.setdefault(c.key, []).append(c)
    out = []
    for group in groups.values():
        group.sort(key=lambda c: (c.e, -c.cl, c.wire, c.qn))
        kept: list[_Cand] = []
        for c in group:
            if not any(_dominates(k, c) for k in kept):
                kept.append(c)
        out.extend(kept)
    return out


def _conquer(sp: _Space, nodes: list[int], exact_sets: bool, limit: int, depth: int = 0) -> list[int]:
    """Masks of the closed subsets of ``nodes`` worth pricing (all of them, or a Pareto set)."""
    subsets = _closed_subsets(sp, nodes, limit)
    if subsets is not None or depth > 50:
        if subsets is None:
            raise TooWide(len(nodes), limit)
        return subsets
    comps = _components(sp, nodes)
    if len(comps) == 1:
        # one branch: divide it at its own articulation nodes (sum over its sub-blocks)
        arts = articulations(sp.pred, nodes)
        if not arts:
            subsets = _closed_subsets(sp, nodes, limit * 4)
            if subsets is None:
                raise TooWide(len(nodes), limit * 4)
            return subsets
        out: list[int] = []
        prefix = 0
        cuts = [-1] + [nodes.index(a) for a in arts] + [len(nodes)]
        for j in range(len(cuts) - 1):
            if j > 0:
                prefix |= sum(1 << nodes[k] for k in range(cuts[j - 1] + 1, cuts[j] + 1))
            inner = nodes[cuts[j] + 1: cuts[j + 1]]
            if not inner:
                out.append(prefix)
                continue
            out.extend(prefix | t for t in _conquer(sp, inner, exact_sets, limit, depth + 1))
        if len(cuts) > 2:
            out.append(sum(1 << v for v in nodes))
        return sorted(set(out))
    # parallel branches: combine each branch's choices, pruning dominated combinations
    inside = sum(1 << v for v in nodes)
    ext = sum(1 << v for v in nodes if sp.pred[v] & ~inside or sp.reads_input[v])
    frontier = [_describe(sp, 0, ext, exact_sets)]
    for comp in comps:
        options = [_describe(sp, m, ext, exact_sets)
                   for m in _conquer(sp, comp, exact_sets, limit, depth + 1)]
        options = _pareto(options)
        combined = [_describe(sp, f.mask | o.mask, ext, exact_sets)
                    for f in frontier for o in options]
        frontier = _pareto(combined)
    return [c.mask for c in frontier]


class TooWide(Exception):
    """A block (or one of its branches) with more closed subsets than the divide step lists
    and no articulation node to divide it at."""

    def __init__(self, nodes: int, limit: int) -> None:
        super().__init__(f"a block of {nodes} nodes has more than {limit:,} closed subsets "
                         "and no articulation node")


@dataclass(frozen=True)
class Division:
    """The divide step's answer: ``masks``, the end sets worth pricing of every block it could
    conquer (and, for each wide block, its two ends: the block all in the cloud or all on the
    end), and ``wide``, the blocks left to the exact program (``optimize.milp``) as
    (prefix mask, node positions)."""

    masks: tuple[int, ...]
    wide: tuple[tuple[int, tuple[int, ...]], ...]


def divide(dag: LayerDAG, bits: Sequence[int], exact_sets: bool = True,
           block_limit: int = 4096, program_limit: int | None = None) -> Division:
    """Divide at articulation nodes and conquer each block (see the module docstring); a
    block that cannot be conquered, or whose list would be longer than ``program_limit``, is
    left to the program."""
    sp = _Space(dag, bits)
    arts = [dag.index[a] for a in dag.articulation_nodes()]
    bounds = [-1] + arts + [sp.n]
    seen: dict[int, None] = {}
    wide = []
    for j in range(len(bounds) - 1):
        prefix = (1 << (bounds[j] + 1)) - 1
        block = list(range(bounds[j] + 1, bounds[j + 1]))
        try:
            masks = _conquer(sp, block, exact_sets, block_limit) if block else [0]
            if program_limit is not None and block and len(masks) > program_limit:
                raise TooWide(len(block), program_limit)
        except TooWide:
            wide.append((prefix, tuple(block)))
            masks = [0, sum(1 << i for i in block)]
        for t in masks:
            seen.setdefault(prefix | t)
    seen.setdefault((1 << sp.n) - 1)
    return Division(tuple(seen), tuple(wide))
