"""Any batch size: a model compiled for one batch runs another (a DataLoader's last, smaller
batch; a serving batch) without compiling again.

The graph is the same; only the shapes the cloud half unpacks change. They are read off the
end half itself (its straight-through training form, run once on the new batch), so any layout
of the crossing tensors is right, and the halves are re-emitted for that batch and kept.

Example::

    >>> halves = BatchHalves(gm, plan, train_end)          # doctest: +SKIP
    >>> end, cloud = halves.get(args)                       # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from coach_fx.passes.boundary import Boundary
from coach_fx.passes.partition import partition
from coach_fx.plan import Plan

#: Batch sizes whose halves are kept (a training loop sees two: the full and the last batch).
KEPT_BATCHES = 8
#: Captures whose graphs follow their inputs' shapes (export and dynamo graphs are static).
SHAPE_FREE_CAPTURES = ("symbolic_trace", "graph_module", "dynamo-dynamic")


def batch_size(example_inputs: Sequence[Any]) -> int | None:
    """The size the tensor inputs share in their first dimension; None when they share none
    (a sequence-first input beside a batch-first mask) or the graph is not batch-free."""
    sizes = {a.shape[0] for a in example_inputs if isinstance(a, torch.Tensor) and a.dim() > 0}
    tensors = [a for a in example_inputs if isinstance(a, torch.Tensor)]
    if len(sizes) != 1 or any(a.dim() == 0 for a in tensors):
        return None
    return sizes.pop()


class BatchHalves:
    """(end, cloud) halves of ``plan`` per input shape, the compiled one kept always."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, boundary: Boundary, train_end: Callable[..., Any],
                 compiled: Sequence[Any], halves: tuple[fx.GraphModule, fx.GraphModule]) -> None:
        self.gm, self.plan, self.boundary, self.train_end = gm, plan, boundary, train_end
        self.compiled = _key(compiled)
        self.kept: OrderedDict[tuple, tuple[fx.GraphModule, fx.GraphModule]] = OrderedDict()
        self.kept[self.compiled] = halves

    def get(self, args: Sequence[Any]) -> tuple[fx.GraphModule, fx.GraphModule]:
        key = _key(args)
        got = self.kept.get(key)
        if got is None:
            got = self._emit(args)
            self.kept[key] = got
            while len(self.kept) > KEPT_BATCHES:
                del self.kept[next(k for k in self.kept if k != self.compiled)]
        return got

    def _emit(self, args: Sequence[Any]) -> tuple[fx.GraphModule, fx.GraphModule]:
        plan = self.plan
        shapes = {}
        if not self.boundary.end_only:
            with torch.no_grad():
                payload = self.train_end(*args)
            shapes = {c.name: tuple(v.shape) for c, v in zip(self.boundary.crossings, payload)
                      if isinstance(v, torch.Tensor)}
        end, cloud, _ = partition(self.gm, plan.end_nodes, plan.bits, codecs=plan.codecs,
                                  tensor_codecs=plan.tensor_codecs, shapes=shapes)
        return end, cloud


def _key(args: Sequence[Any]) -> tuple:
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else () for a in args)
