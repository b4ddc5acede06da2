"""Per candidate cut, what online control needs to know (memoized, since the bands share most
candidates): the float split, the safe bits under per-sample quantization as deployed, the
semantic cache's calibration and where in the end half it looks up, and the halves' times on
this host. ``coach_fx.online.bands`` chooses plans with it; ``coach_fx.online.deploy`` turns
the chosen ones into run-time plans.

Example::

    >>> cal = CutAnalysis(gm, dag, oracle, settings, OnlineSettings.of(...))   # doctest: +SKIP
    >>> cal.expected(end_nodes, rate=2.0)          # (period, latency) with the cache   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable

import numpy as np
import torch

from coach_fx.passes._compat import tree_flatten
from coach_fx.accuracy import AccuracyOracle
from coach_fx.online.cache_calibration import ThresholdSearch, safe_floor, similarity_bits
from coach_fx.zoo.streams import locality_stream
from coach_fx.online.deploy import cut_sizes, end_path, end_paths, end_paths_of, variant
from coach_fx.passes.ops import fake_quantize_per_sample
from coach_fx.passes.partition import partition
from coach_fx.passes.split import SplitError, split_at
from coach_fx.plan import evaluate
from coach_fx.runtime.features import pooled_features
from coach_fx.runtime.plans import CacheSetup, CrossingBits, Sizes
from coach_fx.passes.wire_sizes import QUANT_BITS
from coach_fx.runtime.policy import bottleneck_with_cache, mean_end_s
from coach_fx.settings import Network, Settings
from coach_fx.runtime.timing import quiet_time, quiet_times


def _batched(fn: Callable[..., Any], inputs: tuple, batch: int) -> list[Any]:
    """``fn`` over the calibration inputs, ``batch`` samples at a time; one result per call."""
    n = inputs[0].shape[0]
    with torch.no_grad():
        return [fn(*(x[i:i + batch] for x in inputs)) for i in range(0, n, batch)]


@dataclasses.dataclass
class Samples:
    """Per calibration sample, what choosing a cut's bits and cache reads (until calibrated)."""

    vals: Any = None      # the end half's outputs on the calibration data
    agrees: Any = None    # per bits, per calibration sample: the answer stays the model's
    sims: Any = None      # per calibration sample: top-1 similarity to the class centers here


@dataclasses.dataclass
class CutCache:
    """A cut's semantic cache: the one calibrated at the cut, the one the plan runs (maybe at an
    earlier node, see ``CutAnalysis._pick_lookup_point``) and how far the choice got."""

    setup: CacheSetup | None = None
    own: CacheSetup | None = None
    lookup_split: Any = None   # (head, tail) of the end half where it looks up, if before the cut
    calibrated: bool = False
    split_checked: bool = False


@dataclasses.dataclass
class CutInfo:
    """One end set's float split, its safe bits, what one request sends and its cache
    calibration (memoized by ``CutAnalysis``)."""

    end: Any
    cloud: Any
    boundary: Any
    #: pinned bits per crossing, ``plan``: the fewest safe bits (32: none), caps
    bits: CrossingBits
    sizes: Sizes
    samples: Samples = dataclasses.field(default_factory=Samples)
    cache: CutCache = dataclasses.field(default_factory=CutCache)

    @property
    def min_bits(self) -> int:
        """The fewest bits that keep the accuracy budget (32: none)."""
        return int(self.bits.plan)


