"""``coach_fx.compile_online``: plans for a few bandwidth bands, compiled up front, with the
calibration the online controller and the semantic cache need (DESIGN.md §6).

What it prepares, per distinct plan (all halves cut from one GraphModule, so they share the
model's weights):

* an end half that returns the crossing tensors *unquantized* and a cloud half that takes
  them: the runtime quantizes each request with the bits the controller picks
  (``coach::quantize``/``pack`` on the end, ``unpack``/``dequantize`` before the cloud half);
* the accuracy-safe minimum bits (the planner's accuracy oracle: ``accuracy_budget`` ×
  (1 - ``cache_share``) on the calibration data);
* the semantic cache's hit thresholds, calibrated by replaying a calibration stream with
  temporal locality through a cache of the deployed capacity, so that wrong hits stay within
  ``accuracy_budget`` × ``cache_share``; and the similarity bands whose samples stay safe
  with fewer bits;
* the stage times of its halves, measured on this host as whole modules.

Example::

    >>> om = coach_fx.compile_online(model, (x,), network=coach_fx.Network.from_trace(path),
    ...                              end=coach_fx.Device("pi", 10), calibration=(xc, yc))  # doctest: +SKIP
    >>> outs, stats, policy = om.stream(frames, mode="full")                              # doctest: +SKIP
    >>> print(om.report())                                                                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

from coach_fx.accuracy import AccuracyOracle
from coach_fx.compiled import CompiledModel, InputError, plan_model, prepare
from coach_fx.costs import torch_threads
from coach_fx.passes.ops import QUANT_BITS, fake_quantize_per_sample, packed_nbytes
from coach_fx.passes.partition import partition
from coach_fx.plan import Plan, evaluate
from coach_fx.settings import Network, Settings

#: A band gets its own plan only when that plan's period there is this much shorter than the
#: offline plan's.
SWITCH_GAIN = 0.9

#: The cache may look up at a node before the cut (a hit then skips the rest of the end half)
#: when its calibrated hit rate is at least this share of the cut's own: a hit also spares the
#: link and the cloud, which an earlier node with fewer hits would give away.
PROBE_HITS = 0.75

#: Frames in each of the two replayed calibration streams the cache's thresholds are tuned on.
#: Wrong hits come from a few confusable samples; a short stream may hold none of them (with
#: 1000 frames thresholds passed that went wrong 3x as often on unseen data).
CALIBRATION_FRAMES = 4000

#: The four ways ``OnlineModel.stream`` runs, for comparison (issue #5's variants). ``local``
#: (with adaptive control): a request that finds the link backlogged or stalled is finished on
#: the end device instead of waiting (per request, the end-only plan for the rest of the model).
MODES = {
    "fixed": dict(adaptive=False, switching=False, cache=False, similarity_bits=False, local=False),
    "adaptive": dict(adaptive=True, switching=True, cache=False, similarity_bits=False, local=True),
    "cache": dict(adaptive=False, switching=False, cache=True, similarity_bits=False, local=False),
    "full": dict(adaptive=True, switching=True, cache=True, similarity_bits=True, local=True),
}


def band_rates(network: Network, n: int = 5) -> list[float]:
    """Representative uplink rates to plan for: a trace's time-weighted quantiles (10 %..90 %),
    or the fixed rate × 1/4..4."""
    tr = network.trace
    if tr is None or not math.isfinite(tr.duration):
        return [network.uplink_mbps * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)][:n]
    return sorted({max(r, 1e-3) for r in tr.quantiles([(k + 0.5) / n for k in range(n)])})


def _batched(fn: Callable[..., Any], inputs: tuple, batch: int) -> list[Any]:
    """``fn`` over the calibration inputs, ``batch`` samples at a time; one result per call."""
    n = inputs[0].shape[0]
    with torch.no_grad():
        return [fn(*(x[i:i + batch] for x in inputs)) for i in range(0, n, batch)]


class OnlineModel:
    """Plans for bandwidth bands and everything the online runtime needs to run them.

    ``plans`` / ``variants``: by plan id; ``bands[with_cache]``: (edges in Mbit/s, plan ids),
    n edges and n + 1 plans, for running with and without the semantic cache; ``fixed``: the
    id of the plan for the network as given (its mean rate), what the ``"fixed"`` mode runs
    and where every mode starts.
    """

    def __init__(self, gm: Any, dag: Any, settings: Settings, plans: dict[int, Plan],
                 variants: dict[int, Any], cloud: dict[int, tuple],
                 bands: dict[bool, tuple[list[float], list[int]]], fixed: int,
                 example_inputs: tuple, out_spec: Any, capacity: int, audit_rate: float,
                 hold: int) -> None:
        self.gm, self.dag, self.settings = gm, dag, settings
        self.plans, self.variants, self.cloud = plans, variants, cloud
        self.bands, self.fixed = bands, fixed
        self.example_inputs, self.out_spec = example_inputs, out_spec
        self.capacity, self.audit_rate, self.hold = capacity, audit_rate, hold

    def policy(self, mode: str = "full", seed: int = 0) -> Any:
        """A fresh :class:`coach_fx.runtime.online.OnlinePolicy` for ``mode`` (see ``MODES``)."""
        from coach_fx.runtime.online import OnlinePolicy
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        edges, band_plans = self.bands[MODES[mode]["cache"]]
        return OnlinePolicy(list(self.variants.values()), edges, band_plans,
                            start=self.fixed, capacity=self.capacity, audit_rate=self.audit_rate,
                            hold=self.hold, seed=seed, end_slowdown=self.settings.end.slowdown,
                            **MODES[mode])

    def stream(self, frames: Iterable[Any], *, mode: str = "full", link: Any = None,
               timeout_s: float = 30.0, queue_size: int = 2, seed: int = 0,
               duration_s: float | None = None) -> tuple[list[Any], Any, Any]:
        """Run ``frames`` end -> link -> cloud in-process with the online policy of ``mode``.

        The link defaults to an in-process one following the compile-time network (its trace).
        ``duration_s``: stop taking frames once this long has passed since the first (a stream
        over a fixed stretch of a trace: every mode then sees the same bandwidth over the same
        time, however fast it goes); the frames taken are all answered.
        Returns (outputs in order, :class:`~coach_fx.runtime.pipeline.Stats`, the policy, whose
        ``summary()`` tells hits, bits and switches).
        """
        from coach_fx.runtime.link import InProcessLink
        from coach_fx.runtime.pipeline import CloudWorker, EndWorker, run_session

        def feed() -> Iterator[tuple]:
            stop = None
            for x in frames:
                x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
                _check(x, self.example_inputs)
                if duration_s is not None:
                    now = time.perf_counter()
                    if stop is None:
                        stop = now + duration_s
                    elif now >= stop:
                        return
                yield x

        xs = feed()
        link = link or InProcessLink.for_network(self.settings.network)
        policy = self.policy(mode, seed)
        with torch_threads(self.settings.threads):
            # the cloud batches requests that arrive together (while it falls behind)
            cloud = CloudWorker(None, None, link.cloud, slowdown=self.settings.cloud.slowdown,
                                plans=self.cloud, adaptive=True, max_batch=8).start()
            end = EndWorker(None, None, link.end, self.out_spec, slowdown=self.settings.end.slowdown,
                            queue_size=queue_size, timeout_s=timeout_s, policy=policy)
            outs, stats = run_session(end, cloud, xs)
        return outs, stats, policy

    def report(self) -> str:
        """The bands, their plans and each plan's calibration as tables."""
        out = []
        for with_cache in sorted(set(self.bands), reverse=True):
            edges, band_plans = self.bands[with_cache]
            if not with_cache and self.bands[False] == self.bands[True]:
                continue
            rows = []
            lims = [0.0] + list(edges) + [math.inf]
            for k, pid in enumerate(band_plans):
                rows.append([f"{lims[k]:.2f}-{lims[k + 1]:.2f}", pid])
            out.append(("with the cache" if with_cache else "without the cache") + ": "
                       + ", ".join(f"{b} Mbit/s -> plan {p}" for b, p in rows))
        rows = []
        for pid, p in self.plans.items():
            v = self.variants[pid]
            c = v.cache
            slow = self.settings.end.slowdown * 1e3
            rows.append([pid, ", ".join(p.cut) or "nothing (end-only)", v.profile.min_bits,
                         (v.reference_s or 0) * slow,
                         f"+{v.lookup_s * slow:.2f} / {v.hit_s * slow:.2f}" if v.hit_s is not None else "-",
                         p.t_cloud * 1e3,
                         f"{v.local_s * slow:.2f}" if v.local_s is not None else "-",
                         f"{c.hit_rate:.0%} @ sim>={c.sim_threshold}, margin>={c.margin}, grid {c.grid}"
                         + (f", at {c.at}" if c.at else "") + (", context" if c.context else "")
                         if c else "off",
                         " ".join(f"{e}:{b}b" for e, b in c.bits_by_similarity) if c else "-"])
        head = (f"online plans: {len(self.plans)} distinct; fixed plan {self.fixed} (for the network "
                f"as given, {self.settings.network.uplink_mbps:.2f} Mbit/s)\n" + "\n".join(out))
        return head + "\n" + tabulate(rows, headers=["plan", "cut", "min bits", "end ms",
                                                     "lookup / hit ms", "cloud ms", "rest on end ms",
                                                     "cache hits (calib.)",
                                                     "similarity -> bits"], floatfmt=".2f")


