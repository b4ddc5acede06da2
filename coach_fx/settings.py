"""Settings dataclasses: the network, the two devices, and one ``Settings`` passed down.

Example::

    >>> from coach_fx import Network, Device
    >>> net = Network(uplink_mbps=10, rtt_ms=20)
    >>> end = Device("jetson", slowdown=8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from coach_fx.runtime.wire import ALL_BITS, TENSOR_CODECS
from coach_fx.traces import Trace

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

    ``node_costs`` maps node names to seconds and overrides the host cost of those nodes
    (the slowdown is not applied to them: they are this device's own figures).
    """

    name: str = "device"
    slowdown: float = 1.0
    node_costs: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.slowdown > 0:
            raise ValueError(f"Device {self.name!r}: slowdown must be > 0, got {self.slowdown}")


def calibration_parts(calibration: Any) -> tuple[tuple, Any]:
    """``Settings.calibration`` as (model inputs as a tuple, labels or None): it may be
    ``(inputs, labels)``, ``(inputs, None)``, a tensor, or a tuple of the model's inputs."""
    import torch
    c = calibration
    if isinstance(c, (tuple, list)) and len(c) == 2 and (c[1] is None or isinstance(c[1], torch.Tensor)) \
            and isinstance(c[0], (torch.Tensor, tuple, list)):
        return (tuple(c[0]) if isinstance(c[0], (tuple, list)) else (c[0],)), c[1]
    return (tuple(c) if isinstance(c, (tuple, list)) else (c,)), None


@dataclass(frozen=True)
class OnlineSettings:
    """What ``coach_fx.compile_online`` prepares online control with (``Settings.online``).

    ``cache_share`` of the accuracy budget goes to the semantic cache's wrong hits, the rest to
    the bits; ``bands_mbps``: the rates to plan for (None: ``band_rates``); the cache holds
    ``capacity`` classes, audits ``audit_rate`` of its hits, and its features are pooled on the
    best of ``grid``; the plan switches after ``hold`` estimates in a new band.
    """

    cache: bool = True
    cache_share: float = 0.5
    bands_mbps: Sequence[float] | None = None
    grid: int | Sequence[int] = (2, 4, 8)
    capacity: int = 16
    audit_rate: float = 0.1
    hold: int = 5
    #: mean frames a class persists in the calibration streams the cache is tuned on
    locality: float = 10.0
    #: Frames in each of the two replayed calibration streams the cache's thresholds are tuned
    #: on. Wrong hits come from a few confusable samples; a short stream may hold none of them
    #: (with 1000 frames thresholds passed that went wrong 3x as often on unseen data).
    calibration_frames: int = 4000
    #: A band gets its own plan only when that plan's period there is this much shorter than
    #: the offline plan's (a switch follows the estimate with a lag).
    switch_gain: float = 0.9
    #: The cache may look up at a node before the cut (a hit then skips the rest of the end
    #: half) when its calibrated hit rate is at least this share of the cut's own: a hit also
    #: spares the link and the cloud, which an earlier node with fewer hits would give away.
    early_lookup_hits: float = 0.75
    #: Requests the end looks up between a request's lookup and the cloud's answer for it
    #: coming back: in a three-stage pipeline a request's answer returns while the end works a
    #: few requests on (one on the link, one in the cloud, those queued; the online
    #: benchmark's fixed plans: latency 3.5-5 periods). The cache's calibration replays that.
    result_lag: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.cache_share < 1:
            raise ValueError(f"cache_share must be in [0, 1), got {self.cache_share}")
        if self.bands_mbps is not None and (not self.bands_mbps or min(self.bands_mbps) <= 0):
            raise ValueError(f"bands_mbps must be positive rates, got {list(self.bands_mbps)}")
        if self.capacity < 1 or not 0 <= self.audit_rate <= 1 or self.hold < 1:
            raise ValueError("capacity and hold must be >= 1 and audit_rate in [0, 1]; got "
                             f"{self.capacity}, {self.hold}, {self.audit_rate}")

    def budgets(self, accuracy_budget: float) -> tuple[float, float]:
        """(the bits' share, the cache's share) of ``accuracy_budget``."""
        if not self.cache:
            return accuracy_budget, 0.0
        return accuracy_budget * (1 - self.cache_share), accuracy_budget * self.cache_share


