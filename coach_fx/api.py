"""The public entry points: ``coach_fx.compile`` (a model split between an end device and the
cloud). The end side's ``connect`` and the cloud's ``serve`` are to come here too (DESIGN.md §3).

Example::

    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(10),          # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> y = cm(x); print(cm.report())                                             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from coach_fx.compiled import CompiledModel
from coach_fx.driver import plan_model, prepare
from coach_fx.settings import DEFAULT_BITS, Settings


def compile(model: nn.Module, example_inputs: Any, *, network: Any = None, end: Any = None,
            cloud: Any = None, strategy: str = "coach", objective: str = "throughput",
            accuracy_budget: float = 0.005, calibration: Any = None,
            bits: Sequence[int] = DEFAULT_BITS, costs: str = "measured",
            **options: Any) -> CompiledModel:
    """Split ``model`` between an end device and the cloud; see the module docstring.

    Other keywords (``end_nodes``, ``manual_bits``, ``input_bits``, ``output_tolerance``,
    ``leaf_modules``, ``max_plans``, ``progress``...) are fields of :class:`coach_fx.Settings`.
    """
    kw: dict[str, Any] = dict(strategy=strategy, objective=objective, accuracy_budget=accuracy_budget,
                              calibration=calibration, bits=bits, costs=costs)
    for k, v in (("network", network), ("end", end), ("cloud", cloud)):
        if v is not None:
            kw[k] = v
    if strategy == "manual" and "manual_bits" not in options and isinstance(bits, (int, Mapping)):
        options["manual_bits"] = bits
        kw["bits"] = DEFAULT_BITS
    settings = Settings.from_options(options, **kw)
    gm, inputs, dag = prepare(model, example_inputs, settings)
    plan, oracle = plan_model(gm, inputs, dag, settings)
    cm = CompiledModel(gm, dag, plan, settings, inputs, oracle)
    if settings.costs == "measured" and settings.calibrate:
        cm.calibrate()
    return cm


__all__ = ["compile"]