class CutAnalysis:
    """Per end set: the float split, the safe bits (per-sample quantization, as deployed) and
    the cache's calibration; memoized, since the bands share most candidates."""

    def __init__(self, gm: Any, dag: Any, oracle: AccuracyOracle, settings: Settings,
                 cache_budget: float) -> None:
        """``settings.accuracy_budget``: the bits' share of the budget; ``cache_budget``: the
        cache's wrong hits' (``OnlineSettings.budgets``)."""
        online = settings.online
        self.gm, self.dag, self.oracle, self.settings = gm, dag, oracle, settings
        self.frames = online.calibration_frames
        self.bits_budget, self.cache_budget = settings.accuracy_budget, cache_budget
        self.early_lookup_hits, self.result_lag = online.early_lookup_hits, online.result_lag
        self.grids = (online.grid,) if isinstance(online.grid, int) else tuple(online.grid)
        self.capacity, self.audit_rate = online.capacity, online.audit_rate
        self.locality = online.locality
        self.cache = online.cache
        self.labels = oracle.unquantized.argmax(1)
        self.example = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() else t
                             for t in oracle.inputs)
        self._info: dict[tuple, CutInfo] = {}
        self._times: dict[tuple, float] = {}

    def on(self, network: Network) -> "CutAnalysis":
        """This analysis for another network: what it learned (splits, safe bits, cache
        calibrations, times) holds for any network, so the copy shares it."""
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, network=network)
        return other

    def info(self, end_nodes: tuple, with_cache: bool = True, split: bool = True) -> CutInfo:
        """The split, its safe bits and (``with_cache``) its cache calibration, and (``split``)
        where in the end half the cache looks up (see ``_pick_lookup_point``); memoized."""
        info = self._info.get(end_nodes)
        if info is None:
            end32, cloud32, boundary = partition(self.gm, end_nodes, {})
            pinned = tuple(_pinned_bits(c) for c in boundary.crossings)
            caps = _caps(self.dag, boundary, self.settings)
            samples, min_bits = Samples(), 32
            if not boundary.end_only and any(b is None for b in pinned):
                samples.vals = [x if isinstance(x, tuple) else (x,)
                                for x in _batched(end32, self.oracle.inputs, self.oracle.batch)]
                samples.agrees = self._agreement(cloud32, samples.vals, pinned, caps)
                # the fewest bits that pass with a width of room (``safe_floor``)
                min_bits = safe_floor({b: 1 - samples.agrees[b].float().mean().item() for b in QUANT_BITS},
                                      self.bits_budget) or 32
            sizes = cut_sizes(self.dag, boundary, pinned, next(iter(self.settings.tensor_codecs), None),
                              self.settings.bits)
            info = CutInfo(end32, cloud32, boundary, CrossingBits(pinned, min_bits, caps), sizes, samples)
            self._info[end_nodes] = info
        cc, samples = info.cache, info.samples
        if with_cache and self.cache and not cc.calibrated:
            cc.calibrated = True
            if samples.vals is not None:
                cc.setup, samples.sims = self._cache(samples.vals, info.bits.pinned, samples.agrees, info.min_bits)
                cc.own = cc.setup
            samples.vals = None    # only the calibration needs them
        if with_cache and self.cache and split and not cc.split_checked:
            cc.split_checked = True
            self._pick_lookup_point(end_nodes, info)
        return info

    def _pick_lookup_point(self, end_nodes: tuple, info: CutInfo) -> None:
        """Where in the end half the cache looks up: at the cut, or at an earlier node that
        splits the end half (an articulation) with features of its own calibration that hit
        nearly as often (``OnlineSettings.early_lookup_hits``: hits also spare the link and the cloud); the one whose
        mean end work per request is least (a hit there skips the rest of the end half, a miss
        pays the split). The near-miss bits are the cut's, by the earlier node's similarity.
        Measured here, interleaved (the cost model's end compute with analytic costs); the
        winner's times are memoized."""
        if info.boundary.end_only or info.samples.agrees is None:
            return
        own = info.cache.own          # (``info.cache.setup`` becomes the chosen one, maybe earlier)
        options: list[tuple[Any, Any, tuple]] = [(own, None, end_nodes)] if own is not None else []
        inside = set(end_nodes)
        for a in self.dag.articulation_nodes():
            nodes = tuple(v for v in self.dag.nodes if v in self.dag.ancestors([a]))
            if not set(nodes) < inside:
                continue
            at = self.info(nodes, True, split=False)
            if at.cache.own is None or at.samples.sims is None or len(at.boundary.crossings) != 1 \
                    or at.bits.pinned[0] is not None:
                continue
            try:
                head_tail = split_at(info.end, at.boundary.crossings[0].name)
            except SplitError:
                continue
            if own is not None and at.cache.own.hit_rate < self.early_lookup_hits * own.hit_rate:
                continue
            bands = similarity_bits(at.samples.sims, info.samples.agrees, info.min_bits, self.bits_budget)
            options.append((dataclasses.replace(at.cache.own, bits_by_similarity=bands, at=a), head_tail, nodes))
        if not options:
            return
        answered = [c.hit_rate * (1 - self.audit_rate) for c, _, _ in options]
        if self.settings.costs == "measured":
            plain, paths = end_paths_of([variant(0, info, 0.0, 0.0, cache=c, lookup_split=p) for c, p, _ in options],
                                         self.example, self.capacity)
            k = min(range(len(options)), key=lambda k: mean_end_s(*paths[k], answered[k]))
            self._times[("end", end_nodes, False, False)] = plain
            self._times[("end", end_nodes, True, False)], self._times[("end", end_nodes, True, True)] = paths[k]
        else:
            # the cost model's end compute: a hit runs the end half up to where it looks up
            t_cut = evaluate(self.dag, end_nodes, 32, Network(1.0)).t_end
            k = min(range(len(options)), key=lambda k: mean_end_s(
                t_cut, evaluate(self.dag, options[k][2], 32, Network(1.0)).t_end, answered[k]))
        info.cache.setup, info.cache.lookup_split = options[k][:2]

    def _agreement(self, cloud32: Any, vals: list[tuple], pinned: tuple,
                   caps: tuple) -> dict[int, torch.Tensor]:
        """Per bit width, per calibration sample: does the cloud's answer equal the unquantized
        model's when each sample's crossing tensors are quantized on their own?"""
        out = {}
        with torch.no_grad():
            for b in QUANT_BITS:
                preds = []
                for chunk in vals:
                    args = [fake_quantize_per_sample(t, min(b, cap or 32) if pb is None else pb)
                            if isinstance(t, torch.Tensor) else t
                            for t, pb, cap in zip(chunk, pinned, caps)]
                    preds.append(_flat(cloud32(*args)).argmax(1))
                out[b] = torch.cat(preds) == self.labels
        return out

    def _cache(self, vals: list[tuple], pinned: tuple, agrees: dict, min_bits: int) -> tuple[Any, Any]:
        """Hit thresholds on a replayed calibration stream; similarity bands -> fewer safe bits.
        Returns (the setup, each sample's top-1 similarity to the class centers), or Nones."""
        adaptive = [k for k, b in enumerate(pinned) if b is None]
        labels = self.labels
        # two streams of one length from disjoint halves of the calibration data: thresholds
        # must pass both
        n = len(labels)
        length = max(self.frames, 3 * ((n + 1) // 2))
        streams = []
        for h in (0, 1):
            idx = torch.arange(h, n, 2)
            streams.append([int(idx[i]) for i in locality_stream(labels[idx], length, self.locality, seed=1 + h)])
        features = [torch.from_numpy(np.concatenate(
            [np.atleast_2d(pooled_features([chunk[k] for k in adaptive], grid)) for chunk in vals])).float()
            for grid in self.grids]
        search = ThresholdSearch(self.cache_budget, self.capacity, self.audit_rate, lag=self.result_lag)
        found = [t for t in search.tune(features, labels, streams, contexts=(False, True)) if t.rate > 0]
        if not found:
            return None, None
        # the one that hits most (the first of equals: the coarser grid, no context)
        best = max(found, key=lambda t: (t.rate, -t.grid, -t.context))
        st, mg, rate, grid, context = best.sim, best.margin, best.rate, self.grids[best.grid], best.context
        feats = features[best.grid]
        classes = sorted(set(labels.tolist()))
        centers = torch.stack([torch.nn.functional.normalize(feats[labels == c].mean(0), dim=0)
                               for c in classes])
        sim = (feats @ centers.T).max(1).values
        bands = similarity_bits(sim, agrees, min_bits, self.bits_budget)
        return CacheSetup(st, mg, rate, bands, grid, context=context), sim

    def end_time(self, end_nodes: tuple) -> float:
        """The end stage without the cache (measured, or the cost model's with analytic costs)."""
        if self.settings.costs == "measured":
            return self.settings.end.seconds(self.end_host_s(end_nodes, cache=False))
        return evaluate(self.dag, end_nodes, 32, Network(1.0)).t_end

    def expected(self, end_nodes: tuple, rate: float, with_cache: bool = True) -> tuple[float, float] | None:
        """(period, latency) at ``rate`` with the calibrated hit rate taking its share of
        requests off the link and the cloud; None when no bits are safe."""
        info = self.info(end_nodes, with_cache)
        if info.min_bits >= 32 and any(b is None for b in info.bits.pinned):
            return None
        # model inputs that cross are quantized like the rest, up to their source's bits
        p = evaluate(self.dag, end_nodes, info.min_bits, self.settings.network.at_rate(rate),
                     input_bits=min(info.min_bits, self.settings.input_width))
        t_end, t_cloud = p.t_end, p.t_cloud
        if self.settings.costs == "measured" and not info.boundary.end_only:
            # the per-node sums miss the per-request work around the halves (quantize, encode,
            # the cache lookup), which decides between close cuts on a slow end device
            t_end = self.settings.end.seconds(self.end_host_s(end_nodes, False))
            t_cloud = self.settings.cloud.seconds(self.cloud_host_s(end_nodes))
        plain = (bottleneck_with_cache(t_end, p.t_link, t_cloud, 1.0), t_end + p.t_link + t_cloud)
        cache = info.cache.setup
        if cache is None or not with_cache:
            return plain
        # with the cache: its lookups cost end time, its hits save link and cloud time (the
        # runtime skips lookups while they do not pay, ``OnlinePolicy._cache_pays``)
        sent = 1.0 - cache.hit_rate * (1 - self.audit_rate)
        if self.settings.costs == "measured":
            t_end = self.settings.end.seconds(self.end_cached_s(end_nodes))
        cached = (bottleneck_with_cache(t_end, p.t_link, t_cloud, sent), t_end + sent * (p.t_link + t_cloud))
        return min(plain, cached)

    def end_host_s(self, end_nodes: tuple, cache: bool = True, hit: bool = False) -> float:
        """The end side's work per request on this host (see ``_end_paths``; ``hit``: a hit's,
        with ``cache``); memoized."""
        key = ("end", end_nodes, cache, hit and cache)
        if key not in self._times:
            info = self.info(end_nodes, cache)      # with the cache: may measure them (lookup points)
        if key not in self._times:
            plain, miss, hit_s = end_paths(variant(0, info, 0.0, 0.0), self.example, self.capacity, cache)
            self._times[("end", end_nodes, False, False)] = plain
            if cache:
                self._times[("end", end_nodes, True, False)] = miss if miss is not None else plain
                self._times[("end", end_nodes, True, True)] = hit_s if hit_s is not None else plain
        return self._times[key]

    def end_cached_s(self, end_nodes: tuple) -> float:
        """The mean end work per request on this host with the cache: a hit answered on the end
        skips quantize and encode; an audited hit and a miss do all of it (calibrated hit rate)."""
        cache = self.info(end_nodes).cache.setup
        if cache is None:
            return self.end_host_s(end_nodes, cache=False)
        return mean_end_s(self.end_host_s(end_nodes), self.end_host_s(end_nodes, hit=True),
                          cache.hit_rate * (1 - self.audit_rate))

    def measure(self, cuts: Iterable[tuple]) -> None:
        """With measured costs, time the end half (no cache) and the cloud half of each of
        ``cuts`` not timed yet, all in one interleaved run (``quiet_times``: the cuts compared
        with each other see the same host, and one run costs less than one per cut)."""
        if self.settings.costs != "measured":
            return
        keys, fns = [], []
        for c in dict.fromkeys(cuts):
            info = self.info(c, with_cache=False)
            if ("end", c, False, False) not in self._times:
                keys.append(("end", c, False, False))
                fns.append(end_path(variant(0, info, 0.0, 0.0), self.example, self.capacity, False, False))
            if ("cloud", c) not in self._times:
                keys.append(("cloud", c))
                fns.append(self._cloud_call(info))
        if fns:
            self._times.update(zip(keys, quiet_times(fns)))

    def _cloud_call(self, info: CutInfo) -> Callable[[], Any]:
        """The cloud half on one request's crossing values, to be timed."""
        with torch.no_grad():
            vals = info.end(*self.example)
        vals = vals if isinstance(vals, tuple) else (vals,)

        def run() -> Any:
            with torch.no_grad():
                return info.cloud(*vals)
        return run

    def cloud_host_s(self, end_nodes: tuple) -> float:
        """The cloud half on one request's crossing values, on this host; memoized."""
        key = ("cloud", end_nodes)
        if key not in self._times:
            self._times[key] = quiet_time(self._cloud_call(self.info(end_nodes, with_cache=False)))
        return self._times[key]


def _pinned_bits(c: Any) -> int | None:
    """None for a float tensor, whose bits the controller picks (a model input too, up to
    ``Settings.input_width``: see ``_caps``); everything else goes as it is (32)."""
    is_float = c.shape is not None and c.dtype is not None and c.dtype.is_floating_point
    return None if is_float else 32


def _caps(dag: Any, boundary: Any, settings: Settings) -> tuple[int | None, ...]:
    """A model input is worth at most ``Settings.input_width`` (the bits of its source); fewer
    when the link is slow and accuracy allows, like any crossing tensor."""
    return tuple(settings.input_width if c.dag_node in dag.inputs else None for c in boundary.crossings)


def _flat(out: Any) -> torch.Tensor:
    t = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)][0]
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


__all__ = ["CutAnalysis", "CutInfo"]
