"""The sizes of the wire format (the one home of them): its headers, its bit widths, what a
tensor takes packed at some bits, and which tensors are quantized per token.

The planner prices crossings with these, the controller sizes requests with them and the
decoder (``runtime.wire``) checks messages against them, so a plan's bytes are the bytes
that travel.

    >>> tensor_bytes(1000, 4000, True, 4) - TENSOR_HEADER_BYTES
    500
    >>> token_rows((2, 17, 64)), token_rows((2, 64, 7, 7))
    (34, 0)
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

class WireError(ValueError):
    """A message that is malformed, truncated, corrupted, too large or of another version (here,
    beside the sizes, so that the image codecs of ``passes`` raise the error ``runtime.wire``
    raises; ``coach_fx.runtime.wire.WireError`` is the same class)."""


#: message header: magic, version, flags, request id, plan id, entry count, crc32
MESSAGE_STRUCT = struct.Struct("<4sHHQHHI")
#: entry header: kind, dtype, bits, rank, shape, scale, zero point, byte count, codec
ENTRY_STRUCT = struct.Struct("<BBBB8IfiQI")
#: Bit widths a quantized entry may have (the boundary ops handle them); 32 = as it is.
QUANT_BITS = (2, 3, 4, 5, 6, 8, 16)
#: Every bit width a crossing tensor may get.
ALL_BITS = (*QUANT_BITS, 32)

#: A rank-3 float tensor (batch, tokens, features) with at least this many features is
#: quantized below 16 bits with a scale and zero point per token: one scale for the tensor
#: would cost small tokens all their precision (ViT's class token is ~100x smaller than the
#: patch tokens it is concatenated with). Feature maps (rank 4) and vectors keep one scale.
ROW_MIN_FEATURES = 32
#: Bytes of one row's quantization parameters on the wire: a float32 scale, a uint8 zero point.
ROW_PARAM_BYTES = 5

#: Fixed bytes of one message on the wire (magic, version, request id, count, flags, crc).
MESSAGE_HEADER_BYTES = MESSAGE_STRUCT.size
#: Fixed bytes per tensor on the wire (kind, dtype, bits, rank, shape, scale, zero point, length).
TENSOR_HEADER_BYTES = ENTRY_STRUCT.size

def packed_nbytes(numel: int, bits: int) -> int:
    """Payload bytes of ``numel`` values packed at ``bits`` (< 32) bits each."""
    return math.ceil(numel * bits / 8)


def row_quantized(shape: Sequence[int] | None, bits: int) -> bool:
    """Whether a tensor of ``shape`` sent at ``bits`` has a scale per row: below 16 bits, a
    (batch, tokens, features) tensor with ``ROW_MIN_FEATURES`` features or more has one per
    token; anything else one scale (shapes may be symbolic: this reads no batch size)."""
    return bits <= 8 and shape is not None and len(shape) == 3 and shape[-1] >= ROW_MIN_FEATURES


def token_rows(shape: Sequence[int] | None) -> int:
    """Rows of a tensor of ``shape`` that take a scale each below 16 bits (0: one scale)."""
    return int(shape[0]) * int(shape[1]) if row_quantized(shape, 8) else 0


def quant_rows(shape: Sequence[int] | None, bits: int) -> int:
    """Rows with a scale of their own when a tensor of ``shape`` is sent at ``bits``."""
    return token_rows(shape) if bits <= 8 else 0


def row_param_bytes(rows: int, bits: int) -> int:
    """Bytes of per-row scales and zero points of a tensor with ``rows`` token rows at ``bits``."""
    return rows * ROW_PARAM_BYTES if bits <= 8 else 0


def tensor_bytes(numel: int, raw_bytes: int, quantizable: bool, bits: int, rows: int = 0) -> int:
    """Bytes on the wire of one crossing tensor with its header: packed at ``bits`` when it is
    a float tensor (``quantizable``) and ``bits`` < 32, with its ``rows``' scales (``token_rows``),
    else its ``raw_bytes`` as they are."""
    if not quantizable or bits >= 32:
        return raw_bytes + TENSOR_HEADER_BYTES
    return packed_nbytes(numel, bits) + row_param_bytes(rows, bits) + TENSOR_HEADER_BYTES


def message_bytes(tensors: Sequence[int]) -> int:
    """Bytes on the wire of one message holding tensors of these ``tensor_bytes``."""
    return MESSAGE_HEADER_BYTES + sum(tensors)
