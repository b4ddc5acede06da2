"""``torch.compile(model, backend="coach", options={...})``.

The backend is found through the ``torch_dynamo_backends`` entry point in ``pyproject.toml``
(the one place it is registered). ``options`` take the keywords of :func:`coach_fx.compile`.

Dynamo hands over one FX graph per region between graph breaks; each graph is planned and
split on its own, so a model with a graph break runs as several end->cloud round trips (one
per graph). Parameters and buffers that dynamo lifts into graph inputs are turned back into
attributes, so a plan never ships weights and each half owns its own; they stay the model's
tensors, so a training step through the compiled model updates the model.

Example::

    >>> cm = torch.compile(model, backend="coach",
    ...                    options={"network": coach_fx.Network(10), "strategy": "coach"})  # doctest: +SKIP
    >>> cm(x)                                                                             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from coach_fx.compiled import CompiledModel
from coach_fx.driver import observing, plan_model, prepare
from coach_fx.passes.eval_calls import eval_calls
from coach_fx.settings import Settings

#: Every graph compiled by the backend in this process, newest last (for inspection and tests).
COMPILED: list[CompiledModel] = []


def _is_weight(node: fx.Node, value: Any) -> bool:
    if isinstance(value, nn.Parameter):
        return True
    arg = node.meta.get("grapharg")
    src = repr(getattr(arg, "source", ""))
    return "_parameters" in src or "_buffers" in src


def _lift_weights(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Replace placeholders that carry parameters/buffers by get_attr; return data input indices."""
    # work on a copy: dynamo still reads the graph it gave us to decide what to pass in
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    root = nn.Module()
    keep: list[int] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and _is_weight(node, value):
            name = f"w{i}_{node.name}"[:120]
            if isinstance(value, nn.Parameter):
                root.register_parameter(name, value)
            else:
                root.register_buffer(name, value)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        else:
            keep.append(i)
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    new = fx.GraphModule(root, graph, "CoachGraph")
    new.meta["coach_capture"] = "dynamo"
    return new, keep


def coach_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                  options: dict | None = None, **kw: Any) -> Callable[..., Any]:
    """The dynamo backend: plan and split one graph, return a callable that runs it."""
    settings = Settings.from_options(options)
    odd = [type(x).__name__ for x in example_inputs if not isinstance(x, (torch.Tensor, torch.SymInt, int))]
    if odd:
        raise TypeError(f"backend='coach' takes tensor and size inputs; got {odd}")
    # a dynamic dimension (dynamo marks the batch dynamic once it has seen two) comes in as a
    # size input: plan for the size seen now; the graph itself follows any size
    dynamic = any(isinstance(x, torch.SymInt) for x in example_inputs)
    example_inputs = [x.node.hint if isinstance(x, torch.SymInt) else x for x in example_inputs]
    n_expected = len(example_inputs)
    lifted, keep = _lift_weights(gm, example_inputs)
    if dynamic:
        lifted.meta["coach_capture"] = "dynamo-dynamic"
    inputs = tuple(example_inputs[i] for i in keep)
    weights = [example_inputs[i] for i in range(len(example_inputs)) if i not in set(keep)]
    # a train-mode graph updates its buffers each run: planning runs it many times, so they
    # are put back after (running statistics, num_batches_tracked)
    try:
        with observing(weights, [lifted]):
            with eval_calls(lifted):      # dropout and batch norm as deployed while planning
                lifted, inputs, dag = prepare(lifted, inputs, settings)
                plan, oracle = plan_model(lifted, inputs, dag, settings)
            cm = CompiledModel(lifted, dag, plan, settings, inputs, oracle)
    except Exception as e:  # noqa: BLE001 - a graph coach cannot split runs as the model's own code
        return eager_fallback(gm, e)
    trainable = any(getattr(w, "requires_grad", False) for w in weights)
    COMPILED.append(cm)

    def run(*args: Any) -> Any:
        # dynamo's graph states train/eval itself; the straight-through path is needed only
        # when gradients must reach the weights
        cm.training = trainable and torch.is_grad_enabled()
        if len(args) != n_expected:
            raise RuntimeError(f"coach backend: called with {len(args)} inputs, compiled for {n_expected}")
        return cm(*(args[i] for i in keep))

    run.compiled = cm  # type: ignore[attr-defined]
    return run


#: Graphs the backend could not split and runs as they are, newest last: (a short description, why).
FALLBACKS: list[tuple[str, str]] = []


def eager_fallback(gm: fx.GraphModule, error: BaseException) -> Callable[..., Any]:
    """The graph as dynamo gave it (the model's own code, unsplit), with a warning naming it
    and why, as torch.compile backends fall back: e.g. a detector's post-processing, whose
    shapes depend on the data (how many boxes survive)."""
    import warnings
    calls = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    what = (f"a graph of {len(calls)} ops ({', '.join(dict.fromkeys(c.split('.')[-1] for c in calls[:40]))[:160]}"
            f"{'...' if len(calls) > 40 else ''})")
    why = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    FALLBACKS.append((what, why))
    warnings.warn(f"backend='coach': cannot plan {what}; it runs unsplit, as the model's own code, on "
                  f"this side ({why})", stacklevel=2)
    return gm.forward
