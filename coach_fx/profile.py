"""Per-node costs on the end and the cloud device, and the LayerDAG built from them.

Two sources:

* ``measured``: an ``fx.Interpreter`` times every node on this host (one warm-up run, then the
  median of ``repeat`` runs); a device's time is the host time × its ``slowdown``.
* ``analytic``: FLOPs and bytes moved from ``passes.annotate`` over a fixed host rate
  (:data:`HOST_FLOPS`, :data:`HOST_BYTES_PER_S`, :data:`OP_OVERHEAD_S`); deterministic, so
  tests and the planner benchmark do not depend on the load of this machine.

Example::

    >>> dag = build_dag(gm, example_inputs, Settings(costs="analytic"))   # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from coach_fx.dag import CodecCost, LayerDAG
from coach_fx.passes.annotate import NodeMeta
from coach_fx.progress import Progress
from coach_fx.settings import Device, Settings, calibration_parts
from coach_fx.timing import run_times

HOST_FLOPS = 20e9            # FLOP/s of the reference host in the analytic model
HOST_BYTES_PER_S = 10e9      # memory bandwidth of the reference host
OP_OVERHEAD_S = 5e-6         # fixed cost of launching one op
ANALYTIC_QUANT_S_PER_ELEM = 4e-9   # quantize+pack (or unpack+dequantize) per element
ANALYTIC_CODEC_S_PER_ELEM = 20e-9  # image encode (or decode) per element
#: Image codecs priced for every image-shaped input (the practitioner's baselines use them)
#: besides ``Settings.input_codecs``.
BASELINE_CODECS = ("jpeg90", "png")
#: Frames whose coded sizes price a codec (the first calibration samples, else the example),
#: and the quantile of their sizes a plan is priced at (a plan must keep up with the frames
#: that code large, not only the average one).
CODEC_FRAMES = 64
CODEC_QUANTILE = 0.95


class _Timer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name] = time.perf_counter() - t0
        return out


def measure_node_times(gm: fx.GraphModule, example_inputs: Sequence[Any], repeat: int = 5,
                       progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:
    """Median seconds per fx node on this host (after one warm-up run)."""
    runs: dict[str, list[float]] = {}
    with torch.no_grad():
        for r in range(repeat + 1):
            timer = _Timer(gm)
            timer.run(*example_inputs)
            if r:  # run 0 warms caches and allocators
                for k, v in timer.times.items():
                    runs.setdefault(k, []).append(v)
            if progress:
                progress(r + 1, repeat + 1, "profiling")
    return {k: statistics.median(v) for k, v in runs.items()}


def analytic_node_times(gm: fx.GraphModule) -> dict[str, float]:
    """Host seconds per fx node from FLOPs and bytes moved (needs ``passes.annotate``)."""
    out = {}
    for n in gm.graph.nodes:
        info = n.meta.get("coach")
        if not isinstance(info, NodeMeta) or n.op in ("placeholder", "output", "get_attr") \
                or info.kind == "value":
            out[n.name] = 0.0
            continue
        out[n.name] = OP_OVERHEAD_S + info.flops / HOST_FLOPS + info.moved / HOST_BYTES_PER_S
    return out


def measure_quant_cost(numel: int = 1 << 18, bits: int = 8, repeat: int = 3) -> tuple[float, float]:
    """Host seconds per element to quantize+pack and to unpack+dequantize."""
    import coach_fx.passes.ops  # noqa: F401 - registers torch.ops.coach
    x = torch.randn(numel)
    ops = torch.ops.coach
    def q() -> Any:
        c, s, z = ops.quantize(x, bits)
        return ops.pack(c, bits), s, z
    q()   # warm-up
    p, s, z = q()
    def dq() -> Any:
        return ops.dequantize(ops.unpack(p, bits, [numel]), s, z, bits, torch.float32)
    def best(f: Callable[[], Any]) -> float:
        return min(run_times(f, repeat, 0)) / numel
    return best(q), best(dq)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (None: leave as is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_times(host: dict[str, float], device: Device) -> dict[str, float]:
    """A device's per-node seconds: host × slowdown, overridden by the device's own figures."""
    own = dict(device.node_costs or {})
    return {k: own.get(k, v * device.slowdown) for k, v in host.items()}


def host_times(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings) -> dict[str, float]:
    if settings.costs == "analytic":
        return analytic_node_times(gm)
    bar = Progress("profiling", enabled=settings.progress, fn=settings.progress_fn)
    try:
        return measure_node_times(gm, example_inputs, settings.profile_repeat, bar.update)
    finally:
        bar.close()


def build_dag(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
              host: dict[str, float] | None = None) -> LayerDAG:
    """LayerDAG of an annotated GraphModule with end and cloud costs from ``settings``."""
    with torch_threads(settings.threads):
        return _build_dag(gm, example_inputs, settings, host)


def _build_dag(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
               host: dict[str, float] | None) -> LayerDAG:
    host = host if host is not None else host_times(gm, example_inputs, settings)
    quant = {}
    for b in settings.bits:
        if b >= 32:
            continue
        qe, qc = (ANALYTIC_QUANT_S_PER_ELEM, ANALYTIC_QUANT_S_PER_ELEM) if settings.costs == "analytic" \
            else measure_quant_cost(bits=b)
        quant[b] = (qe * settings.end.slowdown, qc * settings.cloud.slowdown)
    dag = LayerDAG.from_graph_module(gm, device_times(host, settings.end),
                                     device_times(host, settings.cloud), quant)
    dag.host_times = host  # kept for the prediction check in `coach plan`
    dag.input_codecs = codec_costs(gm, example_inputs, settings)
    return dag


def codec_costs(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings
                ) -> dict[str, dict[str, CodecCost]]:
    """Per image-shaped model input, what each image codec costs per request: the
    ``CODEC_QUANTILE`` of the coded sizes of real frames and the measured coding times
    (analytic costs: a fixed rate per element), each device's own."""
    from coach_fx.runtime.imagecodec import applicable, measure
    try:
        import torchvision.io  # noqa: F401 - the coders
    except ImportError:
        warnings.warn("coach_fx: image codecs need torchvision (pip install 'coach-fx[vision]'); "
                      "the model input crosses raw", stacklevel=2)
        return {}
    codecs = tuple(dict.fromkeys([*settings.input_codecs, *BASELINE_CODECS]))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    frames = calibration_parts(settings.calibration)[0] if settings.calibration is not None else ()
    out: dict[str, dict[str, CodecCost]] = {}
    for i, (name, ex) in enumerate(zip(names, example_inputs)):
        if not isinstance(ex, torch.Tensor) or ex.dim() != 4 or not applicable(tuple(ex.shape), ex.dtype):
            continue
        sample = frames[i] if i < len(frames) and isinstance(frames[i], torch.Tensor) \
            and frames[i].shape[1:] == ex.shape[1:] else ex
        sample = sample[:CODEC_FRAMES]
        per_request = ex.shape[0]
        costs = {}
        for codec in codecs:
            m = measure(sample, codec, repeat=1 if settings.costs == "analytic" else 3)
            if settings.costs == "analytic":
                enc = dec = ANALYTIC_CODEC_S_PER_ELEM * ex[0].numel()
            else:
                enc, dec = m.encode_s, m.decode_s
            costs[codec] = CodecCost(codec, per_request * m.quantile(CODEC_QUANTILE),
                                     per_request * enc * settings.end.slowdown,
                                     per_request * dec * settings.cloud.slowdown,
                                     round(per_request * sum(m.sizes) / len(m.sizes)))
        out[name] = costs
    return out
