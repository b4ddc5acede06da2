"""Train-mode calls baked into a captured graph, run in eval mode for a while.

dynamo's graph of a train-mode model calls ``F.dropout(x, 0.1, True, False)`` and batch norm
on batch statistics; planning checks the model as deployed, so ``eval_calls`` switches them
off meanwhile and puts them back before the graph is split.

Example::

    >>> with eval_calls(gm):                                  # doctest: +SKIP
    ...     plan, oracle = plan_model(gm, inputs, dag, settings)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

#: calls whose train/eval switch is an argument, baked into a captured graph (dynamo's graph of a
#: train-mode model calls ``F.dropout(x, 0.1, True, False)``): (position, keyword)
TRAINING_ARG = {F.dropout: (2, "training"), F.dropout1d: (2, "training"), F.dropout2d: (2, "training"),
                F.dropout3d: (2, "training"), F.alpha_dropout: (2, "training"),
                F.feature_alpha_dropout: (2, "training"), F.batch_norm: (5, "training"),
                torch.ops.aten.dropout.default: (2, "train")}


@contextmanager
def eval_calls(gm: fx.GraphModule) -> Iterator[int]:
    """Run ``gm``'s train-mode calls (``TRAINING_ARG``) in eval mode meanwhile: the accuracy
    check then compares the model as deployed (two dropout draws differ more than any
    quantization); put back after, before the graph is split. Yields how many it switched."""
    switched = []
    for n in gm.graph.nodes:
        where = TRAINING_ARG.get(n.target) if n.op == "call_function" else None
        if where is None:
            continue
        pos, key = where
        if key in n.kwargs and n.kwargs[key] is True:
            switched.append((n, n.args, n.kwargs))
            n.kwargs = {**n.kwargs, key: False}
        elif len(n.args) > pos and n.args[pos] is True:
            switched.append((n, n.args, n.kwargs))
            n.args = (*n.args[:pos], False, *n.args[pos + 1:])
    if switched:
        gm.recompile()
    try:
        yield len(switched)
    finally:
        for n, args, kwargs in switched:
            n.args, n.kwargs = args, kwargs
        if switched:
            gm.recompile()


__all__ = ["TRAINING_ARG", "eval_calls"]
