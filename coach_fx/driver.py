"""The driver: capture -> annotate -> profile (``prepare``) and plan (``plan_model``); the public
``coach_fx.compile`` (``coach_fx.api``) joins them into a :class:`~coach_fx.compiled.CompiledModel`.

Example::

    >>> gm, inputs, dag = prepare(model, (x,), Settings())                    # doctest: +SKIP
    >>> plan, oracle = plan_model(gm, inputs, dag, Settings.of(strategy="dads"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

from coach_fx.accuracy import AccuracyOracle
from coach_fx.compiled import InputError, example_tuple
from coach_fx.profile import build_dag
from coach_fx.dag import LayerDAG
from coach_fx.optimize import STRATEGIES, Problem
from coach_fx.optimize.problem import per_tensor_bits
from coach_fx.optimize.simple import manual
from coach_fx.optimize.trace import plan_for_trace, varies
from coach_fx.passes.annotate import annotate, keeps_effect
from coach_fx.passes.capture import capture
from coach_fx.plan import Plan
from coach_fx.settings import Settings


@contextmanager
def observing(tensors: Iterable[torch.Tensor], modules: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Planning runs the model many times; compiling must not change it. The ``modules`` run
    in eval mode meanwhile (dropout off, batch norm on its running statistics: the model as
    deployed), and the buffers among ``tensors`` (running statistics, ``num_batches_tracked``)
    and the train/eval flags are restored after, as is the caller's random number stream."""
    saved = [(t, t.detach().clone()) for t in tensors if not isinstance(t, nn.Parameter)]
    flags = [(m, m.training) for root in modules for m in root.modules()]
    for m, _ in flags:
        m.training = False
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        for m, was in flags:
            m.training = was


def prepare(model: nn.Module | fx.GraphModule, example_inputs: Any, settings: Settings
            ) -> tuple[fx.GraphModule, tuple, LayerDAG]:
    """Capture, annotate and cost ``model``: the (GraphModule, inputs, LayerDAG) to plan on."""
    gm, inputs = traced(model, example_inputs, settings)
    dag = build_dag(gm, inputs, settings)
    return gm, inputs, dag


def traced(model: nn.Module | fx.GraphModule, example_inputs: Any, settings: Settings
           ) -> tuple[fx.GraphModule, tuple]:
    """Capture and annotate ``model``: its (GraphModule, inputs), not yet costed."""
    inputs = example_tuple(example_inputs)
    gm = capture(model, inputs, settings.leaf_modules)
    gm.graph.eliminate_dead_code(is_impure_node=keeps_effect)
    gm.recompile()
    try:
        annotate(gm, inputs)
    except Exception as e:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise InputError(f"running {type(model).__name__} on the example inputs {shapes} "
                         f"failed: {e}") from e
    return gm, inputs


def plan_model(gm: fx.GraphModule, inputs: tuple, dag: LayerDAG, settings: Settings,
               strategy: str | None = None, oracle: AccuracyOracle | None = None) -> tuple[Plan, AccuracyOracle | None]:
    """Plan an already prepared model with ``strategy`` (default: the settings')."""
    strategy = strategy or settings.strategy
    if strategy == "manual":   # the caller's plan as asked; its accuracy is reported, not enforced
        problem = Problem(dag, settings.network, settings.objective, settings.bits, settings.input_width)
        plan = manual(problem, settings.end_nodes, settings.manual_bits)
        try:
            oracle = oracle or AccuracyOracle(gm, dag, settings, inputs)
            return checked(plan, oracle), oracle
        except Exception as e:  # noqa: BLE001 - a model the oracle cannot run: say so, plan as asked
            note = f"accuracy not measured: the oracle cannot run this model ({type(e).__name__}: {e})"
            return dataclasses.replace(plan, note=note), None
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES) + ['manual']}")
    how = STRATEGIES[strategy]
    if oracle is None and how.needs_oracle:
        oracle = AccuracyOracle(gm, dag, settings, inputs)
    # baselines are what their papers do: only coach's own searches code crossings
    problem = Problem(dag, settings.network, settings.objective, settings.bits, settings.input_width, oracle,
                      settings.input_codecs, settings.tensor_codecs if how.codes else ())
    plan = how.run(problem, **how.options(settings))
    if plan.extra.get("proven") is False:
        warnings.warn(f"coach: the search stopped after max_search_s={settings.max_search_s} s "
                      f"with its best plan so far, at most {plan.extra['gap']:.1%} from the optimum's "
                      "bound; raise max_search_s for the proven optimum", stacklevel=3)
    if how.trace_aware and varies(settings.network):
        plan = plan_for_trace(problem, plan, settings.input_width)
    if how.codes and settings.per_tensor_bits:
        plan = per_tensor_bits(problem, plan)
    return checked(plan, oracle), oracle


def checked(plan: Plan, oracle: AccuracyOracle | None) -> Plan:
    """``plan`` with the oracle's verdict (``Plan.accuracy``): the measured metric, whether it
    is within the budget, and a note saying what was measured how."""
    if oracle is None:
        return plan
    metric = oracle.metric(plan.end_nodes, plan.bits, plan.codecs)
    what = {"labels": "top-1 drop", "agreement": "top-1 disagreement",
            "l2": "output relative L2"}[oracle.mode]
    note = f"{what} {metric:.4f}; check: {oracle.describe()}"
    if oracle.bounded:
        note += f" (bound {oracle.bound(plan.end_nodes, plan.bits, plan.codecs):.4f})"
    return dataclasses.replace(plan, accuracy=metric,
                               accuracy_ok=oracle.ok(plan.end_nodes, plan.bits, plan.codecs), note=note)


__all__ = ["checked", "observing", "plan_model", "prepare", "traced"]
