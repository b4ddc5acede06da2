"""Per-node costs on the end and the cloud device, and the LayerDAG built from them.

Two sources:

* ``measured``: an ``fx.Interpreter`` times every node on this host (one warm-up run, then the
  median of ``repeat`` runs); a device's time is the host time × its ``slowdown``.
* ``analytic``: FLOPs and bytes moved from ``passes.annotate`` over a fixed host rate
  (:data:`HOST_FLOPS`, :data:`HOST_BYTES_PER_S`, :data:`OP_OVERHEAD_S`); deterministic, so
  tests and the planner benchmark do not depend on the load of this machine.

Example::

    >>> dag = build_dag(gm, example_inputs, Settings.of(costs="analytic"))   # doctest: +SKIP
"""

from __future__ import annotations

import math
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from coach_fx.dag import CodecCost, LayerDAG
from coach_fx.passes.annotate import NodeMeta
from coach_fx.progress import Progress
from coach_fx.runtime.wire import Entry
from coach_fx.passes.wire_sizes import packed_nbytes, row_param_bytes
from coach_fx.device_profile import device_times, node_ops, quant_costs
from coach_fx.settings import calibration_parts
from coach_fx.settings import Settings
from coach_fx.runtime.timing import busy_since, clock, quiet_times, run_times

HOST_FLOPS = 20e9            # FLOP/s of the modelled host in the analytic model
HOST_BYTES_PER_S = 10e9      # memory bandwidth of the modelled host
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
#: Requests whose crossing tensors price a lossless tensor codec (each node's value on the
#: first calibration samples, else on the example), at ``CODEC_QUANTILE`` of their coded sizes.
TENSOR_CODEC_FRAMES = 16
#: Elements of one tensor coded to price a codec: a larger one is priced on evenly spaced
#: slices of this many elements in all, quantized with the whole tensor's range (its coded
#: share times the whole's packed size), so large models compile in seconds, not minutes
TENSOR_CODEC_SAMPLE = 1 << 16
#: deflate (level 1) seconds per packed byte in the analytic model (about 12 ns/byte to code
#: and 3 to inflate on this project's development host, trained resnet18 features)
ANALYTIC_DEFLATE_S_PER_BYTE = (12e-9, 3e-9)


class _Timer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        t0 = clock()
        out = super().run_node(n)
        self.times[n.name] = busy_since(t0)
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


