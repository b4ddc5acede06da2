"""``coach_fx.compile``: capture, annotate, cost, plan and split a model; ``CompiledModel`` runs it.

Example::

    >>> import torch, torchvision, coach_fx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 224, 224)
    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(uplink_mbps=10),
    ...                       end=coach_fx.Device("pi", slowdown=8), strategy="brute-force")
    >>> y = cm(x)                       # end half -> in-process link -> cloud half
    >>> print(cm.report())              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from coach_fx.accuracy import AccuracyOracle
from coach_fx.costs import build_dag, torch_threads
from coach_fx.graph import LayerDAG
from coach_fx.optimize import Problem, solve
from coach_fx.optimize.simple import manual
from coach_fx.passes.annotate import annotate, keeps_effect
from coach_fx.passes.capture import capture
from coach_fx.passes.partition import partition
from coach_fx.plan import MESSAGE_HEADER_BYTES, Plan, evaluate
from coach_fx.settings import Settings


class InputError(ValueError):
    """An input does not match what the model was compiled for."""


def _example_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of the model's positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _identity_link(payload: tuple) -> tuple:
    return payload


class CompiledModel(nn.Module):
    """A model split into an end and a cloud GraphModule joined by quantized boundary ops.

    ``cm(x)`` returns what the model returns, computed end -> link -> cloud. Attributes:
    ``plan`` (:class:`coach_fx.Plan`), ``dag`` (:class:`coach_fx.LayerDAG`), ``end_module`` and
    ``cloud_module`` (``torch.fx.GraphModule``), ``boundary`` (what crosses, in payload order).
    """

    def __init__(self, gm: fx.GraphModule, dag: LayerDAG, plan: Plan, settings: Settings,
                 example_inputs: Sequence[Any], oracle: AccuracyOracle | None = None) -> None:
        super().__init__()
        self.gm, self.dag, self.plan, self.settings = gm, dag, plan, settings
        self.oracle = oracle
        self.example_inputs = tuple(example_inputs)
        self.input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.end_module, self.cloud_module, self.boundary = partition(gm, plan.end_nodes, plan.bits,
                                                                      codecs=plan.codecs)
        self._train_end, self._train_cloud, _ = partition(gm, plan.end_nodes, plan.bits, mode="train",
                                                          codecs=plan.codecs)
        self.link: Callable[[tuple], tuple] = _identity_link
        self.train(gm.training)

    # -------------------------------------------------------------- running
    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise :class:`InputError` naming the expected shape/dtype before any work is done."""
        if len(args) != len(self.example_inputs):
            raise InputError(f"expected {len(self.example_inputs)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(args)}")
        for i, (a, e) in enumerate(zip(args, self.example_inputs)):
            name = self.input_names[i] if i < len(self.input_names) else str(i)
            if isinstance(e, torch.Tensor):
                if not isinstance(a, torch.Tensor):
                    raise InputError(f"input {i} ({name!r}) must be a tensor of shape "
                                     f"{tuple(e.shape)}, got {type(a).__name__}")
                if a.shape != e.shape or a.dtype != e.dtype:
                    raise InputError(
                        f"input {i} ({name!r}) has shape {tuple(a.shape)} and dtype {a.dtype}; "
                        f"expected shape {tuple(e.shape)} and dtype {e.dtype} (the example "
                        "inputs the model was compiled for; compile again for another shape)")

    def _bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        if not kwargs:
            return args
        args = list(args)
        for name in self.input_names[len(args):]:
            if name not in kwargs:
                raise InputError(f"missing input {name!r}")
            args.append(kwargs[name])
        extra = set(kwargs) - set(self.input_names)
        if extra:
            raise InputError(f"unexpected keyword input(s) {sorted(extra)}")
        return tuple(args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = self._bind(args, kwargs)
        self.check_inputs(args)
        if self.training and torch.is_grad_enabled():
            # fake-quantized boundary whose gradient passes straight through
            payload = self._train_end(*args)
            return payload if self.boundary.end_only else self._train_cloud(*payload)
        out = self.end_module(*args)
        if self.boundary.end_only:
            return out
        return self.cloud_module(*self.link(out))

    # -------------------------------------------------------------- streams
    @property
    def out_spec(self) -> Any:
        """The structure of the model's output (leaves travel flat on the wire)."""
        if getattr(self, "_out_spec", None) is None:
            from coach_fx._compat import tree_flatten
            with torch.no_grad():
                self._out_spec = tree_flatten(self.gm(*self.example_inputs))[1]
        return self._out_spec

    def predicted(self) -> dict[str, float]:
        p = self.plan
        return {"t_end": p.t_end, "t_link": p.t_link, "t_cloud": p.t_cloud, "latency": p.latency,
                "period": p.period, "throughput": p.throughput, "bubble_ratio": p.bubble_ratio,
                "bytes_sent": p.bytes_sent}

    def stream(self, inputs: Sequence[Any], *, pipelined: bool = True, link: Any = None,
               timeout_s: float = 30.0, queue_size: int = 2) -> tuple[list[Any], Any]:
        """Run a stream through end -> link -> cloud as a three-stage pipeline, in-process.

        ``inputs``: frames, each a tensor or a tuple of the model's inputs. The link defaults
        to an in-process one with the compile-time network (its trace, if it has one); the
        end (and cloud) devices are emulated with their slowdowns. Returns (outputs in order,
        :class:`coach_fx.runtime.pipeline.Stats`). ``pipelined=False`` runs one request at a
        time, for comparison.
        """
        from coach_fx.runtime.pipeline import run_local

        frames = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in inputs]
        for f in frames:
            self.check_inputs(f)
        if self.boundary.end_only:
            with torch_threads(self.settings.threads):
                outs, stats = run_local(self.end_module, frames, self.settings.end.slowdown,
                                        self.plan.extra.get("end_host_s"))
            stats.predicted = self.predicted()
            return outs, stats
        with torch_threads(self.settings.threads):
            return self._stream(frames, pipelined, link, timeout_s, queue_size)

    def _stream(self, frames: list[tuple], pipelined: bool, link: Any, timeout_s: float,
                queue_size: int) -> tuple[list[Any], Any]:
        from coach_fx.runtime.link import InProcessLink
        from coach_fx.runtime.pipeline import CloudWorker, EndWorker, run_session

        link = link or InProcessLink.for_network(self.settings.network)
        cloud = CloudWorker(self.cloud_module, self.boundary, link.cloud,
                            slowdown=self.settings.cloud.slowdown).start()
        # a calibrated plan measured the end half on this host: emulate the device from that
        ref = self.plan.extra.get("end_host_s")
        end = EndWorker(self.end_module, self.boundary, link.end, self.out_spec,
                        slowdown=self.settings.end.slowdown, queue_size=queue_size, timeout_s=timeout_s,
                        reference_s=ref)
        return run_session(end, cloud, frames, pipelined=pipelined, predicted=self.predicted())

    def save(self, path: str, whole: bool = False) -> str:
        """Write the plan and each half on its own (``coach serve DIR`` / ``coach run DIR``);
        ``whole=True`` also writes the whole model, for ``coach run --fallback local``."""
        from coach_fx.artifact import save
        from dataclasses import asdict
        net = self.settings.network
        meta = {"plan": {k: v for k, v in asdict(self.plan).items() if k != "extra"},
                "network": {"uplink_mbps": net.uplink_mbps, "downlink_mbps": net.down_mbps,
                            "rtt_ms": net.rtt_ms},
                "end": {"name": self.settings.end.name, "slowdown": self.settings.end.slowdown},
                "cloud": {"name": self.settings.cloud.name, "slowdown": self.settings.cloud.slowdown},
                "predicted": self.predicted()}
        meta["plan"]["end_nodes"] = list(self.plan.end_nodes)
        meta["plan"]["cut"] = list(self.plan.cut)
        was = self.training
        self.eval()
        try:
            return str(save(path, self.end_module, self.cloud_module, self.boundary,
                            self.example_inputs, self.out_spec, meta, self.gm if whole else None))
        finally:
            self.train(was)

    # -------------------------------------------------------------- reporting
    def report(self) -> str:
        """The plan and its predicted stage times as a table."""
        p = self.plan
        head = (f"plan: {p.strategy}, objective {p.objective}; {len(p.end_nodes)}/{len(self.dag)} "
                f"nodes on the end; crossing: "
                + (", ".join(f"{x}@{p.codecs[x]}" if x in p.codecs else f"{x}@{p.bits[x]}b"
                             for x in p.cut) or "nothing"))
        if p.accuracy is not None:
            head += f"\naccuracy: {p.note}"
        rows = [["T_end", p.t_end * 1e3], ["T_link", p.t_link * 1e3], ["T_cloud", p.t_cloud * 1e3],
                ["latency", p.latency * 1e3], ["period", p.period * 1e3],
                ["throughput /s", p.throughput], ["bubble ratio", p.bubble_ratio],
                ["bytes sent", p.bytes_sent]]
        return head + "\n" + tabulate(rows, headers=["predicted", "ms / value"], floatfmt=".3f")

    def calibrate(self, repeat: int = 5) -> Plan:
        """Re-measure the chosen plan's halves as whole modules on this host and re-price it.

        The search prices plans with per-node costs; a half run as one module (with its
        quantize/pack, or unpack/dequantize, and message encoding) takes somewhat different
        time (``prediction_check`` says how much). The plan's stage times become the measured
        ones × each device's slowdown; the per-node figures stay in ``plan.extra``.
        """
        from coach_fx.runtime.codec import entries_to_payload, output_to_entries, payload_to_entries
        from coach_fx.runtime.wire import decode, encode

        p = self.plan
        x = self.example_inputs
        if self.boundary.end_only:   # the whole model on the end device
            with torch.no_grad(), torch_threads(self.settings.threads):
                t_end = _median_time(lambda: self.end_module(*x), repeat)
            p.extra.update(model_t_end=p.t_end, calibrated=True, end_host_s=t_end)
            p.t_end = t_end * self.settings.end.slowdown
            return p
        with torch.no_grad(), torch_threads(self.settings.threads):
            def end() -> bytes:
                return encode(0, payload_to_entries(self.boundary, self.end_module(*x)))
            msg = end()
            def cloud() -> bytes:
                out = self.cloud_module(*entries_to_payload(self.boundary, decode(msg)[3]))
                return encode(0, output_to_entries(out)[0])
            t_end = _median_time(end, repeat)
            t_cloud = _median_time(cloud, repeat)
        net = self.settings.network
        p.extra.update(model_t_end=p.t_end, model_t_cloud=p.t_cloud, calibrated=True,
                       end_host_s=t_end, cloud_host_s=t_cloud)
        p.t_end = t_end * self.settings.end.slowdown
        p.t_cloud = (t_cloud * self.settings.cloud.slowdown + net.rtt_ms / 2e3
                     + net.down_seconds(self.dag.output_bytes() + MESSAGE_HEADER_BYTES))
        return p

    def prediction_check(self, repeat: int = 10) -> dict[str, float]:
        """How well the per-node sum of host times predicts each half run as one module."""
        host = getattr(self.dag, "host_times", None)
        if host is None:
            return {}
        # the cost model's host figures for each half, boundary ops included (no network)
        end_set = set(self.plan.end_nodes)
        q_end = q_cloud = 0.0
        for x in self.plan.cut:
            d = self.dag.info[x]
            if d.quantizable and self.plan.bits[x] < 32:
                qe, qc = self.dag.quant_cost(self.plan.bits[x])
                q_end += qe * d.numel / self.settings.end.slowdown
                q_cloud += qc * d.numel / self.settings.cloud.slowdown
        pred_end = q_end + sum(host.get(m, 0.0) for v in end_set for m in self.dag.members[v])
        pred_cloud = q_cloud + sum(host.get(m, 0.0) for v in self.dag.nodes if v not in end_set
                                   for m in self.dag.members[v])
        with torch.no_grad():
            payload = self.end_module(*self.example_inputs)
            meas_end = _median_time(lambda: self.end_module(*self.example_inputs), repeat)
            meas_cloud = 0.0 if self.boundary.end_only else \
                _median_time(lambda: self.cloud_module(*payload), repeat)
        def err(pred: float, meas: float) -> float:
            return (pred - meas) / meas if meas > 0 else 0.0
        return {"end_pred_s": pred_end, "end_meas_s": meas_end, "end_err": err(pred_end, meas_end),
                "cloud_pred_s": pred_cloud, "cloud_meas_s": meas_cloud,
                "cloud_err": err(pred_cloud, meas_cloud)}


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prepare(model: nn.Module | fx.GraphModule, example_inputs: Any, settings: Settings
            ) -> tuple[fx.GraphModule, tuple, LayerDAG]:
    """Capture, annotate and cost ``model``: the (GraphModule, inputs, LayerDAG) to plan on."""
    inputs = _example_tuple(example_inputs)
    gm = capture(model, inputs, settings.leaf_modules)
    gm.graph.eliminate_dead_code(is_impure_node=keeps_effect)
    gm.recompile()
    try:
        annotate(gm, inputs)
    except Exception as e:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise InputError(f"running {type(model).__name__} on the example inputs {shapes} "
                         f"failed: {e}") from e
    dag = build_dag(gm, inputs, settings)
    return gm, inputs, dag


