"""``coach``: divide and conquer over the DAG, then bits chosen lazily (DESIGN.md §4).

1-2. :func:`coach_fx.optimize.candidates.candidate_masks` gives every end set worth pricing.
3.   Each is priced optimistically (vectorized over all candidates at once): its end and cloud
     compute without quantization work and its link time with the cheapest allowed bits, a
     lower bound of any true price. Candidates are taken best-first; for each, the fewest bits
     that meet the accuracy budget are found by binary search over the bit list
     (``Problem.feasible_bits``, memoized by crossing set) and it is re-priced exactly. The
     search stops as soon as the best resolved plan is no worse than the next optimistic
     bound: few accuracy evaluations, exact answer.
4.   ``throughput`` minimizes the period, then latency; ``latency`` minimizes latency.

Example::

    >>> plan = coach(Problem(dag, Network(10), oracle=oracle))   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import numpy as np

from coach_fx.optimize.candidates import candidate_masks
from coach_fx.optimize.problem import Problem, better
from coach_fx.plan import Plan
from coach_fx.runtime.wire import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES, tensor_bytes


def _masks_to_matrix(masks: list[int], n: int) -> np.ndarray:
    nbytes = (n + 7) // 8
    raw = np.frombuffer(b"".join(m.to_bytes(nbytes, "little") for m in masks), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(masks), nbytes), axis=1, bitorder="little")
    return bits[:, :n].astype(bool)


def optimistic_scores(p: Problem, masks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(primary, secondary) objective lower bounds per candidate mask."""
    dag = p.dag
    n = len(dag.nodes)
    m = _masks_to_matrix(masks, n)
    out = ~m
    info = [dag.info[v] for v in dag.nodes]
    t_end = np.array([d.t_end for d in info])
    t_cloud = np.array([d.t_cloud for d in info])
    b0 = p.bits[0]
    def wire(name: str, is_input: bool) -> int:
        d = dag.info[name]
        b = p.input_bits if is_input and d.quantizable else b0
        raw = tensor_bytes(d.numel, d.bytes, d.quantizable, b)
        coded = [min(c.bytes, c.average) + TENSOR_HEADER_BYTES
                 for k, c in dag.input_codecs.get(name, {}).items() if is_input and k in p.codecs]
        if not is_input or d.quantizable and p.input_bits < 32:
            coded += [c.priced(p.objective) + TENSOR_HEADER_BYTES for tc in p.tensor_codecs
                      for w, c in dag.tensor_codecs[tc].get(name, {}).items()
                      if w in p.bits or is_input and w == p.input_bits]
        return min([raw, *coded])   # a codec's coding time only adds: still a lower bound
    readers = np.zeros((n, n), dtype=np.int32)          # readers[u, r]: r reads u
    for v in dag.nodes:
        for r in dag.readers(v):
            readers[dag.index[v], dag.index[r]] = 1
    full = m.all(axis=1)
    outputs = np.zeros(n, dtype=bool)
    for o in dag.outputs:
        if o in dag.index:
            outputs[dag.index[o]] = True
    crosses = m & (((out.astype(np.int32) @ readers.T) > 0) | outputs[None, :]) & ~full[:, None]
    nbytes = crosses.astype(np.float64) @ np.array([wire(v, False) for v in dag.nodes], dtype=np.float64)
    for x in dag.inputs:
        rd = np.zeros(n, dtype=np.int32)
        for r in dag.readers(x):
            rd[dag.index[r]] = 1
        nbytes += ((out.astype(np.int32) @ rd) > 0) * wire(x, True)
    half_rtt = p.network.rtt_ms / 2e3
    live = ~full
    t_link = np.where(live, p.network.up_seconds(nbytes + MESSAGE_HEADER_BYTES) + half_rtt, 0.0)
    down = p.network.down_seconds(dag.output_bytes() + MESSAGE_HEADER_BYTES) + half_rtt
    e = m.astype(np.float64) @ t_end
    c = out.astype(np.float64) @ t_cloud + np.where(live, down, 0.0)
    latency = e + t_link + c
    period = np.maximum(np.maximum(e, t_link), c)
    return (latency, period) if p.objective == "latency" else (period, latency)


def coach(p: Problem, block_limit: int = 4096) -> Plan:
    """The exact optimum over every closed set and bit width within the accuracy budget."""
    masks = list(candidate_masks(p.dag, p.bits, exact_sets=p.oracle is not None,
                                 block_limit=block_limit))
    first, second = optimistic_scores(p, masks)
    order = np.lexsort((second, first))
    names = p.dag.nodes
    best: Plan | None = None
    resolved = 0
    slack = 1e-12   # float sums in another order: do not stop on a rounding difference
    for k in order:
        if best is not None and best.score[0] <= first[k] * (1 - slack) or (
                best is not None and best.score[0] <= first[k] and best.score[1] <= second[k]):
            break
        s = frozenset(names[i] for i in range(len(names)) if masks[k] >> i & 1)
        # only bit widths that could still beat the best plan are worth an accuracy check
        options = p.input_options(s)
        allowed = [b for b in p.bits if best is None or any(
            p.price(s, b, "coach", c).score < best.score for c in options)]
        if not allowed:
            continue
        resolved += 1
        best = better(best, p.resolve(s, "coach", allowed))
    if best is None:
        raise ValueError("coach: no plan meets the accuracy budget with the allowed bits "
                         f"{p.bits}; raise accuracy_budget or allow more bits")
    best = dataclasses.replace(best, extra={**best.extra, "candidates": len(masks), "resolved": resolved})
    return best