def measure_batch_efficiency(model: Callable[..., Any], example_inputs: Sequence[Any], batch: int,
                             repeat: int = 5, rounds: int = 3) -> float:
    """Seconds per request of ``model`` run on ``batch`` requests at once / seconds of one
    alone, on this host (busy time, interleaved rounds), within (0, 1]: what a cloud that
    ``batch`` ends share gains by batching their requests (``Device(batch_efficiency=...)``).
    The example's tensors are repeated along dim 0 (its batch dimension).

    >>> eff = measure_batch_efficiency(torch.nn.Linear(64, 64), (torch.randn(1, 64),), 16)  # doctest: +SKIP
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    one = tuple(example_inputs)
    many = tuple(torch.cat([x] * batch) if isinstance(x, torch.Tensor) and x.dim() else x for x in one)
    with torch.no_grad():
        t_one, t_many = quiet_times([lambda: model(*one), lambda: model(*many)], repeat=repeat,
                                    warmup=2, rounds=rounds)
    return float(min(1.0, max(1e-3, t_many / (batch * t_one))))


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
    # every width a plan may price: the search's and the model input's (it crosses at
    # ``input_bits`` whatever ``bits`` holds)
    for b in sorted(set(settings.bits) | {settings.input_width}):
        if b >= 32:
            continue
        # the end quantizes and packs, the cloud unpacks and dequantizes: each device's own
        # figure (a profile's), else this host's x its slowdown
        host_q = None
        if any(b not in (d.quant_costs or {}) for d in (settings.end, settings.cloud)):
            host_q = (ANALYTIC_QUANT_S_PER_ELEM, ANALYTIC_QUANT_S_PER_ELEM) if settings.costs == "analytic" \
                else measure_quant_cost(bits=b)
        quant[b] = (quant_costs(settings.end, b, host_q)[0], quant_costs(settings.cloud, b, host_q)[1])
    ops = node_ops(gm)
    dag = LayerDAG.from_graph_module(gm, device_times(host, settings.end, ops),
                                     device_times(host, settings.cloud, ops), quant)
    dag.host_times = host  # kept for the prediction check in `coach plan`
    dag.input_codecs = codec_costs(gm, example_inputs, settings)
    dag.tensor_codecs = tensor_codec_costs(gm, example_inputs, dag, settings)
    return dag


@dataclass(frozen=True)
class CodecMeasure:
    """Real coded sizes of real frames and this host's coding times."""

    sizes: tuple[int, ...]   # payload bytes per sample, its header included
    encode_s: float          # median seconds to encode one sample
    decode_s: float          # median seconds to decode one sample

    def quantile(self, q: float = 0.95) -> int:
        """The size (bytes) that ``q`` of the samples stay within (nearest rank)."""
        if not self.sizes:
            return 0
        s = sorted(self.sizes)
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def measure_codec(x: torch.Tensor, codec: str, repeat: int = 3) -> CodecMeasure:
    """Encode and decode each sample of ``x`` (N, C, H, W) with an image codec
    (``passes.imagecodec``) on its own, ``repeat`` times.

    >>> measure_codec(torch.rand(2, 3, 16, 16), "jpeg90").encode_s > 0      # doctest: +SKIP
    True
    """
    from coach_fx.passes.imagecodec import decode, encode, parse
    codec = parse(codec)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    sizes, enc, dec = [], [], []
    for s in x.unbind(0):
        s = s.unsqueeze(0)
        for _ in range(max(1, repeat)):
            t0 = clock()
            p = encode(s, codec)
            enc.append(busy_since(t0))
            t1 = clock()
            decode(p, codec, tuple(s.shape), s.dtype)
            dec.append(busy_since(t1))
        sizes.append(p.numel())
    return CodecMeasure(tuple(sizes), statistics.median(enc), statistics.median(dec))


def codec_costs(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings
                ) -> dict[str, dict[str, CodecCost]]:
    """Per image-shaped model input, what each image codec costs per request: the
    ``CODEC_QUANTILE`` of the coded sizes of real frames and the measured coding times
    (analytic costs: a fixed rate per element), each device's own."""
    from coach_fx.passes.imagecodec import applicable
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
            m = measure_codec(sample, codec, repeat=1 if settings.costs == "analytic" else 3)
            if settings.costs == "analytic":
                enc = dec = ANALYTIC_CODEC_S_PER_ELEM * ex[0].numel()
            else:
                enc, dec = m.encode_s, m.decode_s
            costs[codec] = CodecCost(codec, per_request * m.quantile(CODEC_QUANTILE),
                                     settings.end.seconds(per_request * enc),
                                     settings.cloud.seconds(per_request * dec),
                                     round(per_request * sum(m.sizes) / len(m.sizes)))
        out[name] = costs
    return out


