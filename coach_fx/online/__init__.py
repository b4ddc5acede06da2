"""``coach_fx.compile_online``: plans for a few bandwidth bands, compiled up front, with the
calibration the online controller and the semantic cache need (DESIGN.md §6).

What it prepares, per distinct plan (all halves cut from one GraphModule, so they share the
model's weights):

* an end half that returns the crossing tensors *unquantized* and a cloud half that takes
  them: the runtime quantizes each request with the bits the controller picks
  (``coach::quantize``/``pack`` on the end, ``unpack``/``dequantize`` before the cloud half);
* the accuracy-safe minimum bits (the planner's accuracy oracle: ``accuracy_budget`` ×
  (1 - ``cache_share``) on the calibration data; ``analysis``);
* the semantic cache's hit thresholds, calibrated by replaying a calibration stream with
  temporal locality through a cache of the deployed capacity, so that wrong hits stay within
  ``accuracy_budget`` × ``cache_share``; and the similarity bands whose samples stay safe
  with fewer bits;
* the stage times of its halves, measured on this host as whole modules (``deploy``).

The package: ``bands`` (rates, band edges, the plan per band), ``analysis`` (per cut: safe
bits, cache calibration, times), ``cache_calibration``, ``deploy`` (cut -> run-time plan),
``report``.

Example::

    >>> om = coach_fx.compile_online(model, (x,), network=coach_fx.Network.from_trace(path),
    ...                              end=coach_fx.Device("pi", 10), calibration=(xc, yc))  # doctest: +SKIP
    >>> outs, stats, policy = om.stream(frames, mode="full")                              # doctest: +SKIP
    >>> print(om.report())                                                                # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from coach_fx.accuracy import AccuracyOracle
from coach_fx.compiled import InputError
from coach_fx.driver import plan_model, prepare
from coach_fx.profile import torch_threads
from coach_fx.online.analysis import CutAnalysis
from coach_fx.online.bands import band_edges, band_rates, choose_plans
from coach_fx.online.deploy import Deployment, deploy
from coach_fx.online.report import report
from coach_fx.runtime.cloud import CloudWorker
from coach_fx.runtime.config import MODES, Bands, Batching, Mode, StreamConfig
from coach_fx.runtime.end import EndWorker, run_session
from coach_fx.runtime.links.inprocess import InProcessLink
from coach_fx.runtime.plans import OnlinePlans
from coach_fx.runtime.policy import OnlinePolicy
from coach_fx.settings import Network, OnlineSettings, Settings

class OnlineModel:
    """Plans for bandwidth bands and everything the online runtime needs to run them.

    ``plans`` / ``variants`` / ``cloud``: by plan id (``deployment``); ``bands[with_cache]``:
    which plan serves which rate, for running with and without the semantic cache; ``fixed``:
    the id of the plan for the network as given (its mean rate), what the ``"fixed"`` mode
    runs and where every mode starts.
    """

    def __init__(self, analysis: CutAnalysis, example_inputs: tuple, deployment: Deployment,
                 bands: dict[bool, Bands]) -> None:
        self.analysis = analysis
        self.gm, self.dag, self.settings = analysis.gm, analysis.dag, analysis.settings
        self.example_inputs, self.deployment, self.bands = example_inputs, deployment, bands

    def for_network(self, network: Network, bands_mbps: Sequence[float] | None = None) -> "OnlineModel":
        """The plans for another network, re-using this compile's analyses (the splits, safe
        bits, cache calibrations and measured times do not depend on the network): a re-plan
        in a second or two instead of a compile. ``bands_mbps``: the rates to plan for
        (default: as compiled, or ``band_rates`` of the new network).

        Example::

            >>> om2 = om.for_network(coach_fx.Network.from_trace(other_trace))   # doctest: +SKIP
        """
        cal = self.analysis.on(network)
        online = self.settings.online
        rates = sorted(bands_mbps or online.bands_mbps or band_rates(network))
        with torch_threads(self.settings.threads):
            return _compile(cal, self.example_inputs, rates)

    # the deployment's parts, by plan id (read through: one copy of each)
    @property
    def plans(self) -> dict[int, Any]:
        return self.deployment.plans

    @property
    def variants(self) -> dict[int, Any]:
        return self.deployment.variants

    @property
    def cloud(self) -> dict[int, Any]:
        return self.deployment.cloud

    @property
    def out_spec(self) -> Any:
        return self.deployment.out_spec

    @property
    def offline(self) -> int:
        """The id of the offline plan (for the network as given), where every mode starts."""
        return self.bands[False].start

    @property
    def online_plans(self) -> OnlinePlans:
        """Every plan as the end side runs it, with the bands and the controller's settings
        (what ``save`` writes and a saved online plan reads back as)."""
        online = self.settings.online
        return OnlinePlans(self.variants, self.bands, online.hold, online.capacity,
                           online.audit_rate, self.settings.end.slowdown)

    def policy(self, mode: str = "full", seed: int = 0) -> OnlinePolicy:
        """A fresh :class:`coach_fx.runtime.policy.OnlinePolicy` for ``mode`` (see ``MODES``)."""
        return OnlinePolicy.of(self.online_plans, mode, seed)

    def save(self, path: str | Path, *, key: bytes | str | None = None, whole: bool = False) -> str:
        """Write every plan (its halves sharing the weights on disk as in memory), the bits,
        the cache setups and the bands to a plan directory: ``coach serve DIR`` hosts every
        plan's cloud half, ``coach_fx.connect(DIR, ...)`` / ``coach run DIR`` run the online
        policy on the end. ``key``: the token that signs the manifest (default
        ``$COACH_TOKEN``); ``whole=True`` also writes the whole model, for ``fallback="local"``.

        Example::

            >>> om.save("online_dir", key=token)                                 # doctest: +SKIP
            >>> rm = coach_fx.connect("online_dir", "cloud:29517", token=token)  # doctest: +SKIP
        """
        from coach_fx.deploy.save import save_online
        return str(save_online(self, path, key=key, whole=whole))

    def stream(self, frames: Iterable[Any], *, mode: str = "full", link: Any = None,
               timeout_s: float = 30.0, queue_size: int = 2, seed: int = 0,
               duration_s: float | None = None) -> tuple[list[Any], Any, Any]:
        """Run ``frames`` end -> link -> cloud in-process with the online policy of ``mode``.

        The link defaults to an in-process one following the compile-time network (its trace).
        ``duration_s``: stop taking frames once this long has passed since the first (a stream
        over a fixed stretch of a trace: every mode then sees the same bandwidth over the same
        time, however fast it goes); the frames taken are all answered.
        Returns (outputs in order, :class:`~coach_fx.runtime.stats.Stats`, the policy, whose
        ``summary()`` tells hits, bits and switches).
        """
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
        # the cloud batches requests that arrive together (while it falls behind)
        config = StreamConfig(self.settings.end.slowdown, self.settings.cloud.slowdown,
                              queue_size=queue_size, timeout_s=timeout_s, batching=Batching(8))
        with torch_threads(self.settings.threads):
            cloud = CloudWorker(self.cloud, link.cloud, config, adaptive=True).start()
            end = EndWorker(link.end, self.out_spec, policy, config)
            outs, stats = run_session(end, cloud, xs)
        return outs, stats, policy

    def breakeven_mbps(self) -> float:
        """The rate below which the offline plan's link is its bottleneck: its message's bits
        over its compute bottleneck (the end's work measured alone x the end's slowdown, the
        cloud half's time). The online benchmark and the deploy test scale a trace so that
        its median sits here: the fixed plan is then link-bound half of the time."""
        v, p = self.variants[self.offline], self.plans[self.offline]
        if v.end_only:
            raise ValueError("the offline plan runs the whole model on the end device: it sends nothing, "
                             "so no rate makes its link the bottleneck")
        compute = max(self.settings.end.seconds(v.times.host_s) if v.times.host_s else p.t_end, p.t_cloud)
        return v.message_bytes() * 8 / compute / 1e6

    def report(self) -> str:
        """The bands, their plans and each plan's calibration as tables."""
        return report(self)


def _check(x: tuple, example: tuple) -> None:
    for i, (a, e) in enumerate(zip(x, example)):
        if isinstance(e, torch.Tensor) and (not isinstance(a, torch.Tensor) or a.shape != e.shape
                                            or a.dtype != e.dtype):
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise InputError(f"input {i} is {got}; expected shape {tuple(e.shape)} and dtype {e.dtype}")
    if len(x) != len(example):
        raise InputError(f"expected {len(example)} input(s), got {len(x)}")


#: The confidences an online plan's bits are checked at, the highest first (``online_confidence``).
ONLINE_CONFIDENCES = (0.9, 0.75, 0.5)


def online_confidence(budget: float, samples: int) -> float | None:
    """The highest of :data:`ONLINE_CONFIDENCES` at which ``samples`` calibration samples can
    show ``budget`` (``accuracy.samples_needed``); None (the measured disagreement alone) where
    even the lowest cannot.

    >>> online_confidence(0.0025, 539), online_confidence(0.005, 539)
    (0.5, 0.9)
    """
    from coach_fx.accuracy import samples_needed
    return next((c for c in ONLINE_CONFIDENCES if samples_needed(budget, c) <= samples), None)


def compile_online(model: nn.Module, example_inputs: Any, *, calibration: Any = None,
                   accuracy_budget: float = 0.005, **options: Any) -> OnlineModel:
    """Compile ``model`` for online control: a plan per bandwidth band, sharing weights.

    ``calibration``: (inputs, labels) batched on dim 0 (required: bits and cache thresholds are
    calibrated on it; the budget counts answers that differ from the unquantized model's, so
    the labels only serve the offline planner). Keywords: :class:`coach_fx.Settings` fields
    and :class:`coach_fx.OnlineSettings` fields (``cache_share``, ``bands_mbps``: the rates to
    plan for, default ``band_rates``, switching at the geometric midpoints between them;
    ``capacity``: classes the cache holds, streams have temporal locality; ``grid``: the
    pooling grid(s) of the cache's features, per plan the one that hits most; ``locality``,
    ``calibration_frames``: the calibration streams the thresholds are tuned on, longer ones
    hold better on unseen data for a longer compile; ``hold``, ``audit_rate``, ...), or
    ``online=OnlineSettings.of(...)``.

    With ``cache``, a band's plan is chosen cache-aware: among the planner's plans and the
    single-tensor cuts, the one whose period is shortest once the calibrated hit rate takes
    its share of requests off the link and the cloud (a deeper cut often has features that
    hit far more often, for a little more end time). Each plan's cache thresholds are tuned
    on the replayed streams, with answers learned ``OnlineSettings.result_lag`` requests late as in the
    pipeline, once for a plain cache and once for a context-aware one (hits only for the
    stream's latest known class); the one that hits more within the budget is kept.
    """
    if calibration is None:
        raise ValueError("compile_online needs calibration=(inputs, labels): the safe bits and the "
                         "cache's thresholds are calibrated on it")
    online_keys = OnlineSettings.keys()
    online = options.pop("online", None) or OnlineSettings.of(
        **{k: options.pop(k) for k in list(options) if k in online_keys})
    bits_budget, cache_budget = online.budgets(accuracy_budget)
    # The budget counts answers that differ from the unquantized model's (a stream repeats what
    # it sees: every changed answer costs), so the planner's oracle runs in agreement mode.
    calib_inputs = calibration[0] if isinstance(calibration, (tuple, list)) and len(calibration) == 2 \
        else calibration
    kw: dict[str, Any] = dict(accuracy_budget=bits_budget, calibration=(calib_inputs, None),
                              online=online)
    # Online plans keep the raw 8-bit input (the per-request controller re-quantizes crossings;
    # an image codec's size varies per frame). Their bits are checked with a confidence margin
    # as offline plans are (near changes count, a Clopper-Pearson bound), at the highest of
    # ONLINE_CONFIDENCES the calibration set is large enough for at the bits' share of the
    # budget (the cache takes the rest): what passes must hold on a real link's unseen frames.
    options.setdefault("input_codecs", ())
    options.setdefault("accuracy_confidence", online_confidence(bits_budget, len(calib_inputs)))
    settings = Settings.from_options(options, **kw)
    gm, inputs, dag = prepare(model, example_inputs, settings)
    oracle = AccuracyOracle(gm, dag, settings, inputs)
    rates = sorted(online.bands_mbps) if online.bands_mbps is not None else band_rates(settings.network)
    cal = CutAnalysis(gm, dag, oracle, settings, cache_budget)
    # measure with the threads the streams will use (the halves' times decide the plans)
    with torch_threads(settings.threads):
        return _compile(cal, inputs, rates)


def _compile(cal: CutAnalysis, inputs: tuple, rates: list[float]) -> OnlineModel:
    """The offline plan, the planner's plan per band, the chosen plan per band (with and
    without the cache), and their run-time plans."""
    gm, dag, settings, oracle = cal.gm, cal.dag, cal.settings, cal.oracle
    net = settings.network

    def at(rate: float) -> Settings:
        return settings.replace(network=net.at_rate(rate))

    offline_plan = plan_model(gm, inputs, dag, settings, oracle=oracle)[0]
    offline = offline_plan.end_nodes
    planned = {r: plan_model(gm, inputs, dag, at(r), oracle=oracle)[0].end_nodes for r in rates}
    chosen = choose_plans(cal, offline, planned, rates)
    ids: dict[tuple[str, ...], int] = {}
    for c in [offline, *chosen[False].values(), *chosen.get(True, {}).values()]:
        ids.setdefault(c, len(ids))
    bands = {wc: Bands(*band_edges(rates, [ids[by_rate[r]] for r in rates]), start=ids[offline])
             for wc, by_rate in chosen.items()}
    bands.setdefault(True, bands[False])
    # each plan priced at the rate of a band it serves (the offline plan: the network as given)
    rate_of = {c: next((r for by_rate in chosen.values() for r in rates if by_rate[r] == c), None)
               for c in ids}
    rate_of[offline] = None
    return OnlineModel(cal, inputs, deploy(cal, inputs, ids, rate_of, offline_plan), bands)


__all__ = ["compile_online", "OnlineModel", "OnlineSettings", "MODES", "Mode", "band_rates"]