def _check(x: tuple, example: tuple) -> None:
    for i, (a, e) in enumerate(zip(x, example)):
        if isinstance(e, torch.Tensor) and (not isinstance(a, torch.Tensor) or a.shape != e.shape
                                            or a.dtype != e.dtype):
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise InputError(f"input {i} is {got}; expected shape {tuple(e.shape)} and dtype {e.dtype}")
    if len(x) != len(example):
        raise InputError(f"expected {len(example)} input(s), got {len(x)}")


def compile_online(model: nn.Module, example_inputs: Any, *, network: Network | None = None,
                   end: Any = None, cloud: Any = None, calibration: Any = None,
                   accuracy_budget: float = 0.005, cache_share: float = 0.5,
                   bands_mbps: Sequence[float] | None = None, cache: bool = True,
                   grid: int | Sequence[int] = (2, 4, 8),
                   capacity: int = 16, audit_rate: float = 0.1, hold: int = 5,
                   locality: float = 10.0, calibration_frames: int = CALIBRATION_FRAMES,
                   **options: Any) -> OnlineModel:
    """Compile ``model`` for online control: a plan per bandwidth band, sharing weights.

    ``calibration``: (inputs, labels) batched on dim 0 (required: bits and cache thresholds are
    calibrated on it; the budget counts answers that differ from the unquantized model's, so
    the labels only serve the offline planner). ``bands_mbps``: the rates to plan for
    (default: ``band_rates``); switching happens at the geometric midpoints between them.
    ``capacity``: classes the cache holds (streams have temporal locality: the recent ones);
    ``grid``: the pooling grid(s) of the cache's features (per plan the one that hits most);
    ``locality``: mean frames a class persists in the calibration stream the thresholds are
    tuned on; ``calibration_frames``: that stream's length (each of two; longer: thresholds
    that hold better on unseen data, for a longer compile). Other keywords are
    :class:`coach_fx.Settings` fields.

    With ``cache``, a band's plan is chosen cache-aware: among the planner's plans and the
    single-tensor cuts, the one whose period is shortest once the calibrated hit rate takes
    its share of requests off the link and the cloud (a deeper cut often has features that
    hit far more often, for a little more end time). Each plan's cache thresholds are tuned
    on the replayed streams, with answers learned ``RESULT_LAG`` requests late as in the
    pipeline, once for a plain cache and once for a context-aware one (hits only for the
    stream's latest known class); the one that hits more within the budget is kept.
    """
    if calibration is None:
        raise ValueError("compile_online needs calibration=(inputs, labels): the safe bits and the "
                         "cache's thresholds are calibrated on it")
    if not 0 <= cache_share < 1:
        raise ValueError(f"cache_share must be in [0, 1), got {cache_share}")
    bits_budget = accuracy_budget * (1 - cache_share if cache else 1)
    # The budget counts answers that differ from the unquantized model's (a stream repeats what
    # it sees: every changed answer costs), so the planner's oracle runs in agreement mode.
    calib_inputs = calibration[0] if isinstance(calibration, (tuple, list)) and len(calibration) == 2 \
        else calibration
    kw: dict[str, Any] = dict(accuracy_budget=bits_budget, calibration=(calib_inputs, None))
    # Online plans keep the raw 8-bit input (the per-request controller re-quantizes crossings;
    # an image codec's size varies per frame) and the measured disagreement as their check:
    # the cache takes part of the budget, which leaves too few calibration samples for the
    # confidence bound of ``coach_fx.accuracy`` at the bits' share (pass
    # ``accuracy_confidence`` to ask for it).
    options.setdefault("input_codecs", ())
    options.setdefault("accuracy_confidence", None)
    for k, v in (("network", network), ("end", end), ("cloud", cloud)):
        if v is not None:
            kw[k] = v
    settings = Settings.from_options(options, **kw)
    gm, inputs, dag = prepare(model, example_inputs, settings)
    oracle = AccuracyOracle(gm, dag, settings, inputs)
    net = settings.network
    rates = sorted(bands_mbps) if bands_mbps is not None else band_rates(net)
    if not rates or min(rates) <= 0:
        raise ValueError(f"bands_mbps must be positive rates, got {rates}")
    cal = _Calibration(gm, dag, oracle, settings, bits_budget, accuracy_budget * cache_share,
                       grid, capacity, audit_rate, locality, cache, calibration_frames)
    # measure with the threads the streams will use (the halves' times decide the plans)
    with torch_threads(settings.threads):
        return _compile(gm, inputs, dag, settings, oracle, cal, rates, cache, capacity,
                        audit_rate, hold)


