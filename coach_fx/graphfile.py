"""Pickle-free files of an exported half: its graph as JSON and its tensors as raw bytes.

``torch.export.save`` writes pickles (weights, sample inputs, constants), and a pickle runs
code when it is loaded: a plan directory written that way is code. Here a half is written as

    <stem>.graph.json   the ``torch.export`` graph: one record per node, every call target an
                        operator name from an allow-list (``torch.ops.aten`` / ``coach`` /
                        ``prims``, a few ``operator`` functions for size arithmetic), every
                        argument a node name, a number, a string, a list or a tagged
                        dtype / device / layout / memory format; the output's tree structure
    <stem>.tensors      its parameters, buffers and constants: an 8-byte header length, a JSON
                        header (name -> dtype, shape, offset), then the raw bytes

or, for several halves of one model that share weights (an online model's plans), each
graph alone and their tensors once in a shared store (``save_exported(..., store=)``, keyed
by content: a weight that several halves hold is written once, and read back as one tensor
that every half shares, as they do in memory)

and read back by building an ``fx.Graph`` from those records: nothing in the files can name a
Python object outside the allow-list, and no loader that executes code is ever called.

Example::

    >>> ep = torch.export.export(module, example_inputs)               # doctest: +SKIP
    >>> save_exported(ep, Path("plan/end"))                              # doctest: +SKIP
    >>> half = load_exported(Path("plan/end")); half(*example_inputs)    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import struct
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from coach_fx._compat import tree_unflatten, treespec_dumps, treespec_loads

FORMAT = 1
#: Operator namespaces a saved graph may call (``torch.ops.<namespace>``).
NAMESPACES = ("aten", "coach", "prims")
#: Python functions a saved graph may call: tuple picking and size arithmetic.
OPERATORS = {f.__name__: f for f in (operator.getitem, operator.add, operator.sub, operator.mul,
                                     operator.floordiv, operator.truediv, operator.mod, operator.neg,
                                     operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                                     operator.ge, math.ceil, math.floor)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64)}
_LAYOUTS = {"strided": torch.strided}
_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
            "preserve_format": torch.preserve_format}
_HEAD = struct.Struct("<Q")
#: The largest tensor header accepted (a header is a few hundred bytes per tensor).
MAX_HEADER_BYTES = 1 << 24


class GraphFileError(ValueError):
    """A saved half that cannot be written without code, or a file that is not one."""


# ------------------------------------------------------------------------------ writing
def save_exported(ep: torch.export.ExportedProgram, stem: Path,
                  store: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write ``ep`` as ``<stem>.graph.json`` and ``<stem>.tensors``; returns the paths written.
    With ``store`` (a shared tensor store, written once with :func:`write_store`), its tensors
    go there instead, keyed by content, and only the graph is written."""
    sig = ep.graph_signature
    tensors = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    lifted: dict[str, str] = {}
    params: set[str] = set()
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) \
                or spec.target not in tensors:
            raise GraphFileError(f"cannot save a graph input of kind {spec.kind.name} ({spec.target})")
        lifted[spec.arg.name] = spec.target
        if spec.kind == InputKind.PARAMETER:
            params.add(spec.target)
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        raise GraphFileError("cannot save a graph that mutates its buffers (export it in eval mode)")
    nodes = []
    for n in ep.graph.nodes:
        rec: dict[str, Any] = {"op": n.op, "name": n.name}
        if n.op == "placeholder":
            if n.name in lifted:
                rec["tensor"] = lifted[n.name]
                rec["parameter"] = lifted[n.name] in params
        elif n.op == "call_function":
            rec["target"] = _target_name(n.target)
            rec["args"], rec["kwargs"] = _enc(n.args), _enc(n.kwargs)
        elif n.op == "output":
            rec["args"] = _enc(n.args)
        else:
            raise GraphFileError(f"cannot save a {n.op} node ({n.name}) of an exported graph")
        nodes.append(rec)
    doc = {"format": FORMAT, "nodes": nodes, "out_spec": treespec_dumps(ep.call_spec.out_spec),
           "inputs": len(sig.user_inputs)}
    graph_path, tensor_path = stem.with_suffix(".graph.json"), stem.with_suffix(".tensors")
    own = {k: tensors[k] for k in dict.fromkeys(lifted.values())}
    if store is not None:   # the graph names each tensor by its content's key in the store
        keys = {name: _content_key(t) for name, t in own.items()}
        store.update({keys[name]: t for name, t in own.items()})
        for rec in nodes:
            if "tensor" in rec:
                rec["tensor"] = keys[rec["tensor"]]
        doc["store"] = True
        graph_path.write_text(json.dumps(doc))
        return [graph_path]
    graph_path.write_text(json.dumps(doc))
    _write_tensors(tensor_path, own)
    return [graph_path, tensor_path]


