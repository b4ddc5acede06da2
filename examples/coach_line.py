"""The one line a training script changes to run its model split by coach (used by the
examples beside this file): ``coach_fx.compile`` or ``torch.compile(backend="coach")``."""

from __future__ import annotations

import torch
from torch import nn

#: Planned for a 10 Mbit/s uplink with analytic costs: deterministic, and quick to plan.
OPTIONS = {"costs": "analytic", "progress": False}


def with_coach(model: nn.Module, how: str, example: torch.Tensor) -> nn.Module:
    """``how``: "compile" (``coach_fx.compile``), "backend" (``torch.compile``) or "off"."""
    import coach_fx
    opts = dict(OPTIONS, network=coach_fx.Network(10))
    if how == "compile":
        return coach_fx.compile(model, (example,), **opts)
    if how == "backend":
        return torch.compile(model, backend="coach", options=opts)
    return model
