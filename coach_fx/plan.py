"""``Plan`` and ``evaluate``: the price of a cut with the formulas of DESIGN.md §1.

    T_end   = Σ_{v∈S} t_end(v) + quantize/pack time of the crossing tensors
    T_link  = Σ_{x∈X(S)} bytes(x, b_x) / uplink + rtt/2          (0 when nothing crosses)
    T_cloud = Σ_{v∉S} t_cloud(v) + unpack/dequantize + output bytes / downlink + rtt/2
    latency = T_end + T_link + T_cloud;  period = max(...);  throughput = 1 / period
    bubble  = 1 - (T_end + T_link + T_cloud) / (3 · period)

Example::

    >>> plan = evaluate(dag, end_nodes={"conv1", "bn1", "relu"}, bits=8, network=Network(10))  # doctest: +SKIP
    >>> plan.period, plan.bits                                                              # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from coach_fx.dag import LayerDAG
# every message and tensor size is the wire format's (one home: ``coach_fx.runtime.wire``)
from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES, tensor_bytes
from coach_fx.settings import Network



@dataclass(frozen=True)
class Plan:
    """Where the model is cut, how many bits each crossing tensor gets, and what that costs.

    Immutable: a re-measured or re-checked plan is a new one (``dataclasses.replace``), never
    written into one that other objects share."""

    strategy: str
    end_nodes: tuple[str, ...]
    cut: tuple[str, ...]
    #: how each crossing travels: its bits ...
    bits: dict[str, int]
    #: ... the model inputs that cross as an image (input name -> "jpeg90", "png"), others as ``bits``
    codecs: dict[str, str]
    #: ... and the crossings whose packed codes travel coded (-> "deflate"), where that shortens them
    tensor_codecs: dict[str, str]
    #: the priced stage times (seconds, on the emulated devices) and message bytes
    t_end: float
    t_link: float
    t_cloud: float
    bytes_sent: int
    objective: str = "throughput"
    #: the accuracy oracle's verdict: the measured metric (drop, disagreement or relative L2;
    #: ``note`` says which and how it was checked) and whether it is within the budget
    accuracy: float | None = None
    accuracy_ok: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The plan as plain data, flat (``plan.json``), without ``extra``."""
        return {"strategy": self.strategy, "end_nodes": list(self.end_nodes), "cut": list(self.cut),
                "bits": dict(self.bits), "t_end": self.t_end, "t_link": self.t_link,
                "t_cloud": self.t_cloud, "bytes_sent": self.bytes_sent, "objective": self.objective,
                "accuracy": self.accuracy, "accuracy_ok": self.accuracy_ok, "note": self.note,
                "codecs": dict(self.codecs), "tensor_codecs": dict(self.tensor_codecs)}

    @property
    def tensor_codec(self) -> str | None:
        """The lossless codec the plan codes its quantized crossings with (None: none)."""
        return next(iter(self.tensor_codecs.values()), None)

    def crossing_label(self, x: str) -> str:
        """How crossing ``x`` travels, e.g. ``"x@jpeg90"``, ``"relu@4b"``, ``"relu@4b+deflate"``."""
        if x in self.codecs:
            return f"{x}@{self.codecs[x]}"
        return f"{x}@{self.bits[x]}b" + (f"+{self.tensor_codecs[x]}" if x in self.tensor_codecs else "")

    @property
    def latency(self) -> float:
        return self.t_end + self.t_link + self.t_cloud

    @property
    def period(self) -> float:
        return max(self.t_end, self.t_link, self.t_cloud)

    @property
    def throughput(self) -> float:
        return 1.0 / self.period if self.period > 0 else math.inf

    @property
    def bubble_ratio(self) -> float:
        return 1.0 - self.latency / (3 * self.period) if self.period > 0 else 0.0

    @property
    def score(self) -> tuple[float, float]:
        """The objective as a sort key (smaller is better)."""
        if self.objective == "latency":
            return (self.latency, self.period)
        return (self.period, self.latency)


def plan_bits(dag: LayerDAG, cut: Iterable[str], bits: int | Mapping[str, int],
              input_bits: int | None = None) -> dict[str, int]:
    """Bits per crossing tensor: ``bits`` for each (an int, or a mapping with 32 as default);
    model inputs get ``input_bits`` when given; tensors that are not float go as they are (32)."""
    out = {}
    for x in cut:
        if not dag.info[x].quantizable:
            out[x] = 32
        elif isinstance(bits, Mapping):
            out[x] = int(bits.get(x, 32))
        elif input_bits is not None and x in dag.inputs:
            out[x] = input_bits
        else:
            out[x] = int(bits)
    return out


def usable_codecs(dag: LayerDAG, cut: Iterable[str], codec: str | Mapping[str, str] | None
                  ) -> dict[str, str]:
    """The crossing model inputs that ``codec`` applies to (one name for every image-shaped
    input that crosses, or a mapping input -> codec), as input -> codec."""
    if not codec:
        return {}
    out = {}
    for x in cut:
        c = codec.get(x) if isinstance(codec, Mapping) else codec
        if c is not None and c in dag.input_codecs.get(x, {}):
            out[x] = c
        elif c is not None and isinstance(codec, Mapping):
            raise ValueError(f"codec {c!r} is not available for {x!r} (available: "
                             f"{sorted(dag.input_codecs.get(x, {})) or 'none: not an image-shaped input'})")
    return out


