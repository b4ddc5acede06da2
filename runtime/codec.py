"""Between the halves and the wire: end payloads <-> message entries, outputs <-> entries.

The end module returns, per crossing in ``Boundary`` order, ``(packed, scale, zero_point)``
for a quantized tensor or the value itself; the cloud module takes the same flat tuple. The
decoded entries are checked against the boundary (count, kind, shape, bits, dtype), so a
well-formed message for another plan is refused too.

An ``"image"`` crossing (a model input sent as JPEG/PNG, ``passes.imagecodec``) is one raw
1-D uint8 entry: its length is bounded here, its sample and image headers are checked by the
cloud half's ``coach::image_decode`` before it decodes; it is never re-quantized.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from coach_fx.passes._compat import tree_flatten, tree_unflatten
from coach_fx.passes.boundary import Boundary, Crossing
from coach_fx.passes.ops import dequantize_impl, quantize_pack_cpu, unpack_impl
from coach_fx.passes.imagecodec import max_payload_bytes
from coach_fx.runtime.wire import MAX_RANK, QUANT, RAW, STATS, Entry, WireError
from coach_fx.passes.wire_sizes import QUANT_BITS, TENSOR_HEADER_BYTES, message_bytes, tensor_bytes, token_rows

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def payload_to_entries(boundary: Boundary, payload: Sequence[Any]) -> list[Entry]:
    entries, k = [], 0
    for c in boundary.crossings:
        if c.kind == "quant":
            packed, scale, zero = payload[k:k + 3]
            entries.append(Entry.quantized(packed, scale, zero, c.bits, c.shape, c.dtype, c.codec))
            k += 3
        elif c.kind == "image":
            p = payload[k]
            if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 1:
                raise WireError(f"image crossing {c.name}: the end half returned "
                                f"{getattr(p, 'dtype', type(p).__name__)}, not a 1-D uint8 payload")
            entries.append(Entry.raw(p))
            k += 1
        else:
            entries.append(Entry.of_value(payload[k]))
            k += 1
    return entries


def entries_to_payload(boundary: Boundary, entries: Sequence[Entry],
                       accept_quantized: bool = False) -> tuple:
    """The cloud half's inputs from a message's entries, checked against ``boundary``.

    ``accept_quantized``: a float tensor the plan sends as is may come quantized with any bits
    the boundary ops handle (the online controller picks them per request); it is unpacked
    and dequantized here, before the cloud half runs.
    """
    if len(entries) != len(boundary.crossings):
        raise WireError(f"message has {len(entries)} entries; this plan's cut sends "
                        f"{len(boundary.crossings)}")
    out: list[Any] = []
    for c, e in zip(boundary.crossings, entries):
        if c.kind == "quant":
            if e.kind != QUANT or e.bits != c.bits or tuple(e.shape) != tuple(c.shape) or e.dtype != c.dtype:
                raise WireError(f"entry for {c.name}: expected {c.bits}-bit {c.dtype} of shape "
                                f"{tuple(c.shape)}, got {e.kind_name} {e.bits}-bit {e.dtype} {tuple(e.shape)}")
            # the shape is the plan's: it bounds what a coded entry may inflate to
            out += [e.packed(), *e.quant_params()]
        elif c.kind == "image":
            out.append(_image_payload(c, e))
        elif e.kind == QUANT:
            if not accept_quantized or c.shape is None or c.dtype not in _FLOATS:
                raise WireError(f"entry for {c.name}: quantized, but this plan sends it as is")
            out.append(_dequantized(c, e))
        else:
            v = e.value()
            if c.shape is not None and isinstance(v, torch.Tensor) and (
                    tuple(v.shape) != tuple(c.shape) or v.dtype != c.dtype):
                raise WireError(f"entry for {c.name}: expected {c.dtype} of shape {tuple(c.shape)}, "
                                f"got {v.dtype} {tuple(v.shape)}")
            out.append(v)
    return tuple(out)


def payload_to_floats(boundary: Boundary, payload: Sequence[Any]) -> tuple | None:
    """A checked cloud payload (``entries_to_payload``) with each quantized crossing unpacked
    and dequantized, exactly as the cloud half's own boundary ops do: the inputs of the half
    on floats (``CompiledModel.batched_cloud_module``); None where an image crossing would
    need decoding first."""
    out: list[Any] = []
    k = 0
    for c in boundary.crossings:
        if c.kind == "image":
            return None
        if c.kind == "quant":
            out.append(_dequantize(c, c.bits, *payload[k:k + 3]))
        else:
            out.append(payload[k])
        k += c.n_payload
    return tuple(out)


#: What a crossing without a tensor shape (an int, a float, a size) takes at most on the wire.
SMALL_VALUE_BYTES = 8 * MAX_RANK + TENSOR_HEADER_BYTES


def crossing_bytes(c: Crossing, bits: int | None = None) -> int:
    """Bytes on the wire (header included) of crossing ``c`` sent with ``bits`` (None: as its
    plan sends it: a quantized one at its bits, anything else as it is). A float tensor is
    packed below 32 bits; a value without a tensor shape counts at its largest. Image
    crossings vary per request: see :func:`max_request_bytes` for their bound."""
    if c.shape is None or c.dtype is None:
        return SMALL_VALUE_BYTES
    numel = math.prod(c.shape)
    if bits is None:
        bits = c.bits if c.kind == "quant" else 32
    return tensor_bytes(numel, numel * c.dtype.itemsize, c.dtype.is_floating_point, bits, token_rows(c.shape))


def max_request_bytes(boundary: Boundary) -> int:
    """The longest legal request for ``boundary``: every crossing at its largest form (a
    quantized one packed, an image at its codec's bound, a tensor sent as is at its dtype's
    size; per-request bits only make these smaller). A server refuses a longer length prefix
    before it reserves anything."""
    return message_bytes([max_payload_bytes(c.shape, c.codec) + TENSOR_HEADER_BYTES
                          if c.kind == "image" else crossing_bytes(c) for c in boundary.crossings])


def _image_payload(c: Any, e: Entry) -> torch.Tensor:
    """An image crossing's entry: a raw 1-D uint8 tensor within the codec's bound (the cloud
    half's decode op checks what is inside before decoding)."""
    if e.kind != RAW or e.dtype != torch.uint8 or len(e.shape) != 1:
        raise WireError(f"entry for image crossing {c.name} ({c.codec}): expected a raw 1-D uint8 "
                        f"payload, got {e.kind_name} {e.dtype} {tuple(e.shape)}")
    limit = max_payload_bytes(c.shape, c.codec)
    if e.shape[0] > limit:
        raise WireError(f"entry for image crossing {c.name} ({c.codec}): payload of {e.shape[0]} "
                        f"bytes exceeds the limit {limit} for shape {tuple(c.shape)}")
    return e.value()


def _dequantized(c: Any, e: Entry) -> torch.Tensor:
    if e.bits not in QUANT_BITS or tuple(e.shape) != tuple(c.shape) or e.dtype != c.dtype:
        raise WireError(f"entry for {c.name}: expected a quantized {c.dtype} of shape "
                        f"{tuple(c.shape)}, got {e.bits}-bit {e.dtype} {tuple(e.shape)}")
    return _dequantize(c, e.bits, e.packed(), *e.quant_params())


def _dequantize(c: Any, bits: int, packed: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor) -> torch.Tensor:
    """Crossing ``c``'s value from its packed codes, as the cloud half's boundary ops compute it."""
    return dequantize_impl(unpack_impl(packed, bits, list(c.shape)), scale, zero, bits, c.dtype)


def quantized_entry(value: torch.Tensor, bits: int, codec: str | None = None) -> Entry:
    """``value`` as a message entry with ``bits`` (32: as it is), through the boundary ops;
    ``codec`` ("deflate") codes the packed bytes where that shortens them."""
    value = value.detach()
    if bits >= 32 or not value.is_floating_point():
        return Entry.of_value(value)
    # the boundary ops' arithmetic without their per-op overhead (bit-exact with them): per
    # request the dispatcher and torch's small-op costs would outweigh the work
    packed, scale, zero = quantize_pack_cpu(value, bits)
    return Entry.quantized(packed, scale, zero, bits, tuple(value.shape), value.dtype, codec)


def output_to_entries(out: Any) -> tuple[list[Entry], Any]:
    leaves, spec = tree_flatten(out)
    return [Entry.of_value(v) for v in leaves], spec


def entries_to_output(entries: Sequence[Entry], spec: Any) -> Any:
    leaves = [e.value() for e in entries if e.kind != STATS]
    try:
        return tree_unflatten(leaves, spec)
    except Exception as e:  # noqa: BLE001
        raise WireError(f"result does not match the model's output structure: {e}") from None


__all__ = ["payload_to_entries", "entries_to_payload", "quantized_entry", "output_to_entries", "entries_to_output",
]
