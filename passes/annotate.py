"""Annotate: run the graph once on example inputs and record, per node, a :class:`NodeMeta`
in ``node.meta['coach']`` (read it with :func:`meta`): what the node computes (kind, shape,
dtype, bytes) and the inputs of the analytic cost model in ``coach_fx.profile``.

Before/after::

    %conv1 = call_module[target=conv1](args=(%x,))
    # after annotate(gm, (x,)):
    meta(conv1) == NodeMeta(kind='tensor', shape=(1, 64, 112, 112), bytes=3211264,
                            flops=236027904.0, ...)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NodeMeta:
    """What annotate recorded for one fx node."""

    #: "tensor" (one tensor), "tensors" (a tuple/list holding tensors), "value" (anything
    #: else: sizes, ints, None)
    kind: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    numel: int
    bytes: int            # output bytes at its own precision (for "tensors" the sum)
    flops: float = 0.0
    moved: int = 0        # bytes read and written, parameters included
    value_type: str | None = None

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    @property
    def float(self) -> bool:
        """One floating-point tensor (what a crossing may quantize)."""
        return self.kind == "tensor" and self.dtype is not None and self.dtype.is_floating_point


def meta(n: fx.Node) -> NodeMeta:
    """The node's annotation (a clear error when ``annotate`` has not run)."""
    m = n.meta.get("coach")
    if not isinstance(m, NodeMeta):
        raise ValueError(f"node {n.name} is not annotated (run passes.annotate first)")
    return m


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _module_flops(mod: nn.Module, args: tuple, out: Any) -> float:
    outs = _tensors(out)
    n_out = sum(t.numel() for t in outs)
    if isinstance(mod, nn.modules.conv._ConvNd):
        return 2.0 * n_out * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    if isinstance(mod, nn.Linear):
        return 2.0 * n_out * mod.in_features
    if isinstance(mod, nn.MultiheadAttention):
        q = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if q is not None:
            seq_tokens = q.numel() // mod.embed_dim
            seq_len = q.shape[1] if mod.batch_first and q.dim() == 3 else q.shape[0]
            return 2.0 * seq_tokens * mod.embed_dim * (4 * mod.embed_dim + 2 * seq_len)
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return 4.0 * n_out
    from coach_fx.passes.bottleneck import BottleneckDecoder, BottleneckEncoder
    if isinstance(mod, (BottleneckEncoder, BottleneckDecoder)):
        return mod.flops(n_out)
    return float(n_out)


_MATMUL = {torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "mm", "bmm"}


def _function_flops(target: Any, args: tuple, kwargs: dict, out: Any) -> float:
    outs = _tensors(out)
    n_out = sum(t.numel() for t in outs)
    name = getattr(target, "__name__", str(target))
    if target in (F.conv1d, F.conv2d, F.conv3d) or "convolution" in name or name.startswith("conv"):
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(w, torch.Tensor):
            return 2.0 * n_out * math.prod(w.shape[1:])
    if target is F.linear or name in ("linear", "addmm", "linear.default", "addmm.default"):
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if target is not F.linear and "addmm" in name and len(args) > 2:
            w = args[2]
            if isinstance(w, torch.Tensor):
                return 2.0 * n_out * w.shape[0]
        if isinstance(w, torch.Tensor):
            return 2.0 * n_out * w.shape[-1]
    if target in _MATMUL or name in ("matmul", "mm", "bmm", "mm.default", "bmm.default"):
        a = args[0] if args else None
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return 2.0 * n_out * a.shape[-1]
    return float(n_out)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.iand, operator.ior, operator.ixor}


def mutated_input(n: fx.Node) -> fx.Node | None:
    """The node whose tensor ``n`` modifies in place (``relu_``, ``+=``, ``inplace=True``,
    aten ops that write their first argument), if any."""
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return None
    if n.op == "call_function":
        if n.target in _INPLACE_FUNCTIONS or n.kwargs.get("inplace") is True:
            return first
        schema = getattr(n.target, "_schema", None)      # aten ops in export / dynamo graphs
        if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None \
                and schema.arguments[0].alias_info.is_write:
            return first
    elif n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
        return first
    elif n.op == "call_module" and n.graph.owning_module is not None:
        if getattr(n.graph.owning_module.get_submodule(n.target), "inplace", False) is True:
            return first
    return None


def keeps_effect(n: fx.Node) -> bool:
    """For dead-code elimination: an in-place op changes its input even if its result is unused."""
    return n.is_impure() or mutated_input(n) is not None


def constant_nodes(gm: fx.GraphModule) -> frozenset[str]:
    """Computing nodes whose value depends on no model input and that change nothing: a
    parameter reshaped (convnext's layer scale), an attention-bias table indexed (levit), a
    ``torch.arange``. Like parameters, they are not DAG nodes: each half that reads one
    computes it itself, so a constant never crosses and never splits the DAG's blocks."""
    const: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n.name)
        elif (n.op in ("call_function", "call_method", "call_module") and not keeps_effect(n)
              and all(a.name in const for a in n.all_input_nodes)):
            const.add(n.name)
    return frozenset(const - {n.name for n in gm.graph.nodes if n.op == "get_attr"})


class _Annotator(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if isinstance(out, torch.Tensor):
            info = NodeMeta("tensor", tuple(out.shape), out.dtype, out.numel(), _nbytes(out))
        elif _tensors(out):
            ts = _tensors(out)
            info = NodeMeta("tensors", None, None, sum(t.numel() for t in ts),
                            sum(_nbytes(t) for t in ts))
        else:
            info = NodeMeta("value", None, None, 0, 0, value_type=type(out).__name__)
        ins = _tensors((args, kwargs))
        moved = sum(_nbytes(t) for t in ins) + info.bytes
        if n.op == "call_module":
            mod = self.fetch_attr(n.target)
            moved += sum(_nbytes(p) for p in mod.parameters()) + sum(_nbytes(b) for b in mod.buffers())
            flops = _module_flops(mod, args, out)
        elif n.op in ("call_function", "call_method"):
            flops = _function_flops(n.target, args, kwargs, out)
        else:
            flops, moved = 0.0, 0
        n.meta["coach"] = dataclasses.replace(info, flops=flops if info.kind != "value" else 0.0,
                                              moved=moved)
        return out


def annotate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Record shape, bytes and analytic cost inputs of every node (in place); returns ``gm``."""
    with torch.no_grad():
        _Annotator(gm).run(*example_inputs)
    return gm