def _content_key(t: torch.Tensor) -> str:
    """A tensor's key in a shared store: the SHA-256 of its dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def write_store(store: dict[str, torch.Tensor], path: Path) -> Path:
    """Write a shared tensor store (filled by ``save_exported(..., store=)``) as one file."""
    _write_tensors(path, store)
    return path


def read_store(path: Path) -> dict[str, torch.Tensor]:
    """Read a shared tensor store (check its hash first: see ``coach_fx.artifact``)."""
    return _read_tensors(path)


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        if ns not in NAMESPACES:
            raise GraphFileError(f"cannot save a call to {target} (namespace {ns!r} is not allowed)")
        return f"{ns}.{target._opname}.{target._overloadname}"
    name = getattr(target, "__name__", None)
    if name in OPERATORS and OPERATORS[name] is target:
        return f"operator.{name}"
    raise GraphFileError(f"cannot save a call to {target!r}: not an allowed operator")


def _enc(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, (list, tuple)):
        return {"list" if isinstance(v, list) else "tuple": [_enc(x) for x in v]}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise GraphFileError(f"cannot save a dict with non-string keys: {v!r}")
        return {"dict": {k: _enc(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise GraphFileError(f"cannot save an argument of type {type(v).__name__}: {v!r}")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    head, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise GraphFileError(f"cannot save tensor {name} of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head[name] = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(_HEAD.pack(len(header)))
        f.write(header)
        for c in chunks:
            f.write(c)


# ------------------------------------------------------------------------------ reading
class LoadedHalf(torch.nn.Module):
    """A half read back: its graph (``gm``) called with the flat inputs, its outputs in the
    structure the exported module returned."""

    def __init__(self, gm: fx.GraphModule, out_spec: Any, n_inputs: int) -> None:
        super().__init__()
        self.gm, self.out_spec, self.n_inputs = gm, out_spec, n_inputs

    def forward(self, *args: Any) -> Any:
        if len(args) != self.n_inputs:
            raise TypeError(f"this half takes {self.n_inputs} inputs, got {len(args)}")
        out = self.gm(*args)
        return tree_unflatten(list(out) if isinstance(out, (tuple, list)) else [out], self.out_spec)


def load_exported(stem: Path, store: dict[str, torch.Tensor] | None = None) -> LoadedHalf:
    """Read a half written by :func:`save_exported` (check the files' hashes first: see
    ``coach_fx.artifact``); ``store``: the shared tensor store it was written with, if any
    (:func:`read_store`: halves read with one store share its tensors)."""
    import coach_fx.passes.ops  # noqa: F401 - registers torch.ops.coach.*
    import coach_fx.runtime.imagecodec  # noqa: F401 - registers torch.ops.coach.image_*
    graph_path, tensor_path = stem.with_suffix(".graph.json"), stem.with_suffix(".tensors")
    try:
        doc = json.loads(graph_path.read_text())
    except (OSError, ValueError) as e:
        raise GraphFileError(f"{graph_path}: not a saved graph ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GraphFileError(f"{graph_path}: format {doc.get('format') if isinstance(doc, dict) else '?'}, "
                             f"this version reads {FORMAT}")
    tensors = _tensors_of(doc, graph_path, tensor_path, store)
    params = {r.get("tensor") for r in doc.get("nodes", ()) if isinstance(r, dict) and r.get("parameter")}
    root = torch.nn.Module()
    attrs: dict[str, str] = {}
    for k, (name, t) in enumerate(tensors.items()):
        attrs[name] = f"t{k}"
        if name in params:   # a weight stays a parameter (``parameters()`` counts it), frozen
            root.register_parameter(f"t{k}", torch.nn.Parameter(t, requires_grad=False))
        else:
            root.register_buffer(f"t{k}", t)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            raise GraphFileError(f"{graph_path}: a bare list in an argument")
        if not isinstance(v, dict):
            return v
        (tag, x), = v.items()
        if tag == "node":
            if x not in env:
                raise GraphFileError(f"{graph_path}: argument names unknown node {x!r}")
            return env[x]
        if tag in ("list", "tuple"):
            items = [dec(i) for i in x]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            return {str(k): dec(i) for k, i in x.items()}
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(tag)
        if table is not None and x in table:
            return table[x]
        if tag == "device" and x in ("cpu", "cuda") or tag == "device" and str(x).startswith("cuda:"):
            return torch.device(x)
        raise GraphFileError(f"{graph_path}: unknown argument {v!r}")

    try:
        for rec in doc["nodes"]:
            op, name = rec["op"], rec["name"]
            if op == "placeholder":
                if "tensor" in rec:
                    if rec["tensor"] not in attrs:
                        raise GraphFileError(f"{graph_path}: tensor {rec['tensor']!r} is not in {tensor_path}")
                    env[name] = g.get_attr(attrs[rec["tensor"]])
                else:
                    env[name] = g.placeholder(name)
            elif op == "call_function":
                env[name] = g.call_function(_resolve(rec["target"]), dec(rec["args"]), dec(rec["kwargs"]))
            elif op == "output":
                g.output(dec(rec["args"])[0])
            else:
                raise GraphFileError(f"{graph_path}: node of kind {op!r}")
        out_spec = treespec_loads(doc["out_spec"])
        n_inputs = int(doc["inputs"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, GraphFileError):
            raise
        raise GraphFileError(f"{graph_path}: malformed ({type(e).__name__}: {e})") from None
    return LoadedHalf(fx.GraphModule(root, g), out_spec, n_inputs)


def _tensors_of(doc: dict, graph_path: Path, tensor_path: Path,
                store: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A saved graph's tensors: its own file's, or those it names in the shared ``store``."""
    if not doc.get("store"):
        return _read_tensors(tensor_path)
    if store is None:
        raise GraphFileError(f"{graph_path}: its tensors are in a shared store, and none was given")
    wanted = [r["tensor"] for r in doc.get("nodes", ()) if isinstance(r, dict) and "tensor" in r]
    missing = [k for k in wanted if k not in store]
    if missing:
        raise GraphFileError(f"{graph_path}: tensor {missing[0]!r} is not in the shared store")
    return {k: store[k] for k in dict.fromkeys(wanted)}