def _compile(gm: Any, inputs: tuple, dag: Any, settings: Settings, oracle: AccuracyOracle,
             cal: "_Calibration", rates: list[float], cache: bool, capacity: int,
             audit_rate: float, hold: int) -> OnlineModel:
    net = settings.network

    def at(rate: float) -> Settings:
        return dataclasses.replace(settings, network=Network(rate, net.downlink_mbps, net.rtt_ms))

    # the offline plan for the network as given, and the planner's plan for each band
    offline_plan = plan_model(gm, inputs, dag, settings, oracle=oracle)[0]
    offline = offline_plan.end_nodes
    planned = {r: plan_model(gm, inputs, dag, at(r), oracle=oracle)[0].end_nodes for r in rates}
    candidates = {offline, *planned.values()}
    if cache:
        # cloud-only and the single-tensor cuts whose end work alone is shorter than the
        # slowest band's planned period: the others cannot win whatever their hit rate
        slowest = max(cal.expected(planned[r], r, with_cache=False)[0] for r in rates)
        for c in [(), *(tuple(v for v in dag.nodes if v in dag.ancestors([a]))
                        for a in dag.articulation_nodes())]:
            if c in candidates:
                continue
            if cal.end_time(c) < slowest:
                candidates.add(c)
    # per band the plan with the shortest expected period: once as the cache will run (its
    # hits take requests off the link and the cloud), once without it (the modes that run
    # without the cache follow these bands)
    chosen: dict[bool, dict[float, tuple]] = {}
    for with_cache in ([False, True] if cache else [False]):
        chosen[with_cache] = {}
        for r in rates:
            best = None
            for c in sorted(candidates, key=len):
                score = cal.expected(c, r, with_cache)
                if score is not None and (best is None or score < best[0]):
                    best = (score, c)
            c = best[1] if best else planned[r]
            base = cal.expected(offline, r, with_cache)
            # leave the offline plan only for a clear gain: a switch follows the estimate with
            # a lag, and a plan a few percent better at the band's rate can lose that back
            if best is not None and base is not None and best[0][0] > SWITCH_GAIN * base[0]:
                c = offline
            chosen[with_cache][r] = c

    ids: dict[tuple[str, ...], int] = {}
    for c in [offline, *chosen[False].values(), *chosen.get(True, {}).values()]:
        ids.setdefault(c, len(ids))
    bands = {}
    for with_cache, by_rate in chosen.items():
        band_ids = [ids[by_rate[r]] for r in rates]
        edges, band_plans = [], [band_ids[0]]
        for (r0, r1), pid in zip(zip(rates, rates[1:]), band_ids[1:]):
            if pid != band_plans[-1]:      # neighbouring bands with one plan are one band
                edges.append(math.sqrt(r0 * r1))
                band_plans.append(pid)
        bands[with_cache] = (edges, band_plans)
    bands.setdefault(True, bands[False])

    plans, variants, cloud_plans = {}, {}, {}
    out_spec = None
    for c, pid in ids.items():
        # price it at the rate of a band it serves (the offline plan: the network as given)
        r = next((r for by_rate in chosen.values() for r in rates if by_rate[r] == c), None)
        s = settings if r is None else at(r)
        info = cal.info(c)
        p = offline_plan if c == offline else evaluate(
            dag, c, info.min_bits if info.min_bits < 32 else 32, s.network,
            strategy="coach-online", input_bits=min(info.min_bits, settings.input_bits))
        cm = CompiledModel(gm, dag, p, s, inputs, oracle)
        if settings.costs == "measured" and settings.calibrate:
            cm.calibrate()
        out_spec = out_spec or cm.out_spec
        v = _variant(pid, info, max(cm.plan.t_end, cm.plan.t_cloud),
                     offline_plan if c == offline else None)
        v.reference_s = cal.end_host_s(c, cache=False)
        if v.cache is not None:
            v.lookup_s = max(0.0, cal.end_host_s(c) - v.reference_s)
            v.hit_s = cal.end_host_s(c, hit=True)
        if not v.end_only:
            # to finish on the end a request the link has no room for (``local`` modes)
            v.local_module, v.local_s = info.cloud, cal.cloud_host_s(c)
        plans[pid], variants[pid] = cm.plan, v
        cloud_plans[pid] = (info.cloud, info.boundary)
    return OnlineModel(gm, dag, settings, plans, variants, cloud_plans, bands, ids[offline],
                       inputs, out_spec, capacity, audit_rate, hold)


