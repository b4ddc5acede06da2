"""Partition: apply a plan to an annotated GraphModule and split it into two GraphModules.

* the **end** module takes the model's inputs and returns the flat tuple of *payloads* of the
  crossing values: per float tensor sent with b <= 16 bits ``(packed uint8, scale, zero_point)``
  from ``coach::quantize`` -> ``coach::pack``; with 32 bits, and for anything that is not a
  float tensor (integer tensors, sizes, ints), the value as it is;
* the **cloud** module takes those payloads (``coach::unpack`` -> ``coach::dequantize``) and
  returns what the model returns.

When every output is computed on the end (end-only) the end module returns the model's output
and the cloud module is the identity. Parameters and buffers (``get_attr``) and submodules go
with the half that reads them, so each half owns only its own weights (shared objects with the
model, so training one trains the other). Size arithmetic runs on the end when it can and
crosses as a plain value; otherwise it runs in the cloud.

Before/after for ``y = fc(relu(conv(x)))`` cut after ``relu`` with 8 bits::

    end:   conv -> relu -> coach.quantize(relu, 8) -> coach.pack(codes, 8) -> (packed, scale, zp)
    cloud: (packed, scale, zp) -> coach.unpack -> coach.dequantize -> fc -> y

``mode="train"`` replaces quantize/pack/unpack/dequantize by ``coach::fake_quantize``, whose
gradient passes straight through, so ``loss.backward()`` reaches both halves.

``codecs`` sends a model input that crosses as images (``passes.imagecodec``: each sample
8-bit quantized, then JPEG or PNG coded), what a deployed camera sends; cloud-only with
``codecs={"x": "jpeg90"}``::

    end:   x -> coach.image_encode(x, "jpeg90") -> (payload,)            # 1-D uint8
    cloud: (x_image,) -> coach.image_decode(x_image, "jpeg90", shape, dtype) -> ... -> y

In ``mode="train"`` it is ``coach::image_roundtrip`` (gradient straight through).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterable, Mapping, Sequence

import torch
import torch.fx as fx

import coach_fx.passes.ops  # noqa: F401 - registers torch.ops.coach
from coach_fx.passes.packed_codec import TENSOR_CODECS
from coach_fx.passes.wire_sizes import ALL_BITS
import coach_fx.passes.imagecodec as imagecodec  # registers torch.ops.coach.image_*
from coach_fx.dag import dag_groups
from coach_fx.passes.annotate import constant_nodes, meta, mutated_input
from coach_fx.passes.boundary import Boundary, Crossing

_ops = torch.ops.coach


def _sides(gm: fx.GraphModule, groups: Mapping[str, str], end: set[str]) -> dict[str, str | None]:
    """'end' or 'cloud' per fx node; None for get_attr and constants (``constant_nodes``):
    copied into whichever half reads them."""
    side: dict[str, str | None] = {}
    constant = constant_nodes(gm)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            side[n.name] = "end"
        elif n.op == "get_attr" or n.name in constant:
            side[n.name] = None
        elif n.name in groups:
            side[n.name] = "end" if groups[n.name] in end else "cloud"
        elif n.op == "output":
            side[n.name] = "end" if all(side[a.name] in ("end", None) for a in n.all_input_nodes) \
                else "cloud"
        else:  # size arithmetic: on the end whenever its inputs are there
            side[n.name] = "end" if all(side[a.name] in ("end", None) for a in n.all_input_nodes) \
                else "cloud"
    return side


def _emit(eg: fx.Graph, v: fx.Node, c: "Crossing", mode: str, copy: bool = False) -> list[fx.Node]:
    """The payload nodes that send ``v`` (``copy``: v is modified later, keep today's value)."""
    if c.kind == "image":
        op = _ops.image_roundtrip if mode == "train" else _ops.image_encode
        return [eg.call_function(op.default, (v, c.codec))]
    if mode == "train" and c.kind != "raw":
        return [eg.call_function(_ops.fake_quantize.default, (v, c.bits))]
    if c.kind == "quant":
        q = eg.call_function(_ops.quantize.default, (v, c.bits))
        codes, scale, zp = (eg.call_function(operator.getitem, (q, i)) for i in range(3))
        return [eg.call_function(_ops.pack.default, (codes, c.bits)), scale, zp]
    if copy and c.shape is not None:
        return [eg.call_method("clone", (v,))]
    return [v]


def _copy_into(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node],
               side: Mapping[str, str | None]) -> fx.Node:
    def arg(a: fx.Node) -> fx.Node:
        if a not in env and side[a.name] is None:   # a parameter or constant: computed here
            _copy_into(graph, a, env, side)
        return env[a]
    env[node] = graph.node_copy(node, arg)
    return env[node]


