"""Pickle-free files of an exported half: its graph as JSON and its tensors as raw bytes.

``torch.export.save`` writes pickles (weights, sample inputs, constants), and a pickle runs
code when it is loaded: a plan directory written that way is code. Here a half is written as

    <stem>.graph.json   the ``torch.export`` graph: one record per node, every call target the
                        full name of an operator on an explicit allow-list
                        (``coach_fx.deploy.graph_ops``: ``aten.conv2d.default``, ...; a few
                        ``operator`` functions for size arithmetic), every
                        argument a node name, a number, a string, a list or a tagged
                        dtype / device / layout / memory format; the output's tree structure
    <stem>.tensors      its parameters, buffers and constants: an 8-byte header length, a JSON
                        header (name -> dtype, shape, offset), then the raw bytes

or, for several halves of one model that share weights (an online model's plans), each
graph alone and their tensors once in a shared store (``save_exported(..., store=)``, keyed
by content: a weight that several halves hold is written once, and read back as one tensor
that every half shares, as they do in memory)

and read back by building an ``fx.Graph`` from those records: a name is looked up in the
allow-list as a whole string (no attribute is walked for it), so nothing in the files can name
a Python object outside the list, and no loader that executes code is ever called. A half that
calls an operator outside the list is saved decomposed to the core ATen operators (which the
list holds), with a warning. Reading is from bytes already checked against a plan's manifest
(``coach_fx.deploy.files.PlanFiles``): this module opens no file it parses.

Example::

    >>> ep = torch.export.export(module, example_inputs)                   # doctest: +SKIP
    >>> save_exported(ep, Path("plan/end"))                                  # doctest: +SKIP
    >>> half = PlanFiles("plan").half("end"); half(*example_inputs)          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import struct
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from coach_fx.passes._compat import tree_unflatten, treespec_dumps, treespec_loads
from coach_fx.deploy.graph_ops import ALLOWED_OPS

log = logging.getLogger("coach_fx")

FORMAT = 1
#: Python functions a saved graph may call: tuple picking and size arithmetic.
OPERATORS = {f.__name__: f for f in (operator.getitem, operator.add, operator.sub, operator.mul,
                                     operator.floordiv, operator.truediv, operator.mod, operator.neg,
                                     operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                                     operator.ge, math.ceil, math.floor)}
#: The dtypes a plan file may name, by name (``float32``...): the one table plan files are read with.
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64)}
_LAYOUTS = {"strided": torch.strided}
_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
            "preserve_format": torch.preserve_format}
_HEAD = struct.Struct("<Q")
#: The largest tensor header accepted (a header is a few hundred bytes per tensor).
MAX_HEADER_BYTES = 1 << 24
#: Tensors start at multiples of this in a tensor file, so that read back they can share the
#: file's buffer (a misaligned one is copied out).
ALIGN = 64


class GraphFileError(ValueError):
    """A saved half that cannot be written without code, or a file that is not one."""


# ------------------------------------------------------------------------------ writing
def save_exported(ep: torch.export.ExportedProgram, stem: Path,
                  store: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write ``ep`` as ``<stem>.graph.json`` and ``<stem>.tensors``; returns the paths written.
    With ``store`` (a shared tensor store, written once with :func:`write_store`), its tensors
    go there instead, keyed by content, and only the graph is written."""
    outside = sorted({_op_name(n.target) for n in ep.graph.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload)} - ALLOWED_OPS)
    if outside:   # e.g. a rarely used aten op: its core ATen decomposition is on the list
        log.warning("coach_fx: this half calls %s, outside the operators a plan file may name "
                    "(coach_fx.deploy.graph_ops); saving it decomposed to core ATen operators", ", ".join(outside))
        ep = ep.run_decompositions()
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


