"""The published partitioners, faithful to their papers (each minimizes latency):

* ``neurosurgeon`` (Kang et al., ASPLOS 2017): a chain view; cuts only where exactly one tensor
  crosses; float32 transfer.
* ``dads`` (Hu et al., INFOCOM 2019): minimum s-t cut of the DAG for latency; float32 transfer;
  each tensor paid once however many readers it has.
* ``qdmp`` (Zhang et al., IMWUT 2020): the same cut, searched block by block between
  articulation nodes (smaller flow problems, same optimum).
* ``dads-dsh``: DADS's heavy-load mode (DSH), which maximizes throughput for a stream: the
  period max(T_end, T_link, T_cloud) is NP-hard to minimize over cuts, so DSH approximates it
  with minimum cuts. Ours takes the minimum cuts of weighted sums w_e T_end + w_l T_link +
  w_c T_cloud over a grid of weights (``DSH_WEIGHTS``; equal weights give the light-load cut)
  and keeps the one with the shortest period: never worse than the light-load cut, so DSH's
  3-approximation (max <= sum <= 3 max) still holds.
* ``cloud-only+jpeg90`` / ``cloud-only+png``: what a deployed camera does: the frame is coded
  as a quality-90 JPEG (or a lossless PNG) and the whole model runs in the cloud, priced with
  measured coding times and real coded sizes (``LayerDAG.input_codecs``).

Each has a ``+int8`` variant sending 8 bits per crossing tensor, so that the gain of joint
partition-and-bits search is not confused with the gain of quantizing at all. Baselines do not
check the accuracy budget; ``coach_fx.compile`` measures and reports the accuracy of their plan.
"""

from __future__ import annotations

from dataclasses import replace

from coach_fx.optimize.candidates import divide
from coach_fx.optimize.mincut import min_cut_end_set
from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan


def _latency_problem(p: Problem) -> Problem:
    return replace(p, objective="latency", oracle=None, codecs=(), tensor_codecs=())


#: DSH's weight grid (end, link, cloud): every mix of 1, 2, 4 and 8 (up to scale).
DSH_WEIGHTS = tuple(sorted({(e / m, l / m, c / m) for e in (1, 2, 4, 8) for l in (1, 2, 4, 8)
                            for c in (1, 2, 4, 8) for m in [min(e, l, c)]}))


def neurosurgeon(p: Problem, bits: int = 32, name: str = "neurosurgeon") -> Plan:
    lp = _latency_problem(p)
    best: Plan | None = None
    # a single crossing tensor is an articulation node (every path runs through it), so a
    # block too wide to list has no such cut inside it: its two ends are all there is
    names = p.dag.nodes
    for m in divide(p.dag, (bits,), exact_sets=True).masks:
        plan = lp.price([names[i] for i in range(len(names)) if m >> i & 1], bits, name)
        if len(plan.cut) <= 1:
            best = better(best, plan)
    assert best is not None  # end-only always qualifies
    return best


def dads(p: Problem, bits: int = 32, name: str = "dads") -> Plan:
    lp = _latency_problem(p)
    s = min_cut_end_set(lp, bits, lp.dag.nodes)
    return better(lp.price(lp.dag.nodes, bits, name), lp.price(s, bits, name))


def dads_dsh(p: Problem, bits: int = 32, name: str = "dads-dsh") -> Plan:
    tp = replace(p, objective="throughput", oracle=None, codecs=(), tensor_codecs=())
    best = tp.price(tp.dag.nodes, bits, name)
    seen: set[frozenset[str]] = set()
    for w in DSH_WEIGHTS:
        s = min_cut_end_set(tp, bits, tp.dag.nodes, weights=w)
        if s not in seen:
            seen.add(s)
            best = better(best, tp.price(s, bits, name))
    return best


def cloud_only_coded(codec: str):  # noqa: ANN201 - small adapter
    """Cloud-only with the frame coded by ``codec``; a model input that is not an image
    cannot be coded: the strategy then says so."""
    name = f"cloud-only+{codec}"
    def run(p: Problem) -> Plan:
        plan = p.price((), 32, name, codec)
        if not plan.codecs:
            raise ValueError(f"{name}: the model's input is not an image (N, 1 or 3, H, W) "
                             "that a camera codec could send")
        return plan
    run.__name__ = name
    return run


def qdmp(p: Problem, bits: int = 32, name: str = "qdmp") -> Plan:
    lp = _latency_problem(p)
    dag = lp.dag
    bounds = [-1] + [dag.index[a] for a in dag.articulation_nodes()] + [len(dag.nodes)]
    best = lp.price(dag.nodes, bits, name)
    for j in range(len(bounds) - 1):
        prefix = dag.nodes[: bounds[j] + 1]
        block = dag.nodes[bounds[j] + 1: bounds[j + 1]]
        s = min_cut_end_set(lp, bits, block, prefix) if block else frozenset(prefix)
        best = better(best, lp.price(s, bits, name))
    return best


def int8(fn, name: str):  # noqa: ANN001, ANN201 - small adapter
    def run(p: Problem) -> Plan:
        return fn(p, bits=8, name=name)
    run.__name__ = name
    return run


from coach_fx.optimize import Strategy, register  # noqa: E402 - the registry imports this module

for _name, _run in (("neurosurgeon", neurosurgeon), ("dads", dads), ("dads-dsh", dads_dsh), ("qdmp", qdmp)):
    register(Strategy(_name, _run))
    register(Strategy(f"{_name}+int8", int8(_run, f"{_name}+int8")))
for _codec in ("jpeg95", "jpeg90", "jpeg75", "png"):
    # the quality-90 JPEG and the PNG stand for the rest in ``coach plan --strategy all``
    register(Strategy(f"cloud-only+{_codec}", cloud_only_coded(_codec), compared=_codec in ("jpeg90", "png")))