@dataclasses.dataclass
class _CutInfo:
    end: Any
    cloud: Any
    boundary: Any
    fixed_bits: tuple
    min_bits: int
    cache: Any            # CacheSetup or None: the one the plan runs (see ``probe``)
    caps: tuple = ()
    calibrated: bool = False
    vals: Any = None      # the end half's outputs on the calibration data (until calibrated)
    agrees: Any = None    # per bits, per calibration sample: the answer stays the model's
    sims: Any = None      # per calibration sample: top-1 similarity to the class centers here
    probe: Any = None     # (head, tail) of the end half where its cache looks up, if before the cut
    own_cache: Any = None  # the cache calibrated at the cut itself
    probed: bool = False


class _Calibration:
    """Per end set: the float split, the safe bits (per-sample quantization, as deployed) and
    the cache's calibration; memoized, since the bands share most candidates."""

    def __init__(self, gm: Any, dag: Any, oracle: AccuracyOracle, settings: Settings,
                 bits_budget: float, cache_budget: float, grid: int, capacity: int,
                 audit_rate: float, locality: float, cache: bool,
                 frames: int = CALIBRATION_FRAMES) -> None:
        self.gm, self.dag, self.oracle, self.settings = gm, dag, oracle, settings
        self.frames = frames
        self.bits_budget, self.cache_budget = bits_budget, cache_budget
        self.grids = (grid,) if isinstance(grid, int) else tuple(grid)
        self.capacity, self.audit_rate, self.locality = capacity, audit_rate, locality
        self.cache = cache
        self.labels = oracle.reference.argmax(1)
        self.example = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() else t
                             for t in oracle.inputs)
        self._info: dict[tuple, _CutInfo] = {}
        self._times: dict[tuple, float] = {}

    def info(self, end_nodes: tuple, with_cache: bool = True, probe: bool = True) -> _CutInfo:
        """The split, its safe bits and (``with_cache``) its cache calibration, and (``probe``)
        where in the end half the cache looks up (see ``_pick_probe``); memoized."""
        info = self._info.get(end_nodes)
        if info is None:
            end32, cloud32, boundary = partition(self.gm, end_nodes, {})
            fixed_bits = tuple(_fixed_bits(self.dag, c, self.settings) for c in boundary.crossings)
            info = _CutInfo(end32, cloud32, boundary, fixed_bits, 32, None,
                            _caps(self.dag, boundary, self.settings))
            if not boundary.end_only and any(b is None for b in fixed_bits):
                info.vals = [x if isinstance(x, tuple) else (x,)
                             for x in _batched(end32, self.oracle.inputs, self.oracle.batch)]
                info.agrees = self._agreement(cloud32, info.vals, fixed_bits, info.caps)
                # the fewest bits that pass, as the planner's binary search finds them
                info.min_bits = next((b for b in QUANT_BITS
                                      if 1 - info.agrees[b].float().mean().item() <= self.bits_budget), 32)
            self._info[end_nodes] = info
        if with_cache and self.cache and not info.calibrated:
            info.calibrated = True
            if info.vals is not None:
                info.cache, info.sims = self._cache(info.vals, info.fixed_bits, info.agrees, info.min_bits)
                info.own_cache = info.cache
            info.vals = None    # only the calibration needs them
        if with_cache and self.cache and probe and not info.probed:
            info.probed = True
            self._pick_probe(end_nodes, info)
        return info

    def _pick_probe(self, end_nodes: tuple, info: _CutInfo) -> None:
        """Where in the end half the cache looks up: at the cut, or at an earlier node that
        splits the end half (an articulation) with features of its own calibration that hit
        nearly as often (``PROBE_HITS``: hits also spare the link and the cloud); the one whose
        mean end work per request is least (a hit there skips the rest of the end half, a miss
        pays the split). The near-miss bits are the cut's, by the earlier node's similarity.
        Measured here, interleaved (the cost model's end compute with analytic costs); the
        winner's times are memoized."""
        from coach_fx.passes.split import SplitError, split_at
        from coach_fx.runtime.cache import SemanticCache
        from coach_fx.runtime.online import mean_end_s
        if info.boundary.end_only or info.agrees is None:
            return
        own = info.own_cache          # (``info.cache`` becomes the chosen one, maybe a probe's)
        options: list[tuple[Any, Any, tuple]] = [(own, None, end_nodes)] if own is not None else []
        inside = set(end_nodes)
        for a in self.dag.articulation_nodes():
            nodes = tuple(v for v in self.dag.nodes if v in self.dag.ancestors([a]))
            if not set(nodes) < inside:
                continue
            at = self.info(nodes, True, probe=False)
            if at.own_cache is None or at.sims is None or len(at.boundary.crossings) != 1 \
                    or at.fixed_bits[0] is not None:
                continue
            try:
                head_tail = split_at(info.end, at.boundary.crossings[0].name)
            except SplitError:
                continue
            if own is not None and at.own_cache.hit_rate < PROBE_HITS * own.hit_rate:
                continue
            bands = SemanticCache.similarity_bits(at.sims, info.agrees, info.min_bits, self.bits_budget)
            options.append((dataclasses.replace(at.own_cache, bits_by_similarity=bands, at=a), head_tail, nodes))
        if not options:
            return
        answered = [c.hit_rate * (1 - self.audit_rate) for c, _, _ in options]
        if self.settings.costs == "measured":
            plain, paths = _end_paths_of([_variant(0, info, 0.0, cache=c, probe=p) for c, p, _ in options],
                                         self.example, self.capacity)
            k = min(range(len(options)), key=lambda k: mean_end_s(*paths[k], answered[k]))
            self._times[("end", end_nodes, False, False)] = plain
            self._times[("end", end_nodes, True, False)], self._times[("end", end_nodes, True, True)] = paths[k]
        else:
            # the cost model's end compute: a hit runs the end half up to the probe
            t_cut = evaluate(self.dag, end_nodes, 32, Network(1.0)).t_end
            k = min(range(len(options)), key=lambda k: mean_end_s(
                t_cut, evaluate(self.dag, options[k][2], 32, Network(1.0)).t_end, answered[k]))
        info.cache, info.probe = options[k][:2]

    def _agreement(self, cloud32: Any, vals: list[tuple], fixed_bits: tuple,
                   caps: tuple) -> dict[int, torch.Tensor]:
        """Per bit width, per calibration sample: does the cloud's answer equal the unquantized
        model's when each sample's crossing tensors are quantized on their own?"""
        out = {}
        with torch.no_grad():
            for b in QUANT_BITS:
                preds = []
                for chunk in vals:
                    args = [fake_quantize_per_sample(t, min(b, cap or 32) if fb is None else fb)
                            if isinstance(t, torch.Tensor) else t
                            for t, fb, cap in zip(chunk, fixed_bits, caps)]
                    preds.append(_flat(cloud32(*args)).argmax(1))
                out[b] = torch.cat(preds) == self.labels
        return out

    def _cache(self, vals: list[tuple], fixed_bits: tuple, agrees: dict, min_bits: int) -> tuple[Any, Any]:
        """Hit thresholds on a replayed calibration stream; similarity bands -> fewer safe bits.
        Returns (the setup, each sample's top-1 similarity to the class centers), or Nones."""
        from coach_fx.runtime.cache import SemanticCache, locality_stream, pooled_features
        from coach_fx.runtime.online import CacheSetup

        adaptive = [k for k, b in enumerate(fixed_bits) if b is None]
        labels = self.labels
        # two streams from disjoint halves of the calibration data: thresholds must pass both
        n = len(labels)
        streams = []
        for h in (0, 1):
            idx = torch.arange(h, n, 2)
            streams.append([int(idx[i]) for i in locality_stream(labels[idx], max(self.frames, 3 * len(idx)),
                                                                 self.locality, seed=1 + h)])
        best = None
        for grid in self.grids:
            feats = torch.from_numpy(np.concatenate(
                [np.atleast_2d(pooled_features([chunk[k] for k in adaptive], grid)) for chunk in vals]
            )).float()
            for context in (False, True):
                st, mg, rate = SemanticCache.calibrate_on_stream(
                    feats, labels, streams, self.cache_budget, self.capacity, self.audit_rate,
                    context=context)
                if rate > 0 and (best is None or rate > best[2]):
                    best = (st, mg, rate, grid, feats, context)
        if best is None:
            return None, None
        st, mg, rate, grid, feats, context = best
        classes = sorted(set(labels.tolist()))
        centers = torch.stack([torch.nn.functional.normalize(feats[labels == c].mean(0), dim=0)
                               for c in classes])
        sim = (feats @ centers.T).max(1).values
        bands = SemanticCache.similarity_bits(sim, agrees, min_bits, self.bits_budget)
        return CacheSetup(st, mg, rate, bands, grid, context=context), sim

    def end_time(self, end_nodes: tuple) -> float:
        """The end stage without the cache (measured, or the cost model's with analytic costs)."""
        if self.settings.costs == "measured":
            return self.end_host_s(end_nodes, cache=False) * self.settings.end.slowdown
        return evaluate(self.dag, end_nodes, 32, Network(1.0)).t_end

    def expected(self, end_nodes: tuple, rate: float, with_cache: bool = True) -> tuple[float, float] | None:
        """(period, latency) at ``rate`` with the calibrated hit rate taking its share of
        requests off the link and the cloud; None when no bits are safe."""
        info = self.info(end_nodes, with_cache)
        if info.min_bits >= 32 and any(b is None for b in info.fixed_bits):
            return None
        # model inputs that cross are quantized like the rest, up to their source's bits
        p = evaluate(self.dag, end_nodes, info.min_bits, Network(rate),
                     input_bits=min(info.min_bits, self.settings.input_bits))
        t_end, t_cloud = p.t_end, p.t_cloud
        if self.settings.costs == "measured" and not info.boundary.end_only:
            # the per-node sums miss the per-request work around the halves (quantize, encode,
            # the cache lookup), which decides between close cuts on a slow end device
            t_end = self.end_host_s(end_nodes, False) * self.settings.end.slowdown
            t_cloud = self.cloud_host_s(end_nodes) * self.settings.cloud.slowdown
        plain = (max(t_end, p.t_link, t_cloud), t_end + p.t_link + t_cloud)
        if info.cache is None or not with_cache:
            return plain
        # with the cache: its lookups cost end time, its hits save link and cloud time (the
        # runtime skips lookups while they do not pay, so never worse than without)
        sent = 1.0 - info.cache.hit_rate * (1 - self.audit_rate)
        if self.settings.costs == "measured":
            t_end = self.end_cached_s(end_nodes) * self.settings.end.slowdown
        cached = (max(t_end, p.t_link * sent, t_cloud * sent), t_end + sent * (p.t_link + t_cloud))
        return min(plain, cached)

    def end_host_s(self, end_nodes: tuple, cache: bool = True, hit: bool = False) -> float:
        """The end side's work per request on this host (see ``_end_paths``; ``hit``: a hit's,
        with ``cache``); memoized."""
        key = ("end", end_nodes, cache, hit and cache)
        if key not in self._times:
            info = self.info(end_nodes, cache)      # with the cache: may measure them (a probe)
        if key not in self._times:
            plain, miss, hit_s = _end_paths(_variant(0, info, 0.0), self.example, self.capacity, cache)
            self._times[("end", end_nodes, False, False)] = plain
            if cache:
                self._times[("end", end_nodes, True, False)] = miss if miss is not None else plain
                self._times[("end", end_nodes, True, True)] = hit_s if hit_s is not None else plain
        return self._times[key]

    def end_cached_s(self, end_nodes: tuple) -> float:
        """The mean end work per request on this host with the cache: a hit answered on the end
        skips quantize and encode; an audited hit and a miss do all of it (calibrated hit rate)."""
        from coach_fx.runtime.online import mean_end_s
        info = self.info(end_nodes)
        if info.cache is None:
            return self.end_host_s(end_nodes, cache=False)
        return mean_end_s(self.end_host_s(end_nodes), self.end_host_s(end_nodes, hit=True),
                          info.cache.hit_rate * (1 - self.audit_rate))

    def cloud_host_s(self, end_nodes: tuple) -> float:
        """The cloud half on one request's crossing values, on this host; memoized."""
        key = ("cloud", end_nodes)
        if key not in self._times:
            info = self.info(end_nodes, with_cache=False)
            vals = info.end(*self.example)
            vals = vals if isinstance(vals, tuple) else (vals,)
            with torch.no_grad():
                self._times[key] = _quiet_time(lambda: info.cloud(*vals))
        return self._times[key]


