"""How the accuracy oracle runs its calibration data: in fixed chunks (a small first one, so
that a failing candidate is told early), with a tally that stops a run once it cannot pass,
an LRU of the end halves' crossing values per chunk, and memoized halves.

Example::

    >>> chunks(300, batch=128, request=1)
    [(0, 64), (64, 192), (192, 300)]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from coach_fx.passes.annotate import _tensors
from coach_fx.passes.partition import partition

#: Keep crossing values (what end halves computed on the calibration data) for reuse by later
#: candidates with the same crossings (the bit search asks one cut at several widths) up to
#: this many bytes, least recently used first out.
ACTIVATION_CACHE_BYTES = 1 << 30
#: Samples in the first calibration chunk: a candidate that fails is usually told by its first
#: samples, and the check stops as soon as the harmful changes exceed what the bound allows.
FIRST_CHUNK = 64
#: Partitioned halves kept for reuse (oldest out first).
PARTITION_MEMO = 32
#: Without calibration data, the output check also runs on this many inputs drawn like the
#: example inputs (so that one input's quirk cannot pass a plan).
L2_VARIANTS = 7


@dataclass
class Tally:
    """What one candidate's run over the calibration data found: its metric (None when the
    run stopped early), its harmful changes and how many samples it saw."""
    value: float | None
    harmful: int
    seen: int

    def done(self, n: int) -> bool:
        return self.seen >= n and self.value is not None


def chunks(n: int, batch: int, request: int) -> list[tuple[int, int]]:
    """Sample ranges of at most ``batch`` (whole requests), the first at most ``FIRST_CHUNK``."""
    first = max(request, min(batch, FIRST_CHUNK) // request * request)
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + (first if not out else batch))
        out.append((lo, hi))
        lo = hi
    return out


def _nbytes(v: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(v))


class CrossingValues:
    """The end halves' crossing values per (crossing name, chunk), for reuse by later candidates
    with the same crossings; least recently used out beyond ``ACTIVATION_CACHE_BYTES``."""

    def __init__(self, limit: int = ACTIVATION_CACHE_BYTES) -> None:
        self.limit = limit
        self._values: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._held = 0

    def get(self, names: list[str], k: int, run: Callable[[], tuple]) -> list[Any]:
        """The values of ``names`` on chunk ``k``: kept ones, or ``run()``'s (the end half)."""
        keys = [(name, k) for name in names]
        if all(key in self._values for key in keys):
            for key in keys:
                self._values.move_to_end(key)
            return [self._values[key] for key in keys]
        vals = list(run())
        for key, v in zip(keys, vals):
            if key not in self._values:
                self._values[key] = v
                self._held += _nbytes(v)
            self._values.move_to_end(key)
        while self._held > self.limit and self._values:
            _, old = self._values.popitem(last=False)
            self._held -= _nbytes(old)
        return vals


class Halves:
    """``partition`` of the model (train mode, or plain for ``bits=()``), memoized: the bit
    search asks one cut at several widths, and building the halves is not free."""

    def __init__(self, gm: fx.GraphModule, size: int = PARTITION_MEMO) -> None:
        self.gm, self.size = gm, size
        self._parts: dict[tuple, tuple] = {}

    def get(self, end_nodes: frozenset[str], bits: tuple) -> tuple:
        key = (end_nodes, bits)
        if key not in self._parts:
            if len(self._parts) >= self.size:
                self._parts.pop(next(iter(self._parts)))
            self._parts[key] = (partition(self.gm, set(end_nodes), {}) if not bits else
                                partition(self.gm, set(end_nodes), dict(bits), mode="train"))
        return self._parts[key]


def with_variants(inputs: tuple) -> tuple:
    """The example inputs followed by ``L2_VARIANTS`` batches drawn with each float tensor's
    mean and spread (fixed seed; other inputs repeated as they are)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or not x.dim():
            out.append(x)
            continue
        parts = [x]
        for _ in range(L2_VARIANTS):
            if x.is_floating_point():
                lo, hi = x.min(), x.max()
                v = torch.randn(x.shape, generator=g, dtype=x.dtype) * x.std().nan_to_num(1.0) + x.mean()
                parts.append(v.clamp(lo, hi) if hi > lo else v)
            else:
                parts.append(x.clone())
        out.append(torch.cat(parts))
    return tuple(out)


__all__ = ["CrossingValues", "Halves", "Tally", "chunks", "with_variants"]
