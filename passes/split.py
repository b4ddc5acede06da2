"""Split: cut one GraphModule in two at a single node, ``tail(head(x)) == gm(x)``.

The online end side uses it to look the semantic cache up *inside* its half: the head runs
the model up to an earlier node whose features tell classes apart about as well as the cut's
(say the first convolution's), the cache answers there when it can, and only a miss pays for
the tail (the rest of the end half) and the quantizing. The node must be a single value that
everything after it depends on alone (an articulation of the graph): the tail's one input is
that value.

Both modules keep the original's submodules and parameters (the same objects, no copies).

Example::

    >>> head, tail = split_at(end_half, "stem_1")                       # doctest: +SKIP
    >>> torch.equal(tail(head(x)[0])[0], end_half(x)[0])                # doctest: +SKIP
    True
"""

from __future__ import annotations

import torch.fx as fx


class SplitError(ValueError):
    """The graph cannot be split at that node (no such operation, or not an articulation)."""


def split_at(gm: fx.GraphModule, name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(head: the original's inputs -> ``(value of name,)``, tail: that value -> the original's
    output). Raises :class:`SplitError` when the rest of the graph reads anything computed
    before ``name`` other than ``name`` itself (or a model input), or when ``name`` is not an
    operation of the graph."""
    nodes = {n.name: n for n in gm.graph.nodes}
    p = nodes.get(name)
    if p is None or p.op in ("placeholder", "output", "get_attr"):
        raise SplitError(f"no operation named {name!r} in the graph")
    before: set[fx.Node] = set()
    stack = [p]
    while stack:
        n = stack.pop()
        if n not in before:
            before.add(n)
            stack.extend(n.all_input_nodes)

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in before or n.op == "placeholder":     # the head takes what the original takes
            env[n] = head.node_copy(n, lambda a: env[a])
    head.output((env[p],))

    tail = fx.Graph()
    env = {p: tail.placeholder(name)}
    for n in gm.graph.nodes:
        if n in before:
            continue
        if n.op == "placeholder":
            # an input nothing after ``name`` reads: the tail does not take it
            if any(u not in before for u in n.users):
                raise SplitError(f"{name!r} does not split the graph: {n.name!r} is read after it")
            continue
        for a in n.all_input_nodes:
            if a in before and a is not p and a.op != "get_attr":
                raise SplitError(f"{name!r} does not split the graph: {n.name!r} reads {a.name!r}, "
                                 "computed before it")
        env[n] = tail.node_copy(n, lambda a: env[a] if a in env else _copy_attr(tail, a, env))
    return fx.GraphModule(gm, head), fx.GraphModule(gm, tail)


def _copy_attr(graph: fx.Graph, a: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """A parameter read on both sides of the split: each side gets its own get_attr."""
    env[a] = graph.node_copy(a)
    return env[a]


__all__ = ["split_at", "SplitError"]