def _fixed_bits(dag: Any, c: Any, settings: Settings) -> int | None:
    """None for a float tensor, whose bits the controller picks (a model input too, up to
    ``Settings.input_bits``: see ``_caps``); everything else goes as it is (32)."""
    is_float = c.shape is not None and c.dtype is not None and c.dtype.is_floating_point
    return None if is_float else 32


def _caps(dag: Any, boundary: Any, settings: Settings) -> tuple[int | None, ...]:
    """A model input is worth at most ``Settings.input_bits`` (the bits of its source); fewer
    when the link is slow and accuracy allows, like any crossing tensor."""
    return tuple(settings.input_bits if c.dag_node in dag.inputs else None for c in boundary.crossings)


def _flat(out: Any) -> torch.Tensor:
    from coach_fx._compat import tree_flatten
    t = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)][0]
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


def _variant(pid: int, info: "_CutInfo", compute_s: float, plan: Plan | None = None,
             cache: Any = None, probe: Any = None) -> Any:
    """The runtime's view of a cut (``cache``/``probe``: instead of the cut's chosen ones)."""
    from coach_fx.runtime.controller import CutProfile
    from coach_fx.runtime.online import Variant

    quant_numel = raw_bytes = 0
    for c, b in zip(info.boundary.crossings, info.fixed_bits):
        numel = math.prod(c.shape) if c.shape is not None else 0
        if b is None:
            quant_numel += numel
        elif b < 32:
            raw_bytes += packed_nbytes(numel, b)
        else:
            raw_bytes += numel * c.dtype.itemsize if c.dtype is not None else 8
    profile = CutProfile(quant_numel, raw_bytes, len(info.boundary.crossings), info.min_bits,
                         compute_s)
    plan_bits: int | tuple[int, ...] = info.min_bits
    if plan is not None:     # the offline plan's own bits, crossing by crossing
        plan_bits = tuple(plan.bits.get(c.dag_node, info.min_bits) for c in info.boundary.crossings)
    if cache is None:
        cache, probe = info.cache, info.probe
    return Variant(pid, info.end, info.boundary, profile, info.fixed_bits, plan_bits,
                   cache=cache, end_only=info.boundary.end_only, caps=info.caps, probe=probe)


