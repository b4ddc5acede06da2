"""Settings dataclasses: the network, the two devices, and one ``Settings`` passed down.

Example::

    >>> from coach_fx import Network, Device
    >>> net = Network(uplink_mbps=10, rtt_ms=20)
    >>> end = Device("jetson", slowdown=8)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from coach_fx.passes.packed_codec import TENSOR_CODECS
from coach_fx.passes.wire_sizes import ALL_BITS
from coach_fx.online_settings import OnlineSettings
from coach_fx.runtime.traces import Trace

#: Goodput over the shaped rate measured for our TCP link behind ``tc tbf`` (18.9 / 4.8 / 9.4
#: Mbit/s at 20 / 5 / 10, ``tests/integration/test_tbf.py``): price a real TCP link with
#: ``Network(..., efficiency=TCP_EFFICIENCY)``.
TCP_EFFICIENCY = 0.95

#: Every bit width a crossing tensor may get (32 = float as is, <= 16 quantized).
DEFAULT_BITS = ALL_BITS


@dataclass(frozen=True)
class Network:
    """The link between end and cloud.

    ``uplink_mbps``/``downlink_mbps`` in Mbit/s (downlink defaults to the uplink); ``rtt_ms``
    is split evenly into a fixed per-message cost on the way up and on the way back. A trace
    (``Network.from_trace``) plans with its time-weighted mean rate and replays the samples at
    run time.
    """

    uplink_mbps: float = 10.0
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0
    trace: Trace | None = None
    #: Share of the rate that carries messages: 1.0 for the in-process link (it delivers the
    #: rate exactly); about ``TCP_EFFICIENCY`` over TCP behind a shaper (headers, ACKs).
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not self.uplink_mbps > 0:
            raise ValueError(f"uplink_mbps must be > 0, got {self.uplink_mbps}")
        if self.downlink_mbps is not None and not self.downlink_mbps > 0:
            raise ValueError(f"downlink_mbps must be > 0, got {self.downlink_mbps}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {self.rtt_ms}")

    @classmethod
    def from_trace(cls, path: str | Path, scale: float = 1.0, rtt_ms: float = 0.0,
                   downlink_mbps: float | None = None) -> "Network":
        """A network whose uplink follows a recorded trace (either format), rate × ``scale``."""
        trace = Trace.load(path, scale=scale)
        mean = trace.mean_mbps
        if mean <= 0:
            raise ValueError(f"trace {path} has mean rate 0")
        return cls(uplink_mbps=mean, downlink_mbps=downlink_mbps, rtt_ms=rtt_ms, trace=trace)

    def at_rate(self, uplink_mbps: float) -> "Network":
        """This network with its uplink at a fixed ``uplink_mbps`` (a band plan's rate): every
        other field kept (downlink, rtt, efficiency), the trace dropped. The one way to say
        "the network at rate r".

        >>> Network(10, rtt_ms=20, efficiency=0.95).at_rate(2).efficiency
        0.95
        """
        return dataclasses.replace(self, uplink_mbps=uplink_mbps, trace=None)

    @property
    def down_mbps(self) -> float:
        return self.downlink_mbps if self.downlink_mbps is not None else self.uplink_mbps

    def up_seconds(self, nbytes: float) -> float:
        return nbytes * 8 / (self.uplink_mbps * 1e6 * self.efficiency)

    def down_seconds(self, nbytes: float) -> float:
        return nbytes * 8 / (self.down_mbps * 1e6 * self.efficiency)


@dataclass(frozen=True)
class Device:
    """A compute device: costs measured (or modelled) on this host, times ``slowdown``.

    The device's own figures (``coach profile``; the slowdown is not applied to them):
    ``node_costs`` seconds per node name, ``op_rates`` seconds per FLOP by op type (for nodes
    without their own figure), ``quant_costs`` per width (quantize+pack, unpack+dequantize)
    seconds per element.

    A cloud that ``ends`` ends share (load-aware planning): every end's request waits for the
    others', so its cloud stage costs ``load`` = ``ends`` × ``batch_efficiency`` times its time
    alone (``batch_efficiency``: seconds per request in a batch of ``ends`` / alone, e.g.
    ``profile.measure_batch_efficiency``; 1: batching gains nothing).

        >>> Device("cloud", ends=16, batch_efficiency=0.5).load
        8.0
    """

    name: str = "device"
    slowdown: float = 1.0
    node_costs: Mapping[str, float] | None = None
    op_rates: Mapping[str, float] | None = None
    quant_costs: Mapping[int, tuple[float, float]] | None = None
    ends: int = 1
    batch_efficiency: float = 1.0
    #: where a served cloud half runs ("cpu", "cuda"; saved with the plan for ``coach serve``)
    device: str = "cpu"

    @staticmethod
    def from_profile(path: str, name: str | None = None) -> "Device":
        """The device a profile file describes (format: ``coach_fx.device_profile``)."""
        from coach_fx.device_profile import read_profile
        return read_profile(path, name)

    def __post_init__(self) -> None:
        if not self.slowdown > 0:
            raise ValueError(f"Device {self.name!r}: slowdown must be > 0, got {self.slowdown}")
        if self.ends < 1 or not 0 < self.batch_efficiency <= 1:
            raise ValueError(f"Device {self.name!r}: ends must be >= 1 and batch_efficiency in (0, 1], "
                             f"got {self.ends} and {self.batch_efficiency}")

    @property
    def load(self) -> float:
        """What one request's time on this device is multiplied by: the ``ends`` sharing it."""
        return self.ends * self.batch_efficiency if self.ends > 1 else 1.0

    def seconds(self, host_s: float) -> float:
        """Seconds of a request on this device for work that takes ``host_s`` on this host:
        × its slowdown, × its load (the one home of that rule)."""
        return host_s * self.slowdown * self.load


def replace_checked(obj: Any, kw: Mapping[str, Any], what: str = "coach option") -> Any:
    """``dataclasses.replace(obj, **kw)``, an unknown keyword a ``TypeError`` that names it and
    lists the known ones (``Settings.replace``, ``OnlineSettings.of``)."""
    unknown = sorted(set(kw) - set(obj.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown {what}(s) {unknown}; known: {sorted(obj.__dataclass_fields__)}")
    return dataclasses.replace(obj, **kw)


@dataclass(frozen=True)
class Settings:
    """Everything ``coach_fx.compile`` takes, one flat record passed down instead of globals
    (TensorRT's ``CompilationSettings`` style): the network, the two devices, how the plan is
    searched, what it must keep of the model's answers, how crossings may travel, how the model
    is traced and measured, and online control.

    Example::

        >>> Settings.of(bits=(8,), costs="analytic").bits
        (8,)
    """

    network: Network = field(default_factory=Network)
    end: Device = field(default_factory=lambda: Device("end", slowdown=4.0))
    cloud: Device = field(default_factory=lambda: Device("cloud", slowdown=1.0))

    # ---- the search
    strategy: str = "coach"
    objective: str = "throughput"
    #: For ``strategy="manual"``: the end set and bits (an int for all, or name -> bits).
    end_nodes: Sequence[str] | None = None
    manual_bits: int | Mapping[str, int] = 32
    #: Brute force refuses DAGs with more predecessor-closed sets than this.
    max_plans: int = 200_000
    #: coach's search returns its best plan so far past this many seconds, marked unproven
    #: (``plan.extra["proven"]``, with the gap left), instead of searching on (None: no limit).
    max_search_s: float | None = 300.0

    # ---- what a plan must keep of the model's answers
    accuracy_budget: float = 0.005
    #: One-sided confidence of the accuracy check: a plan passes when the upper confidence
    #: bound of its rate of changed answers (Clopper-Pearson, ``coach_fx.accuracy``) is within
    #: the budget, so that what passes on calibration data holds on unseen data. ``None``: the
    #: plain measured drop (no statistical claim; calibration sets of any size).
    accuracy_confidence: float | None = 0.9
    #: (inputs, labels or None): a tensor / tuple of tensors batched on dim 0.
    calibration: Any = None
    #: Relative L2 error of the output allowed when there is no calibration data.
    output_tolerance: float = 0.02
    #: The model plans are measured against, where it is not the one compiled: the model a
    #: ``coach_fx.train_cut`` student was made from, so that the budget covers the student's
    #: own difference too (None: the compiled model, unquantized).
    reference: Any = None

    # ---- how crossing tensors may travel
    bits: Sequence[int] = DEFAULT_BITS
    #: Bits of a model input when it crosses raw (cloud-only). None (the default): the
    #: narrowest of ``bits`` with at least 8 (camera frames are 8-bit data; with ``bits=(32,)``
    #: an input crosses as it is), or the widest of ``bits`` if none has 8 (``input_width``).
    input_bits: int | None = None
    #: Image codecs an image-shaped model input (N, 1 or 3, H, W) may cross with, besides raw
    #: ``input_width`` (``coach_fx.passes.imagecodec``: "jpeg<quality>", "png"): what a camera
    #: would send, so coach's search space holds "send a JPEG to the cloud". ``()``: none.
    input_codecs: Sequence[str] = ("jpeg95", "jpeg90", "jpeg75", "png")
    #: Lossless codecs the packed codes of a quantized crossing may travel with
    #: (``coach_fx.passes.packed_codec.TENSOR_CODECS``: "deflate"); the planner prices each plan with
    #: and without, from coded sizes measured on calibration frames. ``()``: none.
    tensor_codecs: Sequence[str] = ("deflate",)
    #: After the exact search (one width per plan), give each crossing tensor its own width
    #: where that is cheaper and the budget holds (``optimize.problem.per_tensor_bits``).
    per_tensor_bits: bool = True

    # ---- how the model is traced and measured
    costs: str = "measured"
    profile_repeat: int = 5
    #: torch intra-op threads for profiling and for in-process streams (None: torch's default).
    #: On a small host give each emulated device one thread, so that the end and the cloud
    #: stage of a stream do not compete for the same cores.
    threads: int | None = None
    #: With measured costs, re-measure the chosen plan's halves as whole modules and report
    #: those stage times (``CompiledModel.remeasure``).
    remeasure: bool = True
    #: Extra leaf module types or qualified names for tracing.
    leaf_modules: Sequence[Any] = ()
    progress: bool = True
    #: Called with (done, total, label) during long work instead of the default bar.
    progress_fn: Callable[[int, int, str], None] | None = None

    #: Online control (``coach_fx.compile_online``).
    online: OnlineSettings = field(default_factory=OnlineSettings)

    def __post_init__(self) -> None:
        if self.objective not in ("throughput", "latency"):
            raise ValueError(f"objective must be 'throughput' or 'latency', got {self.objective!r}")
        if not 0 <= self.accuracy_budget < 1:
            raise ValueError(f"accuracy_budget must be in [0, 1), got {self.accuracy_budget}")
        if self.accuracy_confidence is not None and not 0 < self.accuracy_confidence < 1:
            raise ValueError(f"accuracy_confidence must be in (0, 1) or None, got {self.accuracy_confidence}")
        bad = [b for b in self.bits if b not in DEFAULT_BITS]
        if bad or not self.bits:
            raise ValueError(f"bits must be a non-empty subset of {DEFAULT_BITS}; got {tuple(self.bits)}")
        for name, codecs in (("input_codecs", self.input_codecs), ("tensor_codecs", self.tensor_codecs)):
            if isinstance(codecs, str):
                raise ValueError(f"{name} must be a sequence of codec names, got the string {codecs!r}")
        unknown = [c for c in self.tensor_codecs if c not in TENSOR_CODECS]
        if unknown:
            raise ValueError(f"unknown tensor codec(s) {unknown}; known: {sorted(TENSOR_CODECS)}")
        if self.input_bits is not None and self.input_bits not in DEFAULT_BITS:
            raise ValueError(f"input_bits must be one of {DEFAULT_BITS} or None, got {self.input_bits}")
        if self.costs not in ("measured", "analytic"):
            raise ValueError(f"costs must be 'measured' or 'analytic', got {self.costs!r}")

    @property
    def input_width(self) -> int:
        """The bits a model input crosses raw with: ``input_bits``, else as ``bits`` allows."""
        if self.input_bits is not None:
            return self.input_bits
        return min([b for b in self.bits if b >= 8] or [max(self.bits)])

    @classmethod
    def of(cls, **kw: Any) -> "Settings":
        """Settings from keywords (an unknown name is a ``TypeError`` naming it)."""
        return cls().replace(**kw)

    def replace(self, **kw: Any) -> "Settings":
        """A copy with these fields changed (an unknown name is a ``TypeError`` naming it)."""
        return replace_checked(self, kw)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kw: Any) -> "Settings":
        """Build from keyword options (``torch.compile(..., options=...)``), naming unknown keys."""
        merged = {**(options or {}), **kw}
        if "bits" in merged and isinstance(merged["bits"], int):
            merged["bits"] = (merged["bits"],)
        if isinstance(merged.get("network"), (int, float)):
            merged["network"] = Network(uplink_mbps=float(merged["network"]))
        return cls.of(**merged)


def calibration_parts(calibration: Any) -> tuple[tuple, Any]:
    """``Settings.calibration`` as (model inputs as a tuple, labels or None): it may be
    ``(inputs, labels)``, ``(inputs, None)``, a tensor, or a tuple of the model's inputs."""
    import torch
    c = calibration
    if isinstance(c, (tuple, list)) and len(c) == 2 and (c[1] is None or isinstance(c[1], torch.Tensor)) \
            and isinstance(c[0], (torch.Tensor, tuple, list)):
        return (tuple(c[0]) if isinstance(c[0], (tuple, list)) else (c[0],)), c[1]
    return (tuple(c) if isinstance(c, (tuple, list)) else (c,)), None
