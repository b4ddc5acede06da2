"""From compiled cuts to run-time plans, as data: a cut's :class:`~coach_fx.runtime.plans.Variant`
and :class:`~coach_fx.runtime.plans.CutProfile` (what the end side and the controller run), the
cloud halves by plan id, and the end side's measured work per request. The runtime gets these
and never plans.

Example::

    >>> dep = deploy(cal, inputs, {offline: 0}, {offline: None}, offline_plan)   # doctest: +SKIP
    >>> dep.variants[0].profile.min_bits                                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from coach_fx.compiled import CompiledModel
from coach_fx.plan import Plan, evaluate, mean_bytes
from coach_fx.runtime.cloud import CloudPlan
from coach_fx.runtime.config import Bands, CacheConfig, ControlConfig, PolicyConfig
from coach_fx.runtime.features import pooled_features
from coach_fx.runtime.plans import CutProfile, EndHalf, FinishOnEnd, Sizes, Variant
from coach_fx.runtime.policy import OnlinePolicy
from coach_fx.passes.wire_sizes import TENSOR_HEADER_BYTES, packed_nbytes, row_param_bytes, tensor_bytes, token_rows
from coach_fx.runtime.timing import quiet_times

if TYPE_CHECKING:
    from coach_fx.online.analysis import CutAnalysis, CutInfo


@dataclass
class Deployment:
    """Every distinct online plan by id: its offline record (``plans``), its run-time plan
    (``variants``), its cloud half (``cloud``), and the model's output structure."""

    plans: dict[int, Plan]
    variants: dict[int, Variant]
    cloud: dict[int, CloudPlan]
    out_spec: Any


def deploy(cal: "CutAnalysis", inputs: tuple, ids: dict[tuple, int],
           rate_of: dict[tuple, float | None], offline_plan: Plan) -> Deployment:
    """The run-time plans of the cuts in ``ids`` (end set -> plan id), each priced at
    ``rate_of`` its end set (None: the network as given), halves re-measured as whole modules."""
    settings, dag = cal.settings, cal.dag
    net = settings.network
    dep = Deployment({}, {}, {}, None)
    for c, pid in ids.items():
        r = rate_of.get(c)
        s = settings if r is None else settings.replace(network=net.at_rate(r))
        info = cal.info(c)
        p = offline_plan if c == offline_plan.end_nodes else evaluate(
            dag, c, info.min_bits if info.min_bits < 32 else 32, s.network,
            strategy="coach-online", input_bits=min(info.min_bits, settings.input_width))
        cm = CompiledModel(cal.gm, dag, p, s, inputs, cal.oracle)
        if settings.costs == "measured" and settings.remeasure:
            cm.remeasure()
        dep.out_spec = dep.out_spec or cm.out_spec
        v = variant(pid, info, cm.plan.t_end, cm.plan.t_cloud,
                    offline_plan if c == offline_plan.end_nodes else None)
        v.times.host_s = cal.end_host_s(c, cache=False)
        if v.cache is not None:
            v.times.lookup_s = max(0.0, cal.end_host_s(c) - v.times.host_s)
            v.times.hit_s = cal.end_host_s(c, hit=True)
        if not v.end_only:
            # to finish on the end a request the link has no room for (``local`` modes)
            v.finish_on_end = FinishOnEnd(info.cloud, cal.cloud_host_s(c))
        dep.plans[pid], dep.variants[pid] = cm.plan, v
        dep.cloud[pid] = (info.cloud, info.boundary)
    return dep


