"""Device profiles: times measured on the real end device or cloud GPU, brought to planning.

A profile is a JSON file (``coach profile`` writes one on the device itself)::

    {"format": "coach-profile/1",
     "device": "pi4",
     "node_times_s": {"conv1": 0.0121, "layer1_0_conv1": 0.0094, ...},
     "op_rates_s_per_flop": {"Conv2d": 2.1e-10, "Linear": 9.8e-10, "relu": 4.0e-10, ...},
     "quant_s_per_elem": {"8": [2.1e-9, 1.4e-9], "4": [2.6e-9, 1.8e-9], ...}}

``node_times_s`` are seconds per fx node of the model profiled (names as ``coach plan`` prints
them); ``op_rates_s_per_flop`` are seconds per FLOP by op type (a module's class name, or a
function's or method's name), so that a profile prices nodes of any model of the same ops;
``quant_s_per_elem`` are, per width, the seconds per element to quantize and pack (what the
end pays per crossing value) and to unpack and dequantize (the cloud's). Any may be left
out (a width without its figure: this host's time × the device's slowdown). A CSV file with rows ``node,seconds`` (a header line ``node,seconds``
is allowed) gives node times only. A node with neither figure is priced at this host's time
× the device's slowdown.

Example::

    >>> pi = Device.from_profile("pi.json")                                  # doctest: +SKIP
    >>> cm = coach_fx.compile(model, (x,), end=pi, cloud=Device.from_profile("a100.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch.fx as fx

from coach_fx.passes.annotate import meta
from coach_fx.settings import Device

FORMAT = "coach-profile/1"


def op_type(n: fx.Node) -> str:
    """What a node computes, as profiles key it: a module's class name, else the function's
    or method's name."""
    if n.op == "call_module" and n.graph.owning_module is not None:
        return type(n.graph.owning_module.get_submodule(n.target)).__name__
    target = n.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def node_ops(gm: fx.GraphModule) -> dict[str, tuple[str, float]]:
    """fx node -> (op type, FLOPs) for an annotated graph."""
    out = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and "coach" in n.meta:
            out[n.name] = (op_type(n), float(meta(n).flops))
    return out


def op_rates(times: Mapping[str, float], ops: Mapping[str, tuple[str, float]]) -> dict[str, float]:
    """Seconds per FLOP by op type: total time over total FLOPs of the nodes of that type."""
    t: dict[str, float] = {}
    f: dict[str, float] = {}
    for name, seconds in times.items():
        kind, flops = ops.get(name, ("", 0.0))
        if kind and flops > 0:
            t[kind] = t.get(kind, 0.0) + seconds
            f[kind] = f.get(kind, 0.0) + flops
    return {k: t[k] / f[k] for k in t}


def write_profile(path: str | Path, device: str, times: Mapping[str, float],
                  ops: Mapping[str, tuple[str, float]],
                  quant: Mapping[int, tuple[float, float]] | None = None) -> Path:
    """Write the profile of one device: its node times, the op rates they imply and (``quant``)
    its quantization costs per width."""
    doc = {"format": FORMAT, "device": device, "node_times_s": dict(times),
           "op_rates_s_per_flop": op_rates(times, ops),
           "quant_s_per_elem": {str(b): list(c) for b, c in (quant or {}).items()}}
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return path


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: expected a non-negative number of seconds, got {value!r}")
    return float(value)


def read_profile(path: str | Path, name: str | None = None) -> Device:
    """The :class:`Device` a profile file describes (JSON as above, or a ``node,seconds`` CSV)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"device profile {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        nodes = {}
        with path.open(newline="") as f:
            for k, row in enumerate(csv.reader(f), 1):
                if not row or row[0].strip().lower() in ("node", "#") or row[0].startswith("#"):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{k}: expected 'node,seconds', got {row}")
                try:
                    nodes[row[0].strip()] = _number(float(row[1]), f"{path}:{k}")
                except ValueError as e:
                    raise ValueError(f"{path}:{k}: {e}") from None
        return Device(name or path.stem, 1.0, nodes, None)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"device profile {path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"device profile {path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    sections = {}
    for key in ("node_times_s", "op_rates_s_per_flop"):
        raw = doc.get(key) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"device profile {path}: {key} must be an object")
        sections[key] = {str(k): _number(v, f"{path}: {key}[{k!r}]") for k, v in raw.items()}
    return Device(name or str(doc.get("device") or path.stem), 1.0,
                  sections["node_times_s"] or None, sections["op_rates_s_per_flop"] or None,
                  _quant(doc.get("quant_s_per_elem"), f"device profile {path}: quant_s_per_elem"))


def _quant(raw: Any, where: str) -> dict[int, tuple[float, float]] | None:
    """``{"8": [quantize, dequantize], ...}`` -> {8: (quantize, dequantize)}."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    out = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit() and 1 <= int(k) < 32) or not isinstance(v, list) or len(v) != 2:
            raise ValueError(f"{where}[{k!r}]: expected a width 1-31 -> [quantize, dequantize] seconds per element")
        out[int(k)] = (_number(v[0], f"{where}[{k!r}]"), _number(v[1], f"{where}[{k!r}]"))
    return out


def quant_costs(device: Device, bits: int, host: tuple[float, float] | None) -> tuple[float, float]:
    """(quantize, dequantize) seconds per element at ``bits`` on ``device``: its own figure,
    else the ``host``'s × its slowdown; × its ``load`` where ends share it."""
    own = (device.quant_costs or {}).get(bits)
    if own is not None:
        return own[0] * device.load, own[1] * device.load
    if host is None:
        raise ValueError(f"no quantization cost for {bits} bits on {device.name!r}")
    return device.seconds(host[0]), device.seconds(host[1])


def device_times(host: Mapping[str, float], device: Device,
                 ops: Mapping[str, tuple[str, float]] | None = None) -> dict[str, float]:
    """A device's seconds per fx node: its own figure for the node, else the node's FLOPs at
    its op type's rate, else host × slowdown; × its ``load`` where ends share it."""
    own = dict(device.node_costs or {})
    rates = dict(device.op_rates or {})
    out = {}
    for k, v in host.items():
        kind, flops = (ops or {}).get(k, ("", 0.0))
        if k in own:
            out[k] = own[k] * device.load
        elif kind in rates and flops > 0:
            out[k] = rates[kind] * flops * device.load
        else:
            out[k] = device.seconds(v)
    return out


__all__ = ["FORMAT", "device_times", "node_ops", "op_rates", "op_type", "quant_costs", "read_profile",
           "write_profile"]