def _requests(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings, n: int) -> list[tuple]:
    """Up to ``n`` requests shaped like ``example_inputs`` cut from the calibration frames
    (the example itself where they do not fit)."""
    frames = calibration_parts(settings.calibration)[0] if settings.calibration is not None else ()
    ex = tuple(example_inputs)
    fits = bool(ex) and len(frames) == len(ex) and all(
        isinstance(f, torch.Tensor) and isinstance(e, torch.Tensor) and e.dim() > 0
        and f.shape[1:] == e.shape[1:] and f.dtype == e.dtype for f, e in zip(frames, ex))
    if not fits:
        return [ex]
    per = ex[0].shape[0]
    count = min(n, min(f.shape[0] for f in frames) // per)
    return [tuple(f[k * per:(k + 1) * per] for f in frames) for k in range(count)] or [ex]


class _Values(fx.Interpreter):
    """Runs the graph and keeps the tensors of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _codec_sample(value: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``value`` itself, or for a tensor over ``TENSOR_CODEC_SAMPLE`` elements evenly spaced
    slices of it led by its minimum and maximum (so that they quantize with its range), and
    how much larger the whole is."""
    flat = value.reshape(-1)
    n = flat.numel()
    if n <= TENSOR_CODEC_SAMPLE:
        return value, 1.0
    k = 8
    run = TENSOR_CODEC_SAMPLE // k
    parts = [flat.min().reshape(1), flat.max().reshape(1)]
    parts += [flat[i * (n - run) // (k - 1):][:run] for i in range(k)]
    sample = torch.cat(parts)
    return sample, n / sample.numel()


def tensor_codec_costs(gm: fx.GraphModule, example_inputs: Sequence[Any], dag: LayerDAG,
                       settings: Settings) -> dict[str, dict[str, dict[int, CodecCost]]]:
    """Per lossless codec (``Settings.tensor_codecs``), per float node or model input, per
    bit width: the ``CODEC_QUANTILE`` of the coded sizes of its packed codes over
    ``TENSOR_CODEC_FRAMES`` real requests (coded exactly as the wire codes them, so a size
    never exceeds the packed one) and the coding times (analytic costs: a fixed rate)."""
    from coach_fx.runtime.codec import quantized_entry
    if not settings.tensor_codecs:
        return {}
    widths = {x: [b for b in settings.bits if b < 32] for x in dag.nodes if dag.info[x].quantizable}
    widths.update({x: [settings.input_width] for x in dag.inputs
                   if dag.info[x].quantizable and settings.input_width < 32})
    timed = settings.costs == "measured"    # analytic costs price coding at a fixed rate
    sizes: dict[tuple[str, str, int], list[int]] = {}
    times: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    with torch.no_grad():
        for req in _requests(gm, example_inputs, settings, TENSOR_CODEC_FRAMES):
            run = _Values(gm, set(widths))
            run.run(*req)
            for name, whole in run.values.items():
                value, scale = _codec_sample(whole)
                for bits in widths[name]:
                    for codec in settings.tensor_codecs:
                        plain = quantized_entry(value, bits)   # quantizing is priced apart
                        t0 = clock()
                        e = Entry.quantized(plain.data, *plain.quant_params(), bits, plain.shape,
                                            plain.dtype, codec)
                        coding = busy_since(t0)
                        t1 = clock()
                        if timed:
                            e.packed()
                        decoding = busy_since(t1)
                        whole_packed = packed_nbytes(whole.numel(), bits)
                        if not e.codec:            # no shorter: it would go packed
                            coded = whole_packed
                        elif scale == 1.0:
                            coded = e.data.numel()
                        else:                      # the sample's coded share of the whole
                            coded = min(whole_packed - 1, round(e.data.numel() * scale))
                        # a token tensor's row scales travel beside its codes, uncoded
                        coded += row_param_bytes(dag.info[name].rows, bits)
                        sizes.setdefault((codec, name, bits), []).append(int(coded))
                        times.setdefault((codec, name, bits), []).append(
                            (scale * coding, scale * decoding if e.codec else 0.0))
    out: dict[str, dict[str, dict[int, CodecCost]]] = {}
    for (codec, name, bits), got in sizes.items():
        got = sorted(got)
        q = got[min(len(got) - 1, max(0, math.ceil(CODEC_QUANTILE * len(got)) - 1))]
        if settings.costs == "analytic":
            packed = packed_nbytes(dag.info[name].numel, bits)
            enc, dec = (r * packed for r in ANALYTIC_DEFLATE_S_PER_BYTE)
        else:
            enc = statistics.median(t[0] for t in times[(codec, name, bits)])
            dec = statistics.median(t[1] for t in times[(codec, name, bits)])
        out.setdefault(codec, {}).setdefault(name, {})[bits] = CodecCost(
            codec, q, settings.end.seconds(enc), settings.cloud.seconds(dec), round(sum(got) / len(got)))
    return out