def _quiet_times(fns: Sequence[Callable[[], Any]], repeat: int = 20, warmup: int = 10,
                 rounds: int = 10, pause_s: float = 0.04) -> list[float]:
    """The time of each of ``fns`` alone on this host: per function the lowest of ``rounds``
    lower quartiles of ``repeat`` runs each, with the garbage collector held off (as ``timeit``
    does). On a shared machine runs carry other processes' load, sometimes for a whole round;
    the emulated device's time is this × its slowdown, so that noise would be multiplied too,
    and would decide between plans. The functions take their rounds in turn, with a pause
    between rounds, so that a burst of load longer than a round cannot hit all of one's
    rounds, and paths compared with each other (a hit, a miss, no cache) see the same host.
    A host slowed down for longer than all the rounds (seconds, seen here) is caught by a fixed
    reference workload timed before and after each round: each round's times are scaled by
    how much slower than its best the reference ran then (the faster of its two timings, so
    that a burst on the reference alone does not make the round look fast)."""
    quart = [[] for _ in fns]
    speed = []
    was = gc.isenabled()
    gc.disable()

    def lower_quartile(fn: Callable[[], Any], n: int, skip: int) -> float:
        ts = []
        for _ in range(skip + n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.quantiles(ts[-n:], n=4)[0]

    try:
        for r in range(rounds):
            before = lower_quartile(_reference_work, repeat, warmup if r == 0 else 0)
            for k, fn in enumerate(fns):
                quart[k].append(lower_quartile(fn, repeat, warmup if r == 0 else 0))
            speed.append(min(before, lower_quartile(_reference_work, repeat, 0)))
            time.sleep(pause_s)
    finally:
        if was:
            gc.enable()
    fastest = min(speed)
    return [min(q * fastest / s for q, s in zip(qs, speed)) for qs in quart]


_REF = (torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3), np.random.default_rng(0).random(256))