@dataclass(frozen=True)
class Settings:
    """Everything ``coach_fx.compile`` takes, passed down instead of globals."""

    network: Network = field(default_factory=Network)
    end: Device = field(default_factory=lambda: Device("end", slowdown=4.0))
    cloud: Device = field(default_factory=lambda: Device("cloud", slowdown=1.0))
    strategy: str = "coach"
    objective: str = "throughput"
    accuracy_budget: float = 0.005
    #: One-sided confidence of the accuracy check: a plan passes when the upper confidence
    #: bound of its rate of changed answers (Clopper-Pearson, ``coach_fx.accuracy``) is within
    #: the budget, so that what passes on calibration data holds on unseen data. ``None``: the
    #: plain measured drop (no statistical claim; calibration sets of any size).
    accuracy_confidence: float | None = 0.9
    #: (inputs, labels or None): a tensor / tuple of tensors batched on dim 0.
    calibration: Any = None
    bits: Sequence[int] = DEFAULT_BITS
    costs: str = "measured"
    #: Relative L2 error of the output allowed when there is no calibration data.
    output_tolerance: float = 0.02
    #: Bits of a model input when it crosses raw (cloud-only): camera frames are 8-bit.
    input_bits: int = 8
    #: Image codecs an image-shaped model input (N, 1 or 3, H, W) may cross with, besides raw
    #: ``input_bits`` (``coach_fx.runtime.imagecodec``: "jpeg<quality>", "png"): what a camera
    #: would send, so coach's search space holds "send a JPEG to the cloud". ``()``: none.
    input_codecs: Sequence[str] = ("jpeg95", "jpeg90", "jpeg75", "png")
    #: Lossless codecs the packed codes of a quantized crossing may travel with
    #: (``coach_fx.runtime.wire.TENSOR_CODECS``: "deflate"); the planner prices each plan with
    #: and without, from coded sizes measured on calibration frames. ``()``: none.
    tensor_codecs: Sequence[str] = ("deflate",)
    #: After the exact search (one width per plan), give each crossing tensor its own width
    #: where that is cheaper and the budget holds (``optimize.problem.per_tensor_bits``).
    per_tensor_bits: bool = True
    #: For ``strategy="manual"``: the end set and bits (an int for all, or name -> bits).
    end_nodes: Sequence[str] | None = None
    manual_bits: int | Mapping[str, int] = 32
    #: Extra leaf module types or qualified names for tracing.
    leaf_modules: Sequence[Any] = ()
    #: Brute force refuses DAGs with more predecessor-closed sets than this.
    max_plans: int = 200_000
    profile_repeat: int = 5
    #: torch intra-op threads for profiling and for in-process streams (None: torch's default).
    #: On a small host give each emulated device one thread, so that the end and the cloud
    #: stage of a stream do not compete for the same cores.
    threads: int | None = None
    #: With measured costs, re-measure the chosen plan's halves as whole modules and report
    #: those stage times (``CompiledModel.calibrate``).
    calibrate: bool = True
    progress: bool = True
    #: Called with (done, total, label) during long work instead of the default bar.
    progress_fn: Callable[[int, int, str], None] | None = None
    #: Online control (``coach_fx.compile_online``).
    online: OnlineSettings = field(default_factory=OnlineSettings)

    def __post_init__(self) -> None:
        if self.objective not in ("throughput", "latency"):
            raise ValueError(f"objective must be 'throughput' or 'latency', got {self.objective!r}")
        if self.costs not in ("measured", "analytic"):
            raise ValueError(f"costs must be 'measured' or 'analytic', got {self.costs!r}")
        bad = [b for b in self.bits if b not in DEFAULT_BITS]
        if bad or not self.bits:
            raise ValueError(f"bits must be a non-empty subset of {DEFAULT_BITS}; got {tuple(self.bits)}")
        if not 0 <= self.accuracy_budget < 1:
            raise ValueError(f"accuracy_budget must be in [0, 1), got {self.accuracy_budget}")
        if self.accuracy_confidence is not None and not 0 < self.accuracy_confidence < 1:
            raise ValueError(f"accuracy_confidence must be in (0, 1) or None, got {self.accuracy_confidence}")
        if isinstance(self.input_codecs, str):
            raise ValueError(f"input_codecs must be a sequence of codec names, got the string {self.input_codecs!r}")
        if isinstance(self.tensor_codecs, str):
            raise ValueError(f"tensor_codecs must be a sequence of codec names, got the string {self.tensor_codecs!r}")
        unknown = [c for c in self.tensor_codecs if c not in TENSOR_CODECS]
        if unknown:
            raise ValueError(f"unknown tensor codec(s) {unknown}; known: {sorted(TENSOR_CODECS)}")
        if self.input_bits not in DEFAULT_BITS:
            raise ValueError(f"input_bits must be one of {DEFAULT_BITS}, got {self.input_bits}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kw: Any) -> "Settings":
        """Build from keyword options (``torch.compile(..., options=...)``), naming unknown keys."""
        merged = {**(options or {}), **kw}
        if "bits" in merged and isinstance(merged["bits"], int):
            merged["bits"] = (merged["bits"],)
        if isinstance(merged.get("network"), (int, float)):
            merged["network"] = Network(uplink_mbps=float(merged["network"]))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TypeError(f"unknown coach option(s) {unknown}; known: {sorted(known)}")
        return cls(**merged)
