"""The compile entry points: ``coach_fx.compile`` (a model split between an end device and the
cloud) and ``compile_with`` (the same with one ``Settings`` record). Its deployment,
``coach_fx.serve`` and ``coach_fx.connect``, is ``coach_fx.deploy.service`` (which loads no
compile side).

Example::

    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(10),          # doctest: +SKIP
    ...                       end=coach_fx.Device("pi", slowdown=8))
    >>> y = cm(x); print(cm.report())                                             # doctest: +SKIP
    >>> cm.save("plan_dir", key=token)                                            # doctest: +SKIP
    >>> server = coach_fx.serve("plan_dir", host="0.0.0.0", token=token)          # doctest: +SKIP
    >>> rm = coach_fx.connect("plan_dir", "cloud:29517", token=token)             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from coach_fx.compiled import CompiledModel
from coach_fx.driver import observing, plan_model, prepare
from coach_fx.passes.eval_calls import eval_calls
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
    return compile_with(model, example_inputs, Settings.from_options(options, **kw))


def compile_with(model: nn.Module, example_inputs: Any, settings: Settings) -> CompiledModel:
    """``compile`` with its settings as one record (``cm.settings`` of another compile, changed)."""
    training = model.training
    # captured as it is (a train-mode forward may differ), planned in eval mode, and left
    # as it was: its buffers, flags and the random stream
    with observing(list(model.parameters()) + list(model.buffers())):
        gm, inputs, dag = prepare(model, example_inputs, settings)
        with observing((), [model, gm]):
            with eval_calls(gm):      # a graph with train-mode calls baked in (export, dynamo)
                plan, oracle = plan_model(gm, inputs, dag, settings)
            cm = CompiledModel(gm, dag, plan, settings, inputs, oracle, source=model)
            if settings.costs == "measured" and settings.remeasure:
                cm.remeasure()
    # the model's own flags are as they were (observing put back each module's, mixed ones
    # too, e.g. frozen batch norm in a training model); the compiled model follows the model
    cm.training = training
    return cm


__all__ = ["compile", "compile_with"]