def _reference_work() -> None:
    """A fixed request-sized mix of what the measured paths do (a small convolution, numpy on
    a short vector, interpreter work), to tell how fast the host runs at the moment."""
    with torch.no_grad():
        torch.nn.functional.conv2d(_REF[0], _REF[1], padding=1)
    float(_REF[2] @ _REF[2])
    sum(range(100))


def _quiet_time(fn: Callable[[], Any], **kw: Any) -> float:
    """``_quiet_times`` of one function."""
    return _quiet_times([fn], **kw)[0]


def _end_paths(v: Any, inputs: tuple, capacity: int, cache: bool = True) -> tuple[float, float | None, float | None]:
    """The end side's work for one request on this host, measured alone (``_quiet_times``):
    (no cache: end half, quantize, encode; a miss: the same and the lookup against a full cache
    whose centers nothing hits; a hit answered on the end: the end half up to where the cache
    looks up, and the lookup, nothing quantized or encoded). Without ``cache`` or a cache
    calibration: (no cache, None, None)."""
    if not cache or v.cache is None:
        return _end_paths_of([v], inputs, capacity, cache=False)[0], None, None
    plain, ((miss, hit),) = _end_paths_of([v], inputs, capacity)
    return plain, miss, hit


def _end_paths_of(vs: Sequence[Any], inputs: tuple, capacity: int,
                  cache: bool = True) -> tuple[float, list[tuple[float, float]]]:
    """``_end_paths`` of variants of one cut that differ in their cache (where it looks up, its
    thresholds), measured interleaved: (no cache, [(miss, hit) per variant])."""
    from coach_fx.runtime.cache import pooled_features
    from coach_fx.runtime.online import OnlinePolicy
    x = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)

    def policy(v: Any, use: bool, hit: bool) -> Any:
        p = OnlinePolicy([v], start=v.plan_id, switching=False, capacity=capacity,
                         audit_rate=0.0, cache=use)
        store = p.caches.get(v.plan_id) if use else None
        if store is not None:
            if v.probe is not None:
                f = pooled_features(list(v.probe[0](*x)), v.cache.grid)
            else:
                vals = v.end_module(*x)
                vals = vals if isinstance(vals, tuple) else (vals,)
                f = pooled_features([t for t, b in zip(vals, v.fixed_bits) if b is None], v.cache.grid)
            rng = np.random.default_rng(0)
            # a full cache of centers far from this input, so that it misses; for ``hit`` one
            # of them is the input's own class instead
            for k in range(1 if hit else 0, capacity):
                far = -(f + rng.random(f.shape))
                store.confirm(far / np.linalg.norm(far), k)
            if hit:
                store.confirm(f, 0)
                p.answers[0] = torch.zeros(1)
        return p

    policies = [policy(vs[0], False, False)]
    if cache:
        policies += [policy(v, True, h) for v in vs for h in (False, True)]
    with torch.no_grad():
        times = _quiet_times([lambda p=p: p.prepare(0, x) for p in policies])
    return times[0], [(times[1 + 2 * k], times[2 + 2 * k]) for k in range(len(vs))] if cache else []


__all__ = ["compile_online", "OnlineModel", "MODES", "SWITCH_GAIN", "PROBE_HITS", "CALIBRATION_FRAMES",
           "band_rates"]
