"""A plan's price as per-node coefficients: what the vectorized bounds of ``optimize.coach``
and the wide-block program of ``optimize.milp`` both price, so they rank plans alike.

Node i run on the end costs ``t_end[i]``, in the cloud ``t_cloud[i]``; when it crosses it
adds ``wire[i]`` bytes and ``cross_end[i]`` / ``cross_cloud[i]`` seconds (quantize and
dequantize, coding). Model input j crosses when one of its readers is in the cloud, by one of
its ``options`` (raw, or an image codec). A plan that is not end-only pays ``up_s_per_byte``
a byte, ``link_fixed`` (the message header and half the round trip) and ``down`` (the result).

Example::

    >>> lp = LinearPrice.exact(problem, width=8)       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coach_fx.optimize.problem import Problem
from coach_fx.plan import crossing_price, usable_codecs
from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES, tensor_bytes


@dataclass(frozen=True)
class InputOption:
    """One way a crossing model input travels: ``codec`` None is raw at ``input_bits``."""

    codec: str | None
    nbytes: float
    t_end: float
    t_cloud: float


@dataclass(frozen=True)
class NodeCoefficients:
    """Per DAG node: seconds on the end, in the cloud; when it crosses, bytes and seconds."""

    t_end: np.ndarray
    t_cloud: np.ndarray
    wire: np.ndarray
    cross_end: np.ndarray
    cross_cloud: np.ndarray


@dataclass(frozen=True)
class LinkCoefficients:
    """What a plan that is not end-only pays for its link (see the module docstring)."""

    up_s_per_byte: float
    link_fixed: float
    down: float


@dataclass(frozen=True)
class LinearPrice:
    node: NodeCoefficients
    #: per model input: (reader positions, the ways it may travel)
    inputs: tuple[tuple[tuple[int, ...], tuple[InputOption, ...]], ...]
    readers: tuple[tuple[int, ...], ...]
    outputs: tuple[int, ...]
    link: LinkCoefficients

    @staticmethod
    def _of(p: Problem, wire: np.ndarray, cross_end: np.ndarray, cross_cloud: np.ndarray,
            inputs: list[tuple[InputOption, ...]]) -> "LinearPrice":
        dag = p.dag
        info = [dag.info[v] for v in dag.nodes]
        half_rtt = p.network.rtt_ms / 2e3
        per_byte = p.network.up_seconds(1.0)
        return LinearPrice(
            NodeCoefficients(np.array([d.t_end for d in info]), np.array([d.t_cloud for d in info]),
                             wire, cross_end, cross_cloud),
            tuple((tuple(dag.index[r] for r in dag.readers(x)), opts) for x, opts in zip(dag.inputs, inputs)),
            tuple(tuple(dag.index[r] for r in dag.readers(v)) for v in dag.nodes),
            tuple(dag.index[o] for o in dag.outputs if o in dag.index),
            LinkCoefficients(per_byte, per_byte * MESSAGE_HEADER_BYTES + half_rtt,
                             p.network.down_seconds(dag.output_bytes() + MESSAGE_HEADER_BYTES) + half_rtt))

    @staticmethod
    def optimistic(p: Problem) -> "LinearPrice":
        """A lower bound of every plan's true price at any allowed width: no quantization or
        coding work, the cheapest allowed bits, each tensor by its shortest coding."""
        dag = p.dag
        b0 = p.bits[0]

        def wire(name: str, is_input: bool) -> int:
            d = dag.info[name]
            b = p.input_bits if is_input and d.quantizable else b0
            raw = tensor_bytes(d.numel, d.bytes, d.quantizable, b, d.rows)
            coded = [min(c.bytes, c.average) + TENSOR_HEADER_BYTES
                     for k, c in dag.input_codecs.get(name, {}).items() if is_input and k in p.codecs]
            if not is_input or d.quantizable and p.input_bits < 32:
                coded += [c.priced(p.objective) + TENSOR_HEADER_BYTES for tc in p.tensor_codecs
                          for w, c in dag.tensor_codecs[tc].get(name, {}).items()
                          if w in p.bits or is_input and w == p.input_bits]
            return min([raw, *coded])   # a codec's coding time only adds: still a lower bound
        n = len(dag.nodes)
        zero = np.zeros(n)
        return LinearPrice._of(p, np.array([wire(v, False) for v in dag.nodes], dtype=np.float64),
                               zero, zero, [(InputOption(None, float(wire(x, True)), 0.0, 0.0),)
                                            for x in dag.inputs])

    @staticmethod
    def exact(p: Problem, width: int, tensor_codec: str | None = None) -> "LinearPrice":
        """The true price (``coach_fx.plan.evaluate``) of a plan that sends every quantizable
        crossing at ``width`` with ``tensor_codec``; each input raw or by a usable codec."""
        dag = p.dag
        prices = [crossing_price(dag, v, width if dag.info[v].quantizable else 32, p.objective,
                                 tensor_codec) for v in dag.nodes]
        inputs = []
        for x in dag.inputs:
            ib = p.input_bits if dag.info[x].quantizable else 32
            raw = crossing_price(dag, x, ib, p.objective, tensor_codec)
            opts = [InputOption(None, float(raw.nbytes), raw.t_end, raw.t_cloud)]
            for c in p.codecs:
                if usable_codecs(dag, (x,), c):
                    cp = crossing_price(dag, x, 8, p.objective, image_codec=c)
                    opts.append(InputOption(c, float(cp.nbytes), cp.t_end, cp.t_cloud))
            inputs.append(tuple(opts))
        return LinearPrice._of(p, np.array([c.nbytes for c in prices], dtype=np.float64),
                               np.array([c.t_end for c in prices]), np.array([c.t_cloud for c in prices]),
                               inputs)

    def no_dearer(self, other: "LinearPrice") -> bool:
        """Every plan costs at most what it costs under ``other`` (same DAG and network)."""
        a, b = self.node, other.node
        return (all(np.all(x <= y) for x, y in ((a.wire, b.wire), (a.cross_end, b.cross_end),
                                                (a.cross_cloud, b.cross_cloud)))
                and all(len(u) == len(v) and all(x.nbytes <= y.nbytes and x.t_end <= y.t_end
                                                 and x.t_cloud <= y.t_cloud for x, y in zip(u, v))
                        for (_, u), (_, v) in zip(self.inputs, other.inputs)))
