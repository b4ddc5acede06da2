"""The two graph algorithms of the plan space, on bitmasks (one copy each: the DAG's own
queries and the optimizer's blocks use them): the predecessor-closed subsets of a sub-DAG,
and the nodes every path through it passes.

    >>> sorted(closed_masks([0, 0b1, 0b1], [0, 1, 2]))     # a -> b, a -> c
    [0, 1, 3, 5, 7]
    >>> articulations([0, 0b1, 0b1, 0b110], [0, 1, 2, 3])  # a diamond: a and d
    [0, 3]
"""

from __future__ import annotations

from typing import Container, Iterator, Sequence


class PlanSpaceTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the model has more than {limit:,} predecessor-closed sets: too many for "
                         f"brute force (limit max_plans={limit:,}); use strategy='coach'")
        self.limit = limit


def closed_masks(pred: Sequence[int], positions: Sequence[int],
                 limit: int | None = None) -> Iterator[int]:
    """The predecessor-closed subsets of the nodes at ``positions`` (topological order; bit i
    is the node at position i, ``pred[i]`` the bitmask of its predecessors; a predecessor
    outside ``positions`` counts as present), depth first from the empty set; raises
    :class:`PlanSpaceTooLarge` past ``limit``."""
    inside = sum(1 << i for i in positions)
    local = [pred[i] & inside for i in positions]
    count = 0
    stack = [(0, 0)]
    while stack:
        k, s = stack.pop()
        if k == len(positions):
            count += 1
            if limit is not None and count > limit:
                raise PlanSpaceTooLarge(limit)
            yield s
            continue
        stack.append((k + 1, s))
        if local[k] & ~s == 0:
            stack.append((k + 1, s | (1 << positions[k])))


def articulations(pred: Sequence[int], positions: Sequence[int], fed: Container[int] = (),
                  feeds: Container[int] = ()) -> list[int]:
    """The positions every source -> sink path of the sub-DAG at ``positions`` passes through.

    The source feeds the nodes without a predecessor inside and those in ``fed``; the nodes
    without a successor inside and those in ``feeds`` feed the sink. In a topological order v
    is on every path exactly when no edge (the virtual ones included) jumps over v's place.
    """
    pos = {v: k for k, v in enumerate(positions)}
    m = len(pos)
    cover = [0] * (m + 1)   # difference array over places strictly inside an edge

    def jump(a: int, b: int) -> None:
        if b - a > 1:
            cover[a + 1] += 1
            cover[b] -= 1
    for v in positions:
        preds = [u for u in positions if pred[v] >> u & 1]
        if not preds or v in fed:
            jump(-1, pos[v])
        for u in preds:
            jump(pos[u], pos[v])
        if v in feeds or not any(pred[w] >> v & 1 for w in positions):
            jump(pos[v], m)
    out, run = [], 0
    for k, v in enumerate(positions):
        run += cover[k]
        if run == 0:
            out.append(v)
    return out
