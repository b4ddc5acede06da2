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
    """A saved output structure; a class this process has not registered (transformers'
    ModelOutput where transformers is not imported) reads back as the dict it subclasses."""
    import json
    doc = json.loads(text)

    def plain(node: dict) -> None:
        if node.get("type") is not None and node["type"] not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            node["type"] = "builtins.dict"
        for child in node.get("children_spec", []):
            plain(child)
    if isinstance(doc, list) and len(doc) == 2 and isinstance(doc[1], dict):
        plain(doc[1])
    return pytree.treespec_loads(json.dumps(doc))


def dynamo_export(model: Any, inputs: tuple) -> Any:
    """One FX graph of ``model`` as dynamo sees it (``torch._dynamo.export``); raises on a
    graph break."""
    import torch._dynamo

    gm, _guards = torch._dynamo.export(model)(*inputs)
    return gm