def _check_codecs(gm: fx.GraphModule, codecs: Mapping[str, str]) -> None:
    inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for name, codec in codecs.items():
        if name not in inputs:
            raise ValueError(f"partition: an image codec ({codec!r}) is for model inputs only; "
                             f"{name!r} is not one (inputs: {sorted(inputs)})")
        imagecodec.parse(codec)
        info = meta(inputs[name])
        if not info.is_tensor or not imagecodec.applicable(info.shape, info.dtype):
            raise ValueError(f"partition: input {name!r} cannot travel as {codec!r}: image codecs "
                             "need a float (N, C, H, W) or (C, H, W) tensor with C in (1, 3), got "
                             f"{info.dtype} of shape {info.shape}")


def _crossing(n: fx.Node, groups: Mapping[str, str], bits: Mapping[str, int],
              codecs: Mapping[str, str], tensor_codecs: Mapping[str, str],
              shapes: Mapping[str, Sequence[int]]) -> Crossing:
    """How the value of end node ``n`` crosses: as an image, raw, or quantized with its bits."""
    info = meta(n)
    if n.name in shapes:    # the same graph run on inputs of another batch size
        info = dataclasses.replace(info, shape=tuple(shapes[n.name]))
    owner = groups.get(n.name, n.name)
    b = int(bits.get(owner, 32))
    if info.kind == "tensors":
        raise NotImplementedError(
            f"partition: a tuple of tensors ({n.name}) would cross the cut; cut before or "
            "after the node that unpacks it")
    is_float = info.is_tensor and info.float
    if n.op == "placeholder" and n.name in codecs:
        return Crossing(n.name, owner, "image", imagecodec.BITS, info.shape, info.dtype,
                        imagecodec.parse(codecs[n.name]).name)
    kind = "raw" if not is_float or b >= 32 else "quant"
    if is_float and b not in ALL_BITS:
        raise ValueError(f"partition: bits for {owner} must be one of {ALL_BITS}; got {b}")
    codec = tensor_codecs.get(owner) if kind == "quant" else None
    return Crossing(n.name, owner, kind, b if kind != "raw" else 32, info.shape, info.dtype, codec)


def _captures(gm: fx.GraphModule, side: Mapping[str, str], crossing_nodes: list[fx.Node],
              crossings: list[Crossing]) -> dict[fx.Node, str]:
    """End node -> the crossing captured just before it. An end-side in-place op (relu_, +=)
    may change a crossing tensor after it was made; the cloud must see it as its readers would
    have in the original graph: capture it just before the first such change that follows the
    last cloud reader."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    capture_before: dict[fx.Node, str] = {}
    for n, c in zip(crossing_nodes, crossings):
        readers = [order[u] for u in n.users if side[u.name] == "cloud"]
        changes = [m for m in n.users if side[m.name] == "end" and mutated_input(m) is n]
        first_r, last_r = min(readers), max(readers)
        if any(first_r < order[m] < last_r for m in changes):
            raise NotImplementedError(
                f"partition: {n.name} is modified in place on the end ({changes[0].name}) between "
                "its cloud readers; cut elsewhere")
        later = [m for m in changes if order[m] > last_r]
        if later:
            capture_before[min(later, key=order.get)] = c.name
    return capture_before


def _cloud_inputs(cg: fx.Graph, crossing_nodes: list[fx.Node], crossings: list[Crossing],
                  mode: str) -> dict[fx.Node, fx.Node]:
    """The cloud graph's placeholders and boundary ops: original crossing node -> its value."""
    cenv: dict[fx.Node, fx.Node] = {}
    for c in crossings:
        src = next(n for n in crossing_nodes if n.name == c.name)
        if mode == "train" and c.kind != "raw":
            cenv[src] = cg.placeholder(f"{c.name}_fq")
        elif c.kind == "image":
            cenv[src] = cg.call_function(_ops.image_decode.default,
                                         (cg.placeholder(f"{c.name}_image"), c.codec,
                                          list(c.shape), c.dtype))
        elif c.kind == "quant":
            packed, scale, zp = (cg.placeholder(f"{c.name}_{s}") for s in ("packed", "scale", "zp"))
            codes = cg.call_function(_ops.unpack.default, (packed, c.bits, list(c.shape)))
            cenv[src] = cg.call_function(_ops.dequantize.default, (codes, scale, zp, c.bits, c.dtype))
        else:
            cenv[src] = cg.placeholder(c.name)
    return cenv