def _op_name(op: torch._ops.OpOverload) -> str:
    return f"{op.namespace}.{op._opname}.{op._overloadname}"


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = _op_name(target)
        if name not in ALLOWED_OPS:
            raise GraphFileError(f"cannot save a call to {name}: not on the operator allow-list "
                                 "(coach_fx.deploy.graph_ops), even decomposed to core ATen")
        return name
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
        if dtype not in DTYPES:
            raise GraphFileError(f"cannot save tensor {name} of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head[name] = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        pad = -len(raw) % ALIGN
        chunks.append(raw + bytes(pad))
        offset += len(raw) + pad
    header = json.dumps(head).encode()
    header += b" " * (-(_HEAD.size + len(header)) % ALIGN)   # the body starts aligned too
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


def parse_graph(data: bytes, source: str) -> dict:
    """A saved graph's JSON document, from bytes already checked (``PlanFiles.read``)."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise GraphFileError(f"{source}: not a saved graph ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GraphFileError(f"{source}: format {doc.get('format') if isinstance(doc, dict) else '?'}, "
                             f"this version reads {FORMAT}")
    return doc


def build_half(doc: dict, tensors: dict[str, torch.Tensor] | None, source: str) -> LoadedHalf:
    """The half a saved graph document (:func:`parse_graph`) describes, its placeholders bound
    to ``tensors`` (its own tensor file's, or a shared store: halves built with one store share
    its tensors)."""
    import coach_fx.passes.ops  # noqa: F401 - registers torch.ops.coach.*
    import coach_fx.passes.imagecodec  # noqa: F401 - registers torch.ops.coach.image_*
    if tensors is None:
        raise GraphFileError(f"{source}: its tensors are in a shared store, and none was given")
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not all(isinstance(r, dict) for r in nodes):
        raise GraphFileError(f"{source}: malformed (its nodes are not a list of records)")
    wanted = list(dict.fromkeys(r["tensor"] for r in nodes if "tensor" in r))
    missing = [k for k in wanted if not isinstance(k, str) or k not in tensors]
    if missing:
        where = "the shared store" if doc.get("store") else "its tensor file"
        raise GraphFileError(f"{source}: tensor {missing[0]!r} is not in {where}")
    params = {r.get("tensor") for r in nodes if r.get("parameter")}
    root = torch.nn.Module()
    attrs: dict[str, str] = {}
    for k, name in enumerate(wanted):
        attrs[name] = f"t{k}"
        if name in params:   # a weight stays a parameter (``parameters()`` counts it), frozen
            root.register_parameter(f"t{k}", torch.nn.Parameter(tensors[name], requires_grad=False))
        else:
            root.register_buffer(f"t{k}", tensors[name])
    g = fx.Graph()
    env: dict[str, fx.Node] = {}

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            raise GraphFileError(f"{source}: a bare list in an argument")
        if not isinstance(v, dict):
            return v
        if len(v) != 1:
            raise GraphFileError(f"{source}: unknown argument {v!r}")
        (tag, x), = v.items()
        if tag == "node":
            if not isinstance(x, str) or x not in env:
                raise GraphFileError(f"{source}: argument names unknown node {x!r}")
            return env[x]
        if tag in ("list", "tuple") and isinstance(x, list):
            items = [dec(i) for i in x]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(x, dict):
            return {str(k): dec(i) for k, i in x.items()}
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        table = {"dtype": DTYPES, "layout": _LAYOUTS, "memory_format": _FORMATS}.get(tag)
        if table is not None and isinstance(x, str) and x in table:
            return table[x]
        if tag == "device" and isinstance(x, str) and (x in ("cpu", "cuda") or
                                                       x.startswith("cuda:") and x[5:].isdigit()):
            return torch.device(x)
        raise GraphFileError(f"{source}: unknown argument {v!r}")

    try:
        for rec in nodes:
            op, name = rec["op"], rec["name"]
            if not isinstance(name, str):
                raise GraphFileError(f"{source}: a node named {name!r}")
            if op == "placeholder":
                env[name] = g.get_attr(attrs[rec["tensor"]]) if "tensor" in rec else g.placeholder(name)
            elif op == "call_function":
                env[name] = g.call_function(resolve_target(rec["target"]), dec(rec["args"]), dec(rec["kwargs"]))
            elif op == "output":
                g.output(dec(rec["args"])[0])
            else:
                raise GraphFileError(f"{source}: node of kind {op!r}")
        out_spec = treespec_loads(doc["out_spec"])
        n_inputs = int(doc["inputs"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, GraphFileError):
            raise
        raise GraphFileError(f"{source}: malformed ({type(e).__name__}: {e})") from None
    return LoadedHalf(fx.GraphModule(root, g), out_spec, n_inputs)


def resolve_target(name: Any) -> Any:
    """The operator a saved graph names: an allow-listed full name (``aten.conv2d.default``,
    ``coach_fx.deploy.graph_ops``) or one of :data:`OPERATORS` (``operator.getitem``). The whole string
    is looked up in the list before anything is resolved, so no part of it can walk to another
    attribute (``aten.__class__...`` is simply not on it)."""
    if isinstance(name, str):
        if name.startswith("operator.") and name[len("operator."):] in OPERATORS:
            return OPERATORS[name[len("operator."):]]
        if name in ALLOWED_OPS:   # a listed name: its three parts are an operator's own
            ns, op, overload = name.split(".")
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
    raise GraphFileError(f"call to {name!r}: not an allowed operator")


def parse_tensors(buf: torch.Tensor, source: str) -> dict[str, torch.Tensor]:
    """A tensor file's tensors from its bytes (a uint8 tensor, already checked: ``PlanFiles``);
    tensors at aligned offsets are views of ``buf``, others are copied out."""
    size = buf.numel()
    if size < _HEAD.size:
        raise GraphFileError(f"{source}: too short for a tensor file")
    data = memoryview(buf.numpy())
    (n,) = _HEAD.unpack_from(data)
    if n > MAX_HEADER_BYTES or _HEAD.size + n > size:
        raise GraphFileError(f"{source}: header of {n} bytes does not fit the file")
    try:
        head = json.loads(bytes(data[_HEAD.size:_HEAD.size + n]))
        if not isinstance(head, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise GraphFileError(f"{source}: header is not JSON ({e})") from None
    start = _HEAD.size + n
    out = {}
    for name, h in head.items():
        dtype = DTYPES.get(h.get("dtype")) if isinstance(h, dict) else None
        shape = h.get("shape") if isinstance(h, dict) else None
        if dtype is None or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise GraphFileError(f"{source}: tensor {name!r} has a bad dtype or shape")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        off = h.get("offset")
        if h.get("nbytes") != nbytes or not isinstance(off, int) or off < 0 or start + off + nbytes > size:
            raise GraphFileError(f"{source}: tensor {name!r} does not fit the file")
        at = start + off
        raw = buf[at:at + nbytes]
        if at % ALIGN:   # misaligned for its dtype's kernels: a copy of its own
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return out


__all__ = ["DTYPES", "GraphFileError", "LoadedHalf", "build_half", "parse_graph", "parse_tensors",
           "resolve_target", "save_exported", "write_store"]
