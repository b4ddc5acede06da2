"""The one place that touches private torch API (kept small so upgrades break in one file)."""

from __future__ import annotations

from typing import Any

from torch.utils import _pytree as pytree


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    """``torch.utils._pytree.tree_unflatten``: rebuild a nested output from its leaves."""
    return pytree.tree_unflatten(leaves, spec)


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """``torch.utils._pytree.tree_flatten``: (leaves, spec)."""
    return pytree.tree_flatten(tree)


def treespec_dumps(spec: Any) -> str:
    return pytree.treespec_dumps(spec)


def treespec_loads(text: str) -> Any:
    return pytree.treespec_loads(text)


def dynamo_export(model: Any, inputs: tuple) -> Any:
    """One FX graph of ``model`` as dynamo sees it (``torch._dynamo.export``); raises on a
    graph break."""
    import torch._dynamo

    gm, _guards = torch._dynamo.export(model)(*inputs)
    return gm
