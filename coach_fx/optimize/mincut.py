"""Minimum s-t cut for latency on the DAG (networkx max-flow), shared by DADS and QDMP.

Network: source E (end), sink C (cloud). A free node v has E->v with capacity t_cloud(v) (cut
when v runs in the cloud) and v->C with t_end(v) (cut when v runs on the end). A tensor u read
by others gets an auxiliary node u' with u->u' of capacity "send u" and u'->r infinite for every
reader r, so a tensor is paid once however many readers it has. For every edge u->v an infinite
v->u keeps the end set closed under predecessors (no data flows back from cloud to end).
"""

from __future__ import annotations

from typing import Iterable

import networkx as nx

from coach_fx.optimize.problem import Problem
from coach_fx.passes.wire_sizes import tensor_bytes

_E, _C = ("__end__",), ("__cloud__",)


def send_seconds(p: Problem, u: str, bits: int) -> float:
    """Uplink time of tensor ``u`` at ``bits`` (inputs at ``input_bits``), quantization included."""
    d = p.dag.info[u]
    b = p.input_bits if u in p.dag.inputs and d.quantizable else (bits if d.quantizable else 32)
    t = p.network.up_seconds(tensor_bytes(d.numel, d.bytes, d.quantizable, b, d.rows))
    if d.quantizable and b < 32:
        q_end, q_cloud = p.dag.quant_cost(b)
        t += (q_end + q_cloud) * d.numel
    return t


def min_cut_end_set(p: Problem, bits: int, free: Iterable[str],
                    end_fixed: Iterable[str] = (), weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
                    ) -> frozenset[str]:
    """The latency-optimal end set among those that hold ``end_fixed``, choose ``free`` nodes,
    and leave every other node in the cloud (constant terms aside).

    ``weights`` (end, link, cloud) minimize ``w_e T_end + w_l T_link + w_c T_cloud`` instead of
    the latency (DADS's heavy-load mode searches over them)."""
    w_end, w_link, w_cloud = weights
    dag = p.dag
    free = list(free)
    free_set, end_set = set(free), set(end_fixed) | set(dag.inputs)
    def at(x: str) -> object:
        return x if x in free_set else (_E if x in end_set else _C)
    g = nx.DiGraph()
    g.add_node(_E)
    g.add_node(_C)
    for v in free:
        g.add_edge(_E, v, capacity=w_cloud * dag.t_cloud(v))
        g.add_edge(v, _C, capacity=w_end * dag.t_end(v))
        for u in dag.preds(v):
            if at(u) != v:
                g.add_edge(v, at(u))  # no capacity attribute = infinite
    for u in [*dag.inputs, *dag.nodes]:
        src = at(u)
        if src is _C:
            continue
        targets = {at(r) for r in dag.readers(u)} - {src, _E}
        if not targets:
            continue
        aux = ("send", u)
        g.add_edge(src, aux, capacity=w_link * send_seconds(p, u, bits))
        for t in targets:
            g.add_edge(aux, t)
    _, (reach, _) = nx.minimum_cut(g, _E, _C)
    return frozenset(end_set - set(dag.inputs)) | frozenset(v for v in free if v in reach)