def mean_bytes(dag: LayerDAG, plan: Plan) -> int:
    """The plan's message bytes averaged over a stream: a codec's coded size varies per frame,
    and ``bytes_sent`` may price it at a high quantile (see ``CodecCost.priced``)."""
    costs = [dag.input_codecs[x][c] for x, c in plan.codecs.items()]
    costs += [dag.tensor_codecs[c][x][plan.bits[x]] for x, c in plan.tensor_codecs.items()]
    return plan.bytes_sent - sum(c.priced(plan.objective) - c.average for c in costs)


@dataclass(frozen=True)
class CrossingPrice:
    """What one crossing tensor adds to a plan: bytes on the wire (its header included), end
    and cloud seconds (quantize/dequantize, coding), and the codec it travels with, if any."""

    nbytes: int
    t_end: float
    t_cloud: float
    codec: str | None = None


def crossing_price(dag: LayerDAG, x: str, bits: int, objective: str,
                   tensor_codec: str | None = None, image_codec: str | None = None) -> CrossingPrice:
    """The price of sending ``x`` at ``bits``: as an image coded by ``image_codec`` (a model
    input), else raw, or with the lossless ``tensor_codec`` where its coded size is shorter."""
    if image_codec is not None:
        cost = dag.input_codecs[x][image_codec]
        return CrossingPrice(cost.priced(objective) + TENSOR_HEADER_BYTES, cost.t_end, cost.t_cloud,
                             image_codec)
    d = dag.info[x]
    nbytes, t_end, t_cloud, codec = tensor_bytes(d.numel, d.bytes, d.quantizable, bits, d.rows), 0.0, 0.0, None
    lossless = dag.coded_cost(x, tensor_codec, bits) if d.quantizable and bits < 32 else None
    if lossless is not None and lossless.priced(objective) + TENSOR_HEADER_BYTES < nbytes:
        nbytes, t_end, t_cloud = lossless.priced(objective) + TENSOR_HEADER_BYTES, lossless.t_end, lossless.t_cloud
        codec = lossless.codec
    if d.quantizable and bits < 32:
        q_end, q_cloud = dag.quant_cost(bits)
        t_end += q_end * d.numel
        t_cloud += q_cloud * d.numel
    return CrossingPrice(nbytes, t_end, t_cloud, codec)


def evaluate(dag: LayerDAG, end_nodes: Iterable[str], bits: int | Mapping[str, int],
             network: Network, *, strategy: str = "manual", objective: str = "throughput",
             input_bits: int | None = None, codecs: str | Mapping[str, str] | None = None,
             tensor_codec: str | None = None) -> Plan:
    """Price the plan that runs ``end_nodes`` on the end device (must be predecessor-closed);
    ``codecs``: image codec(s) for the model inputs that cross (see :func:`usable_codecs`);
    ``tensor_codec``: the lossless codec ("deflate") for the packed codes of the quantized
    crossings whose measured coded size (``LayerDAG.tensor_codecs``) is shorter."""
    s = set(end_nodes)
    unknown = s - set(dag.nodes)
    if unknown:
        raise ValueError(f"unknown node(s) in end_nodes: {sorted(unknown)[:5]}")
    if not dag.is_closed(s):
        missing = sorted({p for v in s for p in dag.preds(v)} - s, key=dag.index.get)
        raise ValueError(f"end_nodes is not closed under predecessors: missing {missing[:5]}")
    cut = dag.crossing(s)
    b = plan_bits(dag, cut, bits, input_bits)
    coded = usable_codecs(dag, cut, codecs)
    t_end = sum(dag.t_end(v) for v in s)
    t_cloud = sum(dag.t_cloud(v) for v in dag.nodes if v not in s)
    nbytes = 0
    tensor_coded: dict[str, str] = {}
    for x in cut:
        if x in coded:
            b[x] = 8
            c = crossing_price(dag, x, 8, objective, image_codec=coded[x])
        else:
            c = crossing_price(dag, x, b[x], objective, tensor_codec)
            if c.codec is not None:
                tensor_coded[x] = c.codec
        nbytes += c.nbytes
        t_end += c.t_end
        t_cloud += c.t_cloud
    t_link = 0.0
    if len(s) < len(dag.nodes):
        nbytes += MESSAGE_HEADER_BYTES
        half_rtt = network.rtt_ms / 2e3
        t_link = network.up_seconds(nbytes) + half_rtt
        t_cloud += network.down_seconds(dag.output_bytes() + MESSAGE_HEADER_BYTES) + half_rtt
    order = tuple(v for v in dag.nodes if v in s)
    return Plan(strategy, order, cut, b, coded, tensor_coded, t_end, t_link, t_cloud, nbytes, objective)
