"""Capture: turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

Order of attempts:

1. ``symbolic_trace`` with a leaf policy: torch.nn built-ins are leaves (one node each), and
   the caller may add module types or qualified names;
2. ``torch.export`` (handles some constructs fx cannot, e.g. shape-dependent Python control
   flow); its parameters are plain attributes of the returned module, so each half of a split
   still owns its own weights;
3. the dynamo graph (``torch._dynamo.export``), when the model is one graph for dynamo;
4. otherwise :class:`CaptureError` naming the module, and for each attempt the source line and
   the construct that stopped it.

Example::

    >>> gm = capture(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))  # doctest: +SKIP
    >>> gm.meta["coach_capture"]                                                   # doctest: +SKIP
    'symbolic_trace'
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn


class CaptureError(RuntimeError):
    """The model could not be captured into a graph; the message says where and why."""


class CoachTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn built-ins plus user-given types or qualified names."""

    def __init__(self, leaf_modules: Sequence[Any] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException, model: nn.Module | None = None) -> str:
    """The innermost traceback frame outside torch: where the user's code hit the problem
    (else the model's ``forward``, when torch raised it from its own code)."""
    import coach_fx

    ours = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)),
            os.path.dirname(os.path.abspath(coach_fx.__file__)),
            os.path.dirname(os.path.dirname(os.path.abspath(torch.fx.__file__))))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(ours)]
    if not frames:
        forward = getattr(type(model), "forward", None)
        try:
            lines, first = inspect.getsourcelines(forward)
            where = f"{inspect.getsourcefile(forward)}:{first}"
        except (TypeError, OSError):
            return "a place inside torch (no frame of the model's code on the stack)"
        return (f"{where} in {type(model).__name__}.forward (raised inside torch while it ran "
                f"this forward: `{lines[0].strip()}`)")
    f = frames[-1]
    line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{f.filename}:{f.lineno} in {f.name}: `{line}`"


def _construct(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if "control flow" in low or "data-dependent" in low or "data dependent" in low \
            or "guardondatadependent" in type(exc).__name__.lower():
        kind = "data-dependent control flow"
    elif "iterate" in low or "len(" in low:
        kind = "iteration over a traced value"
    else:
        kind = type(exc).__name__
    return f"{kind} ({msg[:200]})"


def capture(model: nn.Module, example_inputs: Sequence[Any], leaf_modules: Sequence[Any] = (),
            allow_export: bool = True) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule; ``gm.meta['coach_capture']`` says which way worked."""
    if isinstance(model, fx.GraphModule) and not leaf_modules:
        model.meta.setdefault("coach_capture", "graph_module")
        return model
    with _one_forward_pass(model) as note, _no_leaked_proxies(model):
        gm = _capture(model, example_inputs, leaf_modules, allow_export)
    if note:
        gm.meta["coach_note"] = note
    return gm


@contextmanager
def _no_leaked_proxies(model: nn.Module) -> Iterator[None]:
    """A model that caches what its forward computes (timm's LeViT keeps its attention biases
    in a dict in eval mode) would keep the tracer's proxies, and the next trace of the same
    model would read them ("does not belong to this Graph"): such caches are put back."""
    saved = [(v, dict(v)) for m in model.modules() for k, v in vars(m).items()
             if isinstance(v, dict) and not k.startswith("_")]   # _parameters etc.: nn's own
    try:
        yield
    finally:
        for cache, before in saved:
            if any(isinstance(x, fx.Proxy) for x in cache.values()):
                cache.clear()
                cache.update(before)


@contextmanager
def _one_forward_pass(model: nn.Module) -> Iterator[str | None]:
    """A transformers decoder returns its KV cache (``DynamicCache``), which no graph can
    carry: capture one forward pass without it (``config.use_cache=False``, restored after).
    A generation loop then calls the compiled model on the whole sequence at each step."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "use_cache", False):
        yield None
        return
    cfg.use_cache = False
    try:
        yield ("planned for one forward pass without the KV cache (use_cache=False): a generation "
               "loop calls the compiled model on the whole sequence at each step")
    finally:
        cfg.use_cache = True


def _capture(model: nn.Module, example_inputs: Sequence[Any], leaf_modules: Sequence[Any],
             allow_export: bool) -> fx.GraphModule:
    name = type(model).__name__
    try:
        tracer = CoachTracer(leaf_modules)
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, name)
        gm.meta["coach_capture"] = "symbolic_trace"
        return gm
    except Exception as trace_exc:  # noqa: BLE001 - any tracing failure moves on to export
        first = f"symbolic_trace failed at {_user_frame(trace_exc, model)}: {_construct(trace_exc)}"
        if not allow_export:
            raise CaptureError(f"cannot capture {name}: {first}") from trace_exc
    try:
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
        gm = ep.module()
        if not isinstance(gm, fx.GraphModule):
            raise CaptureError("torch.export did not return a GraphModule")
        gm = _plain_graph_module(gm)
        gm.meta["coach_capture"] = "torch.export"
        return gm
    except Exception as export_exc:  # noqa: BLE001
        second = f"torch.export failed at {_user_frame(export_exc, model)}: {_construct(export_exc)}"
    try:
        from coach_fx.passes._compat import dynamo_export
        gm = dynamo_export(model, tuple(example_inputs))
        gm = _plain_graph_module(gm)
        gm.meta["coach_capture"] = "dynamo"
        return gm
    except Exception as dynamo_exc:  # noqa: BLE001
        third = f"the dynamo graph failed at {_user_frame(dynamo_exc, model)}: {_construct(dynamo_exc)}"
        if "Cache" in first + second + third:
            third += ("\n  The model returns a KV cache object (a transformers decoder): capture it "
                      "with use_cache=False (model.config.use_cache = False)")
        raise CaptureError(
            f"cannot capture {name}:\n  {first}\n  {second}\n  {third}\n"
            "Rewrite the construct with tensor ops (torch.where, torch.cond), mark the submodule "
            "that holds it as a leaf (leaf_modules=[...]), or use "
            "torch.compile(model, backend='coach'), which plans each graph between breaks."
        ) from dynamo_exc


def _plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree codegen: flat inputs, the model's own output structure in the graph.

    The input-guard call is dropped too: ``CompiledModel`` checks input shapes itself.
    """
    from coach_fx.passes._compat import tree_unflatten

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    spec = getattr(gm, "_out_spec", None)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "output":
            flat = fx.map_arg(node.args[0], lambda n: env[n])
            out = tree_unflatten(list(flat), spec) if spec is not None else flat
            graph.output(out)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    out = fx.GraphModule(gm, graph, type(gm).__name__)
    if spec is not None and spec.type not in (tuple, list, dict, type(None)):
        # fx writes a dict subclass (transformers' ModelOutput) as a plain dict: keep the
        # structure, so that the compiled model answers with the model's own output class
        out.meta["coach_out_spec"] = spec
    return out
