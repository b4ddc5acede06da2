"""``LayerDAG``: the plain, read-only view of an annotated graph that the optimizer works on.

Only nodes that compute a tensor are DAG nodes. Parameters and buffers (``get_attr``) and
shape or size arithmetic fold into the nodes that read them; a ``getitem`` that picks a
tensor out of a tuple-valued node folds into that node. So a plan never ships weights, and
free-floating constants do not multiply the plans.

Edges: ``u -> v`` when v reads u's tensor (a *data* edge: u crosses if v is in the cloud and u
on the end) or reads a size computed from u (an *order* edge: v on the end needs u on the end;
the size itself crosses as a plain value, costing nothing worth modelling).

Example::

    >>> dag = LayerDAG.from_graph_module(gm, t_end, t_cloud)          # doctest: +SKIP
    >>> dag.nodes[:3], dag.preds("layer1_0_conv1"), dag.crossing({"conv1", "bn1"})  # doctest: +SKIP
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch.fx as fx

from coach_fx.dag_sets import PlanSpaceTooLarge, articulations, closed_masks
from coach_fx.passes.annotate import NodeMeta, constant_nodes, keeps_effect, meta
from coach_fx.passes.wire_sizes import token_rows


@dataclass(frozen=True)
class NodeData:
    """What the optimizer knows of one DAG node (or model input)."""

    name: str
    numel: int
    bytes: int          # output bytes at its own precision (float32: 4 per element)
    quantizable: bool   # a floating-point tensor: may be sent with fewer bits
    t_end: float        # seconds on the end device
    t_cloud: float      # seconds on the cloud device
    flops: float = 0.0
    #: token rows of its tensors, each sent with its own scale below 16 bits (``token_rows``)
    rows: int = 0


@dataclass(frozen=True)
class CodecCost:
    """What sending a tensor through a codec costs (``coach_fx.profile`` measures it on real
    frames): a model input through an image codec, or a quantized tensor's packed codes through
    a lossless one (``LayerDAG.tensor_codecs``). Coded bytes per request (a high quantile over
    the frames, not the mean: a plan must keep up with the frames that code large) and the
    end / cloud seconds to encode / decode, each device's own."""

    codec: str
    bytes: int
    t_end: float
    t_cloud: float
    #: mean coded bytes per request (what a long stream averages; ``bytes`` prices plans)
    mean_bytes: int = 0

    @property
    def average(self) -> int:
        """Mean coded bytes per request (``bytes`` where no mean was measured)."""
        return self.mean_bytes or self.bytes

    def priced(self, objective: str) -> int:
        """Bytes a plan is priced at: the high quantile when it plans for throughput (a stream
        must keep up with the frames that code large), the mean when it plans for latency (a
        single request's expected time is the mean size over the rate)."""
        return self.average if objective == "latency" else self.bytes