def plan_model(gm: fx.GraphModule, inputs: tuple, dag: LayerDAG, settings: Settings,
               strategy: str | None = None, oracle: AccuracyOracle | None = None) -> tuple[Plan, AccuracyOracle | None]:
    """Plan an already prepared model with ``strategy`` (default: the settings')."""
    strategy = strategy or settings.strategy
    if strategy == "manual":
        problem = Problem(dag, settings.network, settings.objective, settings.bits, settings.input_bits)
        return manual(problem, settings.end_nodes, settings.manual_bits), oracle
    if oracle is None and strategy not in ("end-only",):
        oracle = AccuracyOracle(gm, dag, settings, inputs)
    problem = Problem(dag, settings.network, settings.objective, settings.bits,
                      settings.input_bits, oracle, settings.input_codecs)
    kw = {"limit": settings.max_plans} if strategy == "brute-force" else {}
    plan = solve(strategy, problem, **kw)
    if strategy == "coach" and _varies(settings.network):
        plan = _for_trace(problem, plan, settings)
    if oracle is not None:
        plan.accuracy = oracle.metric(plan.end_nodes, plan.bits, plan.codecs)
        plan.accuracy_ok = oracle.ok(plan.end_nodes, plan.bits, plan.codecs)
        what = {"labels": "top-1 drop", "agreement": "top-1 disagreement",
                "l2": "output relative L2"}[oracle.mode]
        plan.note = f"{what} {plan.accuracy:.4f}; check: {oracle.describe()}"
        if oracle.bounded:
            plan.note += f" (bound {oracle.bound(plan.end_nodes, plan.bits, plan.codecs):.4f})"
    return plan, oracle