def coded_share(dag: Any, quantized: Sequence[tuple[str, int]], codec: str | None,
                widths: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """Per bit width, the mean coded share of the packed bytes of the ``quantized`` crossings
    ((DAG node, elements) each; ``LayerDAG.tensor_codecs``, measured on calibration frames;
    unmeasured ones count whole)."""
    if codec is None or not quantized:
        return ()
    out = []
    for b in (w for w in widths if w < 32):
        coded = packed = 0
        for node, numel in quantized:
            # a token tensor's row scales travel uncoded; the measured coded sizes hold them
            p = packed_nbytes(numel, b) + row_param_bytes(dag.info[node].rows, b)
            cost = dag.coded_cost(node, codec, b)
            packed += p
            coded += min(p, cost.average) if cost is not None else p
        if packed:
            out.append((b, coded / packed))
    return tuple(out)


def plan_profile(dag: Any, plan: Plan, min_bits: int | None, input_bits: int,
                 stage_s: tuple[tuple[int, float, float], ...] | None = None) -> CutProfile:
    """The controller's and the simulator's view of an offline ``plan`` (no split made): its
    float crossings are quantized per request (with the plan's lossless codec, at its
    calibrated share), a model input crosses at ``input_bits``, the rest as it is; its own
    widths and codecs send ``mean_bytes`` (``Sizes.own_bytes``)."""
    quant, quant_raw, rows, raw = [], [], [], 0
    for x in plan.cut:
        d = dag.info[x]
        if d.quantizable and x not in dag.inputs:
            quant.append((x, d.numel))
            quant_raw.append(d.bytes)
            rows.append(d.rows)
        else:
            raw += tensor_bytes(d.numel, d.bytes, d.quantizable, input_bits, d.rows) - TENSOR_HEADER_BYTES
    codec = plan.tensor_codec
    sizes = Sizes(tuple(n for _, n in quant), tuple(quant_raw), raw, len(plan.cut), codec,
                  coded_share(dag, quant, codec, [b for b, _, _ in stage_s or ()]), mean_bytes(dag, plan),
                  tuple(rows))
    return CutProfile(sizes, min_bits or 32, plan.t_end, plan.t_cloud, stage_s if quant else None,
                      end_only=len(plan.end_nodes) == len(dag.nodes))


def cut_sizes(dag: Any, boundary: Any, pinned: Sequence[int | None], codec: str | None,
              widths: Sequence[int]) -> Sizes:
    """What one request of a float split sends: its adaptive crossings (``pinned`` None)
    quantized per request (with ``codec`` at its coded share per width in ``widths``), the
    rest as they are."""
    quant_numel, quant_raw, quant_rows, raw_bytes, quantized = [], [], [], 0, []
    for c, b in zip(boundary.crossings, pinned):
        numel = math.prod(c.shape) if c.shape is not None else 0
        raw = numel * c.dtype.itemsize if c.dtype is not None else 8
        if b is None:
            quant_numel.append(numel)
            quant_raw.append(raw)
            quant_rows.append(token_rows(c.shape))
            if c.dtype is not None and c.dtype.is_floating_point and c.shape is not None:
                quantized.append((c.dag_node, numel))
        else:
            raw_bytes += tensor_bytes(numel, raw, True, b, token_rows(c.shape)) - TENSOR_HEADER_BYTES
    return Sizes(tuple(quant_numel), tuple(quant_raw), raw_bytes, len(boundary.crossings),
                 codec, coded_share(dag, quantized, codec, widths), quant_rows=tuple(quant_rows))


def variant(pid: int, info: "CutInfo", t_end: float, t_cloud: float, plan: Plan | None = None,
            cache: Any = None, lookup_split: Any = None) -> Variant:
    """The runtime's view of a cut with these stage times (``cache``/``lookup_split``: instead
    of the cut's chosen ones)."""
    profile = CutProfile(info.sizes, info.min_bits, t_end, t_cloud)
    bits = info.bits
    if plan is not None:     # the offline plan's own bits, crossing by crossing
        bits = dataclasses.replace(bits, plan=tuple(plan.bits.get(c.dag_node, info.min_bits)
                                                    for c in info.boundary.crossings))
    if cache is None:
        cache, lookup_split = info.cache.setup, info.cache.lookup_split
    return Variant(pid, EndHalf(info.end, lookup_split), info.boundary, profile, bits, cache=cache)


def end_paths(v: Any, inputs: tuple, capacity: int, cache: bool = True) -> tuple[float, float | None, float | None]:
    """The end side's work for one request on this host, measured alone (``quiet_times``):
    (no cache: end half, quantize, encode; a miss: the same and the lookup against a full cache
    whose centers nothing hits; a hit answered on the end: the end half up to where the cache
    looks up, and the lookup, nothing quantized or encoded). Without ``cache`` or a cache
    calibration: (no cache, None, None)."""
    if not cache or v.cache is None:
        return end_paths_of([v], inputs, capacity, cache=False)[0], None, None
    plain, ((miss, hit),) = end_paths_of([v], inputs, capacity)
    return plain, miss, hit


def end_paths_of(vs: Sequence[Any], inputs: tuple, capacity: int,
                  cache: bool = True) -> tuple[float, list[tuple[float, float]]]:
    """``end_paths`` of variants of one cut that differ in their cache (where it looks up, its
    thresholds), measured interleaved: (no cache, [(miss, hit) per variant])."""
    x = _one(inputs)
    fns = [end_path(vs[0], x, capacity, False, False)]
    if cache:
        fns += [end_path(v, x, capacity, True, h) for v in vs for h in (False, True)]
    times = quiet_times(fns)
    # a miss does all a plain request does and the lookup, a hit a part of a miss: measured on a
    # shared host each carries its own noise (2x seen under load), which must not order them
    # otherwise (a hit dearer than a miss would make lookups look as if they never paid)
    plain, paths = times[0], []
    for k in range(len(vs) if cache else 0):
        miss = max(times[1 + 2 * k], plain)
        paths.append((miss, min(times[2 + 2 * k], miss)))
    return plain, paths


def _one(inputs: tuple) -> tuple:
    return tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)


def end_path(v: Any, x: tuple, capacity: int, use: bool, hit: bool) -> Callable[[], Any]:
    """One request's end side work as the policy does it (``use``: with the cache, which for
    ``hit`` answers it, else misses), to be timed (``quiet_times``)."""
    p = OnlinePolicy([v], Bands(start=v.plan_id),
                     PolicyConfig(ControlConfig(switching=False),
                                  CacheConfig(enabled=use, capacity=capacity, audit_rate=0.0)))
    if use and v.cache is not None:
        with torch.no_grad():
            if v.end.lookup_split is not None:
                f = pooled_features(list(v.end.lookup_split[0](*x)), v.cache.grid)
            else:
                vals = v.end.module(*x)
                vals = vals if isinstance(vals, tuple) else (vals,)
                f = pooled_features([t for t, b in zip(vals, v.bits.pinned) if b is None], v.cache.grid)
        rng = np.random.default_rng(0)
        # a full cache of centers far from this input, so that it misses; for ``hit`` one
        # of them is the input's own class instead
        for k in range(1 if hit else 0, capacity):
            far = -(f + rng.random(f.shape))
            p.learn(v.plan_id, far / np.linalg.norm(far), k)
        if hit:
            p.learn(v.plan_id, f, 0, torch.zeros(1))

    def run() -> Any:
        with torch.no_grad():
            return p.prepare(0, x)
    return run


__all__ = ["Deployment", "deploy", "end_path", "end_paths", "end_paths_of", "plan_profile", "variant"]