def _resolve(name: str) -> Any:
    parts = str(name).split(".")
    if len(parts) == 2 and parts[0] == "operator" and parts[1] in OPERATORS:
        return OPERATORS[parts[1]]
    if len(parts) == 3 and parts[0] in NAMESPACES:
        ns = getattr(torch.ops, parts[0])
        try:
            return getattr(getattr(ns, parts[1]), parts[2])
        except AttributeError:
            pass
    raise GraphFileError(f"call to {name!r}: not an allowed operator")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GraphFileError(f"{path}: {e.strerror}") from None
    if len(data) < _HEAD.size:
        raise GraphFileError(f"{path}: too short for a tensor file")
    (n,) = _HEAD.unpack_from(data)
    if n > MAX_HEADER_BYTES or _HEAD.size + n > len(data):
        raise GraphFileError(f"{path}: header of {n} bytes does not fit the file")
    try:
        head = json.loads(data[_HEAD.size:_HEAD.size + n])
    except ValueError as e:
        raise GraphFileError(f"{path}: header is not JSON ({e})") from None
    body = memoryview(data)[_HEAD.size + n:]
    out = {}
    for name, h in head.items():
        dtype = _DTYPES.get(h.get("dtype"))
        shape = h.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise GraphFileError(f"{path}: tensor {name!r} has a bad dtype or shape")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        off = h.get("offset")
        if h.get("nbytes") != nbytes or not isinstance(off, int) or off < 0 or off + nbytes > len(body):
            raise GraphFileError(f"{path}: tensor {name!r} does not fit the file")
        raw = bytearray(body[off:off + nbytes])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        out[name] = flat.view(dtype).reshape(shape)
    return out


__all__ = ["GraphFileError", "LoadedHalf", "load_exported", "read_store", "save_exported", "write_store"]