def _varies(network: Any) -> bool:
    tr = network.trace
    return tr is not None and math.isfinite(tr.duration) and max(tr.mbps) > min(tr.mbps)


#: Time-weighted quantiles of a trace's rate that a plan for the trace is scored on.
TRACE_QUANTILES = tuple((k + 0.5) / 20 for k in range(20))
#: Start times, evenly spread over a trace, a single request's expected latency averages.
TRACE_STARTS = 100


def expected_latency(plan: Plan, network: Any) -> float:
    """A single request's latency averaged over ``TRACE_STARTS`` arrival times spread over the
    network's trace, its message crossing the trace as it varies (``Trace.finish_time``)."""
    tr = network.trace
    if tr is None or not math.isfinite(tr.duration) or plan.bytes_sent == 0:
        return plan.latency
    fixed = plan.latency - plan.t_link + network.rtt_ms / 2e3
    nbytes = plan.bytes_sent / network.efficiency
    starts = [tr.duration * i / TRACE_STARTS + plan.t_end for i in range(TRACE_STARTS)]
    return fixed + sum(tr.finish_time(t, nbytes) - t for t in starts) / len(starts)


def _for_trace(problem: Problem, plan: Plan, settings: Settings) -> Plan:
    """Over a trace, the plan that does best across its rates.

    The plan for the mean rate is not the best plan for a rate that varies: throughput over
    time averages 1 / period over the trace (not 1 / the period at the mean rate), and a single
    request's expected latency averages its latency over arrival times (transfer time goes with
    1 / rate, so the slow stretches dominate it; see :func:`expected_latency`). The candidates
    are the plans COACH finds for the trace's quantiles (10 %..90 %); each is scored on 20
    time-weighted quantiles of the rate (throughput) or on ``TRACE_STARTS`` arrival times
    (latency), and priced at the mean as usual.
    """
    net = settings.network
    rates = [max(r, 1e-3) for r in net.trace.quantiles(TRACE_QUANTILES)]
    cands = {(plan.end_nodes, tuple(sorted(plan.codecs.items()))): plan}
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        r = max(net.trace.quantiles([q])[0], 1e-3)
        sub = dataclasses.replace(problem, network=dataclasses.replace(net, uplink_mbps=r))
        p = solve("coach", sub)
        cands.setdefault((p.end_nodes, tuple(sorted(p.codecs.items()))), p)

    def cost(p: Plan) -> float:
        if plan.objective == "latency":
            return expected_latency(evaluate(problem.dag, p.end_nodes, p.bits, net, objective="latency",
                                             input_bits=settings.input_bits, codecs=p.codecs), net)
        at = [evaluate(problem.dag, p.end_nodes, p.bits, dataclasses.replace(net, uplink_mbps=r),
                       objective=plan.objective, input_bits=settings.input_bits, codecs=p.codecs)
              for r in rates]
        return -sum(1.0 / e.period for e in at) / len(at)

    best = min(cands.values(), key=cost)
    if best is plan:
        return plan
    out = evaluate(problem.dag, best.end_nodes, best.bits, net, strategy=plan.strategy,
                   objective=plan.objective, input_bits=settings.input_bits, codecs=best.codecs)
    out.extra["for_trace"] = f"best of {len(cands)} plans for the trace's rate quantiles"
    return out