class LayerDAG:
    """Nodes in topological order, with predecessors, successors, bytes and costs."""

    def __init__(self, inputs: Mapping[str, NodeData], nodes: Mapping[str, NodeData],
                 data_preds: Mapping[str, Iterable[str]], order_preds: Mapping[str, Iterable[str]],
                 outputs: Iterable[str], members: Mapping[str, tuple[str, ...]] | None = None,
                 quant_s_per_elem: tuple[float, float] | Mapping[int, tuple[float, float]] = (0.0, 0.0)
                 ) -> None:
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.info: dict[str, NodeData] = {**inputs, **nodes}
        self.index = {n: i for i, n in enumerate(self.nodes)}
        node_set = set(self.nodes)
        self._data_readers: dict[str, set[str]] = {n: set() for n in self.info}
        self._preds: dict[str, frozenset[str]] = {}
        self._succs: dict[str, set[str]] = {n: set() for n in self.nodes}
        for v in self.nodes:
            dp = set(data_preds.get(v, ()))
            op = set(order_preds.get(v, ()))
            for u in dp:
                self._data_readers[u].add(v)
            ps = frozenset(p for p in dp | op if p in node_set and p != v)
            self._preds[v] = ps
            for u in ps:
                self._succs[u].add(v)
                if self.index[u] >= self.index[v]:
                    raise ValueError(f"LayerDAG: nodes not in topological order ({u} -> {v})")
        self.outputs: tuple[str, ...] = tuple(dict.fromkeys(outputs))
        self.members: dict[str, tuple[str, ...]] = dict(members or {n: (n,) for n in self.nodes})
        #: fx nodes in no DAG node: parameters, constants and input-independent tensors (computed
        #: by whichever half reads them), size arithmetic. A plan can name them; they place nothing.
        self.folded: frozenset[str] = frozenset()
        #: seconds per element to quantize+pack on the end / unpack+dequantize in the cloud,
        #: one pair for every bit width or a pair per bit width
        self.quant_s_per_elem = quant_s_per_elem
        #: model input name -> codec name -> its cost (image-shaped inputs only; see
        #: ``Settings.input_codecs``); empty when no codec applies
        self.input_codecs: dict[str, dict[str, CodecCost]] = {}
        #: lossless codec ("deflate") -> node or model input -> bits -> its cost (the coded
        #: size of the packed codes at that width); empty when none was measured
        self.tensor_codecs: dict[str, dict[str, dict[int, CodecCost]]] = {}
        self._pred_mask = [sum(1 << self.index[p] for p in self._preds[v]) for v in self.nodes]

    # ----------------------------------------------------------------- structure
    def __len__(self) -> int:
        return len(self.nodes)

    def preds(self, name: str) -> frozenset[str]:
        return self._preds[name]

    def readers(self, name: str) -> frozenset[str]:
        """DAG nodes that read ``name``'s tensor as data."""
        return frozenset(self._data_readers[name])

    def is_closed(self, end_nodes: Iterable[str]) -> bool:
        """Whether ``end_nodes`` is closed under predecessors (a valid plan)."""
        s = set(end_nodes)
        return all(self._preds[v] <= s for v in s)

    def crossing(self, end_nodes: Iterable[str]) -> tuple[str, ...]:
        """Tensors sent from end to cloud: end outputs (or model inputs) read in the cloud.

        Each is sent once however many cloud nodes read it. When the cloud computes part of the
        output, outputs computed on the end cross too (the cloud assembles the result).
        """
        s = set(end_nodes)
        if len(s) == len(self.nodes):
            return ()
        on_end = [*self.inputs, *(v for v in self.nodes if v in s)]
        out = set(self.outputs)
        return tuple(u for u in on_end if self._data_readers[u] - s or u in out)

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """``names`` and everything they depend on (the smallest closed set holding them)."""
        todo, seen = list(names), set()
        while todo:
            v = todo.pop()
            if v in seen or v not in self.index:
                continue
            seen.add(v)
            todo.extend(self._preds[v])
        return seen

    def articulation_nodes(self) -> tuple[str, ...]:
        """Nodes that every input -> output path passes through, in topological order."""
        n = len(self.nodes)
        fed = {self.index[v] for v in self.nodes if any(v in self._data_readers[i] for i in self.inputs)}
        feeds = {self.index[v] for v in self.outputs if v in self.index}
        return tuple(self.nodes[i] for i in articulations(self._pred_mask, range(n), fed, feeds))

    def closed_sets(self, limit: int | None = None) -> Iterator[frozenset[str]]:
        """Every predecessor-closed set, from the empty set; ``limit`` raises past that count."""
        n = len(self.nodes)
        for s in closed_masks(self._pred_mask, range(n), limit):
            yield frozenset(self.nodes[j] for j in range(n) if s >> j & 1)

    def count_closed_sets(self, limit: int) -> int:
        """How many closed sets there are, counting up to ``limit`` (then ``limit + 1``)."""
        try:
            return sum(1 for _ in self.closed_sets(limit))
        except PlanSpaceTooLarge:
            return limit + 1

    # ----------------------------------------------------------------- costs
    def t_end(self, name: str) -> float:
        return self.info[name].t_end

    def t_cloud(self, name: str) -> float:
        return self.info[name].t_cloud

    def nbytes(self, name: str) -> int:
        return self.info[name].bytes

    def resolve(self, names: Iterable[str]) -> frozenset[str]:
        """DAG nodes named by ``names``: a DAG node's own name, or the name of an fx node it
        folds in (a ``chunk``'s ``getitem``: its group). Names of :attr:`folded` fx nodes
        (parameters, input-independent tensors) place nothing and are left out (``ignored``
        lists them). An unknown name is a ``ValueError``."""
        group = {m: g for g, ms in self.members.items() for m in ms}
        names = list(names)
        unknown = [n for n in names if n not in self.info and n not in group and n not in self.folded]
        if unknown:
            raise ValueError(f"unknown node(s) {unknown[:5]}: name DAG nodes (cm.dag.nodes, e.g. "
                             f"{list(self.nodes)[:4]}) or fx nodes they fold in")
        return frozenset(n if n in self.info else group[n] for n in names if n in self.info or n in group)

    def ignored(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that :meth:`resolve` leaves out: folded fx nodes, in no DAG node."""
        return [n for n in names if n in self.folded and n not in self.info]

    def quant_cost(self, bits: int) -> tuple[float, float]:
        """(end, cloud) seconds per element to send a float tensor with ``bits`` bits."""
        if bits >= 32:
            return (0.0, 0.0)
        q = self.quant_s_per_elem
        if isinstance(q, Mapping):
            if not q:
                raise ValueError(f"no quantize cost measured for {bits} bits: this DAG was built "
                                 "for float crossings only (bits=(32,))")
            return q.get(bits) or q[min(q, key=lambda b: abs(b - bits))]
        return q

    def coded_cost(self, name: str, codec: str | None, bits: int) -> CodecCost | None:
        """What coding ``name``'s packed codes at ``bits`` with ``codec`` costs (None: not
        measured, or no codec)."""
        if codec is None:
            return None
        return self.tensor_codecs.get(codec, {}).get(name, {}).get(bits)

    def output_bytes(self) -> int:
        return sum(self.info[o].bytes for o in self.outputs)

    def __repr__(self) -> str:
        return f"LayerDAG({len(self.inputs)} inputs, {len(self.nodes)} nodes, outputs={self.outputs})"

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_graph_module(cls, gm: fx.GraphModule, node_t_end: Mapping[str, float],
                          node_t_cloud: Mapping[str, float],
                          quant_s_per_elem: tuple[float, float] | Mapping[int, tuple[float, float]] = (0.0, 0.0)
                          ) -> "LayerDAG":
        """Fold an annotated GraphModule (``passes.annotate``) into a LayerDAG.

        ``node_t_end``/``node_t_cloud`` give seconds per fx node; a DAG node costs the sum of
        its members (size arithmetic is charged to nobody: it is microseconds).
        """
        groups = dag_groups(gm)
        inputs: dict[str, NodeData] = {}
        nodes: dict[str, NodeData] = {}
        members: dict[str, list[str]] = {}
        for n in gm.graph.nodes:
            g = groups.get(n.name)
            if n.op == "placeholder":
                if not isinstance(n.meta.get("coach"), NodeMeta):
                    raise ValueError("LayerDAG needs an annotated graph (run passes.annotate first)")
                info = meta(n)
                inputs[n.name] = NodeData(n.name, info.numel, info.bytes,
                                          info.is_tensor and info.float, 0.0, 0.0, rows=token_rows(info.shape))
            elif g is not None:
                members.setdefault(g, []).append(n.name)
        by_name = {n.name: n for n in gm.graph.nodes}
        for g, ms in members.items():
            ns = [by_name[m] for m in ms]
            tensors = [m for m in ns if meta(m).is_tensor]
            head = by_name[g]     # the node the group is named for (members may run before it)
            if meta(head).is_tensor or not tensors:
                sent = [head]
            else:
                sent = tensors
            info = [meta(m) for m in sent]
            nodes[g] = NodeData(
                g, sum(i.numel for i in info), sum(i.bytes for i in info),
                all(i.is_tensor and i.float for i in info),
                sum(node_t_end.get(m, 0.0) for m in ms), sum(node_t_cloud.get(m, 0.0) for m in ms),
                sum(meta(by_name[m]).flops for m in ms), sum(token_rows(i.shape) for i in info))
        data_preds, order_preds = {}, {}
        for g, ms in members.items():
            dp, op = set(), set()
            for m in ms:
                for a in by_name[m].all_input_nodes:
                    _classify_read(a, groups, g, dp, op)
            data_preds[g], order_preds[g] = dp, op
        # an in-place op changes a tensor for everyone who reads it later: they follow it
        from coach_fx.passes.annotate import mutated_input
        pos = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        for n in gm.graph.nodes:
            v = mutated_input(n)
            if v is None or n.name not in groups:
                continue
            for r in v.users:
                g = groups.get(r.name)
                if g is not None and pos[r.name] > pos[n.name] and g != groups[n.name]:
                    order_preds[g].add(groups[n.name])
        outs: list[str] = []
        for n in gm.graph.nodes:
            if n.op == "output":
                dp, op = set(), set()
                for a in n.all_input_nodes:
                    _classify_read(a, groups, None, dp, op)
                outs = sorted(dp | op, key=lambda x: list(by_name).index(x))
        dag = cls(inputs, nodes, data_preds, order_preds, outs,
                  {g: tuple(ms) for g, ms in members.items()}, quant_s_per_elem)
        dag.folded = frozenset(n.name for n in gm.graph.nodes
                               if n.op not in ("placeholder", "output") and n.name not in groups)
        return dag


def _classify_read(a: fx.Node, groups: Mapping[str, str], me: str | None,
                   data: set[str], order: set[str]) -> None:
    """Record what reading fx node ``a`` means for a DAG node: a data or an order dependency."""
    if a.op == "placeholder":
        data.add(a.name)
    elif a.name in groups:
        if groups[a.name] != me:
            data.add(groups[a.name])
    elif a.op == "get_attr":
        return
    else:  # size arithmetic: depends on whatever it was computed from
        stack, seen = list(a.all_input_nodes), set()
        while stack:
            b = stack.pop()
            if b.name in seen:
                continue
            seen.add(b.name)
            if b.op == "placeholder":
                order.add(b.name)
            elif b.name in groups:
                if groups[b.name] != me:
                    order.add(groups[b.name])
            elif b.op != "get_attr":
                stack.extend(b.all_input_nodes)


def dag_groups(gm: fx.GraphModule) -> dict[str, str]:
    """fx node name -> DAG node name, for the fx nodes that belong to a DAG node."""
    groups: dict[str, str] = {}
    free = constant_nodes(gm) | {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    # an update of a buffer that reads no activation (train mode's num_batches_tracked += 1)
    # depends on nothing and feeds nothing: it runs with the node that follows it, instead of
    # floating free and leaving the DAG without articulation nodes
    pending: list[str] = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        if meta(n).kind == "value" or n.name in free:
            continue
        if keeps_effect(n) and all(a.name in free for a in n.all_input_nodes):
            pending.append(n.name)
            continue
        src = n.args[0] if n.args else None
        if (n.op == "call_function" and n.target is operator.getitem and isinstance(src, fx.Node)
                and src.name in groups and meta(src).kind == "tensors"):
            groups[n.name] = groups[src.name]   # picks a tensor out of a tuple-valued node
        else:
            groups[n.name] = n.name
            groups.update((p, n.name) for p in pending)
            pending.clear()
    if pending and groups:
        last = next(reversed(groups.values()))
        groups.update((p, last) for p in pending)
    return groups
