"""Plans as the runtime runs them, as data. :class:`CutProfile` is the one record of a plan
without tensors: what one request sends (:class:`Sizes`), its stage times, its safe bits and
its cache's hit rate; the online controller and the pipeline simulator both read it.
:class:`Variant` binds a profile to what runs it on the end (its halves, bits, measured host
times), :class:`CacheSetup` is a plan's calibrated semantic cache. ``coach_fx.online.deploy``
makes them from compiled plans; the runtime never plans.

Example::

    >>> sizes = Sizes(quant_numel=(100_000,))
    >>> sizes.message_bytes(4)
    50080
    >>> CutProfile(sizes, min_bits=4, t_end=0.05, t_cloud=0.01).compute_s
    0.05
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from coach_fx.passes.boundary import Boundary
from coach_fx.runtime.codec import crossing_bytes
from coach_fx.runtime.config import Bands, CacheConfig, ControlConfig, PolicyConfig, mode_of
from coach_fx.passes.wire_sizes import TENSOR_HEADER_BYTES, message_bytes, tensor_bytes


@dataclass(frozen=True)
class Sizes:
    """What one request of a plan sends: float tensors quantized per request with the bits
    asked for, and bytes that cross as they are."""

    #: elements of each float tensor quantized per request (one count per tensor)
    quant_numel: tuple[int, ...] = ()
    #: their bytes sent as they are (at 32 bits); empty: float32, 4 per element
    quant_raw_bytes: tuple[int, ...] = ()
    raw_bytes: int = 0       # payload bytes that cross as they are (integers, a coded input...)
    n_tensors: int | None = None   # crossing values, each with a header (None: the quantized ones)
    #: the lossless codec of the quantized tensors' packed codes ("deflate"; None: none) and,
    #: per bit width, their mean coded share of the packed bytes on calibration frames (a width
    #: not listed: 1, uncoded); the controller corrects it with the sizes it sends
    codec: str | None = None
    coded_share: tuple[tuple[int, float], ...] = ()
    #: bytes of one message with the plan's own widths and codecs (``message_bytes(None)``)
    own_bytes: int | None = None
    #: token rows of each quantized tensor, each with its own scale below 16 bits
    #: (``wire_sizes.token_rows``); empty: none
    quant_rows: tuple[int, ...] = ()

    def message_bytes(self, bits: int | None) -> int:
        """Expected bytes on the wire of one request with ``bits`` per quantized element (the
        wire format's sizes; coded packed bytes at their calibrated share); None: the plan's own."""
        if bits is None:
            if self.own_bytes is None:
                raise ValueError("these sizes know no plan of their own: ask for a bit width")
            return self.own_bytes
        raws = self.quant_raw_bytes or tuple(4 * n for n in self.quant_numel)
        share = dict(self.coded_share).get(bits, 1.0) if bits < 32 else 1.0
        rows = self.quant_rows or (0,) * len(self.quant_numel)
        payload = sum(tensor_bytes(n, r, True, bits, k) - TENSOR_HEADER_BYTES
                      for n, r, k in zip(self.quant_numel, raws, rows))
        n = len(self.quant_numel) if self.n_tensors is None else self.n_tensors
        return message_bytes([round(payload * share) + self.raw_bytes, *[TENSOR_HEADER_BYTES] * n])


@dataclass(frozen=True)
class CutProfile:
    """One plan as data: what the controller and the simulator know of it (no tensors)."""

    sizes: Sizes
    min_bits: int            # the accuracy-safe minimum found offline
    t_end: float             # end stage, seconds (on the emulated device)
    t_cloud: float           # cloud stage, seconds (downlink included)
    #: (bits, T_end, T_cloud) per bit width when quantizing costs differ by width (packing
    #: 6 bits costs far more than 8 on a large tensor): bits are then chosen for the shortest
    #: period, not only for the link
    stage_s: tuple[tuple[int, float, float], ...] | None = None
    end_only: bool = False   # nothing crosses: the plan tells nothing about the link
    hit_rate: float = 0.0    # share of frames its semantic cache answers on the end
    #: end stage of a hit answered on the end (no quantize, no encode); None: ``t_end``
    t_hit: float | None = None

    @property
    def compute_s(self) -> float:
        """The compute bottleneck: max(T_end, T_cloud)."""
        return max(self.t_end, self.t_cloud)

    def message_bytes(self, bits: int | None) -> int:
        return self.sizes.message_bytes(bits)

    def link_seconds(self, bits: int, mbps: float) -> float:
        return self.message_bytes(bits) * 8 / (mbps * 1e6)

    @classmethod
    def from_json(cls, p: dict) -> "CutProfile":
        """The record from ``dataclasses.asdict`` of one, as a plan directory keeps it (the one
        place besides ``coach_fx.online.deploy.plan_profile``, the builder from an offline
        ``Plan``, that makes one)."""
        s = p["sizes"]
        ints = lambda xs: tuple(int(v) for v in xs)  # noqa: E731 - JSON lists of counts
        sizes = Sizes(ints(s["quant_numel"]), ints(s["quant_raw_bytes"]), int(s["raw_bytes"]),
                      s["n_tensors"], s["codec"], tuple((int(w), float(f)) for w, f in s["coded_share"]),
                      s["own_bytes"], ints(s.get("quant_rows", ())))
        stage = tuple((int(w), float(e), float(c)) for w, e, c in p["stage_s"]) if p["stage_s"] else None
        return cls(sizes, int(p["min_bits"]), float(p["t_end"]), float(p["t_cloud"]), stage,
                   bool(p["end_only"]), float(p["hit_rate"]), p["t_hit"])

    def end_s(self, bits: int | None) -> float:
        """The end stage with ``bits`` (its own for a width ``stage_s`` does not list)."""
        for b, e, _ in self.stage_s or ():
            if b == bits:
                return e
        return self.t_end


@dataclass
class CacheSetup:
    """A plan's calibrated semantic-cache settings."""

    sim_threshold: float
    margin: float
    hit_rate: float                                   # on the calibration stream
    bits_by_similarity: list[tuple[float, int]] = field(default_factory=list)
    grid: int = 2
    #: the node of the end half whose features the cache looks up (None: the cut's crossing
    #: values); an earlier node answers a hit without running the rest of the end half
    at: str | None = None
    #: hits only for the latest known answer's class (see ``SemanticCache``)
    context: bool = False

    def floor(self, similarity: float) -> int | None:
        for edge, bits in self.bits_by_similarity:
            if similarity >= edge:
                return bits
        return None


@dataclass(frozen=True)
class CrossingBits:
    """The bits of a plan's crossings as the end sends them."""

    #: per crossing: None = the controller picks its bits; otherwise pinned bits (model inputs
    #: keep ``Settings.input_bits``; non-float values go as they are)
    pinned: tuple[int | None, ...]
    #: the offline plan's bits for the adaptive crossings (one for all, or one per crossing)
    plan: int | tuple[int, ...]
    #: per crossing, the most bits worth sending (a model input: the bits of its source, as
    #: an 8-bit camera frame gains nothing from 32); None: no limit
    caps: tuple[int | None, ...] | None = None

    def of(self, k: int, bits: int | None, floor: int | None) -> int:
        """Bits of crossing ``k``: ``bits`` from the controller, or (None) the offline plan's,
        lowered to ``floor`` for a near miss of the cache; never above the crossing's cap."""
        pinned = self.pinned[k]
        if pinned is not None:
            return pinned
        if bits is None:
            bits = self.plan if isinstance(self.plan, int) else self.plan[k]
            if floor is not None:
                bits = min(bits, floor)
        cap = self.caps[k] if self.caps is not None else None
        return min(bits, cap) if cap is not None else bits


@dataclass(frozen=True)
class EndHalf:
    """A plan's end half: model inputs -> crossing values, unquantized; and, when its cache
    looks up before the cut (``CacheSetup.at``), the same split there: (head: inputs -> that
    node's value as a 1-tuple, tail: the value -> the crossing values)."""

    module: Callable[..., Any]
    lookup_split: tuple[Callable[..., Any], Callable[..., Any]] | None = None


@dataclass
class EndTimes:
    """The end side's work for one request on this host, each measured alone."""

    host_s: float | None = None   # end half, quantize, encode (no cache); None: not measured
    lookup_s: float = 0.0         # what the cache lookup adds to it
    #: a hit answered on the end (end half and lookup; nothing quantized or encoded); None:
    #: charged like a miss
    hit_s: float | None = None


@dataclass(frozen=True)
class FinishOnEnd:
    """The plan's cloud half on the unquantized crossing values, to finish on the end device a
    request the link has no room for, and its time on this host alone."""

    module: Callable[..., Any]
    host_s: float


@dataclass
class Variant:
    """One plan as the online end side runs it."""

    plan_id: int
    end: EndHalf
    boundary: Boundary                # of that float split (every crossing "raw")
    profile: CutProfile
    bits: CrossingBits
    cache: CacheSetup | None = None
    times: EndTimes = field(default_factory=EndTimes)
    finish_on_end: FinishOnEnd | None = None    # None: never finished there

    @property
    def end_only(self) -> bool:
        """The end half returns the model's output: nothing to send."""
        return self.boundary.end_only

    def message_bytes(self, bits: int | None = None) -> int:
        """Bytes on the wire of one request with ``bits`` (None: the offline plan's)."""
        sizes = []
        for k, c in enumerate(self.boundary.crossings):
            if c.kind == "image":   # coded size varies; its 8-bit codes bound it in practice
                numel = math.prod(c.shape)
                sizes.append(tensor_bytes(numel, numel, False, 32))
            else:
                sizes.append(crossing_bytes(c, self.bits.of(k, bits, None)))
        return message_bytes(sizes)


@dataclass(frozen=True)
class OnlinePlans:
    """Every plan of an online model as its end side runs them: the variants by plan id, the
    bands (``bands[with_cache]``: which plan serves which rate, without and with the semantic
    cache), and the settings of its controller and cache (``OnlineSettings``'s ``hold``,
    ``capacity``, ``audit_rate``; the end device's slowdown the bits are sized against).
    ``OnlineModel`` holds one, a saved online plan reads back as one, and both run it through
    ``OnlinePolicy.of``: one policy, in process and over a real link."""

    variants: dict[int, Variant]
    bands: dict[bool, Bands]
    hold: int = 5
    capacity: int = 16
    audit_rate: float = 0.1
    end_slowdown: float = 1.0

    def config(self, mode: str = "full", seed: int = 0) -> tuple[Bands, PolicyConfig]:
        """The bands and the policy settings of ``mode`` (``runtime.config.MODES``)."""
        m = mode_of(mode)
        return self.bands[m.cache], PolicyConfig(
            ControlConfig(adaptive=m.adaptive, switching=m.switching, hold=self.hold),
            CacheConfig(m.cache, m.similarity_bits, self.capacity, self.audit_rate, seed),
            finish_on_end=m.finish_on_end, end_slowdown=self.end_slowdown)


__all__ = ["CacheSetup", "OnlinePlans", "CrossingBits", "CutProfile", "EndHalf", "EndTimes", "FinishOnEnd", "Sizes", "Variant"]