def partition(gm: fx.GraphModule, end_nodes: Iterable[str], bits: Mapping[str, int],
              mode: str = "deploy", codecs: Mapping[str, str] | None = None,
              tensor_codecs: Mapping[str, str] | None = None,
              shapes: Mapping[str, Sequence[int]] | None = None
              ) -> tuple[fx.GraphModule, fx.GraphModule, Boundary]:
    """Split annotated ``gm`` into (end module, cloud module, boundary) for ``end_nodes``.

    ``bits`` maps DAG node names (or model input names) to bits; a crossing value that is a
    float tensor and not listed goes with 32 bits. ``codecs`` maps model input names to an
    image codec (``passes.imagecodec``: "jpeg<q>", "png"): such an input, where it crosses,
    travels as images (``Crossing.kind == "image"``; its bits do not apply). ``tensor_codecs``
    maps DAG node names to a lossless codec for their packed codes (``runtime.wire``'s
    ``TENSOR_CODECS``: "deflate"), applied on the wire; the halves do not change. ``shapes``
    (crossing fx node -> shape) replaces the annotated shapes where the same graph runs on
    another batch size.
    """
    if mode not in ("deploy", "train"):
        raise ValueError(f"mode must be 'deploy' or 'train', got {mode!r}")
    codecs = dict(codecs or {})
    _check_codecs(gm, codecs)
    tensor_codecs = dict(tensor_codecs or {})
    bad = {c for c in tensor_codecs.values() if c not in TENSOR_CODECS}
    if bad:
        raise ValueError(f"partition: unknown tensor codec(s) {sorted(bad)} (known: {sorted(TENSOR_CODECS)})")
    groups = dag_groups(gm)
    end = set(end_nodes)
    unknown = end - set(groups.values())
    if unknown:
        raise ValueError(f"partition: unknown DAG node(s) {sorted(unknown)[:5]}")
    side = _sides(gm, groups, end)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    end_only = side[output.name] == "end"

    crossing_nodes = [n for n in gm.graph.nodes if side.get(n.name) == "end" and n.op != "output"
                      and any(side[u.name] == "cloud" for u in n.users)]
    crossings = [_crossing(n, groups, bits, codecs, tensor_codecs, shapes or {}) for n in crossing_nodes]
    capture_before = _captures(gm, side, crossing_nodes, crossings)

    eg, cg = fx.Graph(), fx.Graph()
    eenv: dict[fx.Node, fx.Node] = {}
    sent: dict[str, list[fx.Node]] = {}
    by_name = {c.name: (n, c) for n, c in zip(crossing_nodes, crossings)}
    for n in gm.graph.nodes:
        if side[n.name] == "end" and n.op != "output":
            if n in capture_before:
                v, c = by_name[capture_before[n]]
                sent[c.name] = _emit(eg, eenv[v], c, mode, copy=True)
            _copy_into(eg, n, eenv, side)
    payload: list[fx.Node] = []
    for n, c in zip(crossing_nodes, crossings):
        payload += sent.get(c.name) or _emit(eg, eenv[n], c, mode)

    boundary = Boundary(tuple(crossings), end_only)
    if end_only:
        eg.output(fx.map_arg(output.args[0], lambda a: eenv[a] if a in eenv else _copy_into(eg, a, eenv, side)))
        result = cg.placeholder("result")
        cg.output(result)
    else:
        eg.output(tuple(payload))
        cenv = _cloud_inputs(cg, crossing_nodes, crossings, mode)
        for n in gm.graph.nodes:
            if side[n.name] == "cloud" and n.op != "output":
                _copy_into(cg, n, cenv, side)
        cg.output(fx.map_arg(output.args[0], lambda a: cenv[a] if a in cenv else _copy_into(cg, a, cenv, side)))

    end_gm = fx.GraphModule(gm, eg, "EndModule")
    cloud_gm = fx.GraphModule(gm, cg, "CloudModule")
    for half in (end_gm, cloud_gm):
        half.meta["coach_boundary"] = boundary
    return end_gm, cloud_gm, boundary