def compile(model: nn.Module, example_inputs: Any, *, network: Any = None, end: Any = None,
            cloud: Any = None, strategy: str = "coach", objective: str = "throughput",
            accuracy_budget: float = 0.005, calibration: Any = None,
            bits: Sequence[int] = (2, 3, 4, 5, 6, 8, 16, 32), costs: str = "measured",
            **options: Any) -> CompiledModel:
    """Split ``model`` between an end device and the cloud; see the module docstring.

    Other keywords (``end_nodes``, ``manual_bits``, ``input_bits``, ``output_tolerance``,
    ``leaf_modules``, ``max_plans``, ``progress``...) are fields of :class:`coach_fx.Settings`.
    """
    kw: dict[str, Any] = dict(strategy=strategy, objective=objective, accuracy_budget=accuracy_budget,
                              calibration=calibration, bits=bits, costs=costs)
    for k, v in (("network", network), ("end", end), ("cloud", cloud)):
        if v is not None:
            kw[k] = v
    if strategy == "manual" and "manual_bits" not in options and isinstance(bits, (int, Mapping)):
        options["manual_bits"] = bits
        kw["bits"] = (2, 3, 4, 5, 6, 8, 16, 32)
    settings = Settings.from_options(options, **kw)
    gm, inputs, dag = prepare(model, example_inputs, settings)
    plan, oracle = plan_model(gm, inputs, dag, settings)
    cm = CompiledModel(gm, dag, plan, settings, inputs, oracle)
    if settings.costs == "measured" and settings.calibrate:
        cm.calibrate()
    return cm
