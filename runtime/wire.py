"""The binary message format between end and cloud, and its validating decoder.

Little-endian. A message is a 24-byte header, then one 56-byte header per entry, then the
entries' bytes back to back::

    message: magic b"COCH" | version u16 | flags u16 | request id u64 | plan id u16 |
             entry count u16 | crc32 u32 (of everything after the message header)
    entry:   kind u8 | dtype u8 | bits u8 | rank u8 | shape 8 x u32 | scale f32 |
             zero point i32 | byte count u64 | codec u32

Entry kinds: a quantized tensor (``bits`` <= 16: ``ceil(numel*bits/8)`` packed bytes, with the
dtype it dequantizes to; a token tensor, :func:`quant_rows`, has a scale and zero point per
row: its bytes start with the rows' float32 scales and uint8 zero points, and the header's
scale is 1, its zero point 0), a raw tensor, or a small Python value (int, float, bool, None, a
size / tuple of ints), so everything that crosses a cut can travel. A quantized tensor's
packed bytes may travel entropy coded (``codec`` 1, :data:`TENSOR_CODECS`: zlib's deflate),
then strictly shorter than packed; they are inflated only by :meth:`Entry.packed`, bounded by
the packed size its shape and bits give (no decompression bomb), after the receiver has
checked that shape against its plan. No Python object is ever
rebuilt from received bytes (no object serialization, no torch loader): the decoder checks
every field against :data:`LIMITS` before it allocates, and any problem raises
:class:`WireError` (and only that).

Example::

    >>> msg = encode(7, [Entry.raw(torch.ones(3))])
    >>> req, plan, flags, entries = decode(msg)
    >>> entries[0].value()
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from coach_fx.passes.packed_codec import CODEC_NAMES, TENSOR_CODECS, CodecError, deflate, inflate
from coach_fx.passes.wire_sizes import (WireError, ENTRY_STRUCT, MESSAGE_STRUCT, QUANT_BITS, ROW_PARAM_BYTES,
                                         packed_nbytes, quant_rows)


MAGIC = b"COCH"
#: 2: token tensors carry a scale and zero point per row (``quant_rows``)
VERSION = 2
MAX_RANK = 8


# message flags
FLAG_RESULT = 1       # cloud -> end: the model's output
FLAG_ERROR = 2        # cloud -> end: the request failed; one entry holds the message (uint8)
FLAG_CACHE_HIT = 4    # answered from the semantic cache (audit copy)
FLAG_CONTROL = 8      # control traffic (handshake, close)

#: The request id of a close message (with ``FLAG_CONTROL``) and of its acknowledgement.
CLOSE_ID = (1 << 64) - 1

# entry kinds
QUANT, RAW, INT, FLOAT, BOOL, NONE, SIZE, INTS, STATS = range(9)
_KIND_NAMES = {QUANT: "quant", RAW: "raw", INT: "int", FLOAT: "float", BOOL: "bool",
               NONE: "none", SIZE: "size", INTS: "ints", STATS: "stats"}

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
           torch.int16, torch.int32, torch.int64, torch.bool]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_FLOATS = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


@dataclass(frozen=True)
class Limits:
    """What the decoder accepts; a field outside these is rejected before any allocation."""

    max_entries: int = 256
    max_elements: int = 1 << 28            # per tensor
    max_message_bytes: int = 1 << 30       # 1 GiB
    max_dim: int = 1 << 31


LIMITS = Limits()


@dataclass
class Entry:
    """One decoded (or to-be-encoded) entry."""

    kind: int
    dtype: torch.dtype = torch.float32
    bits: int = 32
    shape: tuple[int, ...] = ()
    #: a token tensor (``quant_rows``): its rows' scales (float32) and zero points (uint8)
    scale: float | torch.Tensor = 1.0
    zero_point: int | torch.Tensor = 0
    data: Any = None   # torch.uint8 tensor of the bytes, or the Python value
    codec: int = 0     # a quantized entry's codec (``TENSOR_CODECS``; 0: packed as is)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def quantized(cls, packed: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int,
                  bits: int, shape: Sequence[int], dtype: torch.dtype, codec: str | None = None) -> "Entry":
        """A quantized tensor's entry; ``codec`` ("deflate") codes its packed bytes where that
        makes them shorter (else they go as they are). A token tensor (``quant_rows``) takes
        one scale and zero point per row, as ``coach::quantize`` gives them."""
        shape = tuple(int(s) for s in shape)
        rows = quant_rows(shape, bits)
        if rows:
            scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).contiguous()
            zero_point = torch.as_tensor(zero_point).reshape(-1).to(torch.uint8).contiguous()
            if scale.numel() != rows or zero_point.numel() != rows:
                raise WireError(f"a {bits}-bit tensor of shape {shape} takes {rows} row scales and "
                                f"zero points; got {scale.numel()} and {zero_point.numel()}")
        else:
            scale, zero_point = float(scale), int(zero_point)
        data = packed.reshape(-1).contiguous().view(torch.uint8)
        code = 0
        if codec is not None:
            if codec not in TENSOR_CODECS:
                raise WireError(f"unknown tensor codec {codec!r} (known: {sorted(TENSOR_CODECS)})")
            coded = deflate(data)
            if coded is not None:
                data, code = coded, TENSOR_CODECS[codec]
        return cls(QUANT, dtype, bits, shape, scale, zero_point, data, code)

    @classmethod
    def raw(cls, t: torch.Tensor) -> "Entry":
        t = t.detach().contiguous()
        if t.dtype not in _CODE:
            raise WireError(f"cannot send tensors of dtype {t.dtype}")
        return cls(RAW, t.dtype, 32, tuple(t.shape), data=t.reshape(-1).view(torch.uint8)
                   if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8))

    @classmethod
    def of_value(cls, v: Any) -> "Entry":
        if isinstance(v, torch.Tensor):
            return cls.raw(v)
        if v is None:
            return cls(NONE)
        if isinstance(v, bool):
            return cls(BOOL, data=v)
        if isinstance(v, int):
            return cls(INT, data=v)
        if isinstance(v, float):
            return cls(FLOAT, data=v)
        if isinstance(v, (torch.Size, tuple, list)) and all(isinstance(i, int) for i in v):
            if len(v) > MAX_RANK * 64:
                raise WireError("tuple of ints too long")
            kind = SIZE if isinstance(v, torch.Size) else INTS
            return cls(kind, data=tuple(int(i) for i in v))
        raise WireError(f"cannot send a value of type {type(v).__name__}")

    @classmethod
    def stats(cls, values: Sequence[float]) -> "Entry":
        return cls(STATS, torch.float64, 32, (len(values),),
                   data=torch.tensor(list(values), dtype=torch.float64).view(torch.uint8))

    # ---------------------------------------------------------------- views
    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]

    @property
    def codec_name(self) -> str | None:
        return CODEC_NAMES[self.codec]

    def packed(self) -> torch.Tensor:
        """A quantized entry's packed codes (uint8), inflated if coded: never more than the
        ``ceil(numel * bits / 8)`` bytes its shape and bits give, and exactly that many, or
        :class:`WireError`. Check the shape against the plan first: it bounds the work."""
        if self.kind != QUANT:
            raise WireError(f"a {self.kind_name} entry has no packed codes")
        if not self.codec:
            return self.data
        try:
            return inflate(self.data, packed_nbytes(math.prod(self.shape), self.bits))
        except CodecError as e:
            raise WireError(str(e)) from None

    def quant_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantized entry's (scale, zero point) as ``coach::dequantize`` takes them: 0-d for a
        tensor with one scale, one per row (shape ``shape[:-1] + (1,)``) for a token tensor."""
        if self.kind != QUANT:
            raise WireError(f"a {self.kind_name} entry has no quantization parameters")
        if not isinstance(self.scale, torch.Tensor):
            return (torch.tensor(self.scale, dtype=torch.float32),
                    torch.tensor(self.zero_point, dtype=torch.int32))
        rows = (*self.shape[:-1], 1)
        return self.scale.reshape(rows), self.zero_point.to(torch.int32).reshape(rows)

    def value(self) -> Any:
        """The tensor or Python value this entry carries (quantized entries: the packed bytes)."""
        if self.kind in (RAW, STATS):
            if self.dtype == torch.bool:
                return self.data.to(torch.bool).reshape(self.shape)
            return self.data.view(self.dtype).reshape(self.shape)
        if self.kind == QUANT:
            return self.packed()
        if self.kind == NONE:
            return None
        if self.kind == SIZE:
            return torch.Size(self.data)
        return self.data


@dataclass(frozen=True)
class ReplyStats:
    """What a reply tells the end beside the model's output, in one stats entry: the cloud's
    compute seconds for the request, the request's bytes, its seconds on the wire as the cloud
    saw it arrive (0: it told nothing), when it arrived on the cloud's clock, and the ends that
    shared the cloud then. ``lower_bound`` is the end's own note (never sent): the end's
    sampler made ``wire_s`` a lower bound of the time the link would need (``runtime.controller``).

    Encoded (:meth:`entry`) and decoded (:meth:`of`) here only: every hop reads the fields by
    name."""

    cloud_s: float = 0.0
    request_bytes: float = 0.0
    wire_s: float = 0.0
    arrival_s: float = 0.0
    ends: float = 1.0
    lower_bound: bool = False

    #: the figures on the wire, in this order
    FIELDS = ("cloud_s", "request_bytes", "wire_s", "arrival_s", "ends")

    def entry(self) -> "Entry":
        return Entry.stats([float(getattr(self, f)) for f in self.FIELDS])

    @classmethod
    def of(cls, entries: Sequence["Entry"]) -> "ReplyStats | None":
        """The stats entry of a reply's entries (None where it has none); a shorter one (an
        older cloud) leaves the later figures at their defaults."""
        for e in entries:
            if e.kind == STATS:
                values = e.value().tolist()
                return cls(**dict(zip(cls.FIELDS, (float(v) for v in values))))
        return None


def _payload_parts(e: Entry) -> list[memoryview]:
    """An entry's payload, in parts copied once each into the message."""
    if e.kind == QUANT and isinstance(e.scale, torch.Tensor):   # a token tensor's rows lead
        return [memoryview(t.numpy()).cast("B") for t in (e.scale, e.zero_point, e.data)]
    if e.kind in (QUANT, RAW, STATS):
        return [memoryview(e.data.numpy()).cast("B")]
    scalar = {INT: "<q", FLOAT: "<d", BOOL: "<?"}.get(e.kind)
    if scalar is not None:
        return [memoryview(struct.pack(scalar, e.data))]
    if e.kind in (SIZE, INTS):
        return [memoryview(struct.pack(f"<{len(e.data)}q", *e.data))]
    return []


def _expected_nbytes(kind: int, dtype: torch.dtype, bits: int, shape: tuple[int, ...], nbytes: int,
                     codec: int = 0) -> int:
    numel = math.prod(shape)
    if kind == QUANT:
        params = quant_rows(shape, bits) * ROW_PARAM_BYTES
        packed = packed_nbytes(numel, bits)
        # coded: any length short of the packed one (a longer code would have gone uncoded)
        if codec:
            return nbytes if 0 < nbytes - params < packed else -1
        return params + packed
    if kind in (RAW, STATS):
        return numel * (1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size())
    if kind in (INT, FLOAT):
        return 8
    if kind == BOOL:
        return 1
    if kind == NONE:
        return 0
    return nbytes if nbytes % 8 == 0 else -1   # SIZE / INTS: 8 bytes per int


def encode(request_id: int, entries: Sequence[Entry], flags: int = 0, plan_id: int = 0) -> bytearray:
    """One message (a bytearray: the receiver's tensors can share its memory)."""
    if len(entries) > LIMITS.max_entries:
        raise WireError(f"{len(entries)} entries; at most {LIMITS.max_entries}")
    bodies = [_payload_parts(e) for e in entries]
    sizes = [sum(b.nbytes for b in parts) for parts in bodies]
    buf = bytearray(MESSAGE_STRUCT.size + ENTRY_STRUCT.size * len(entries) + sum(sizes))
    pos = MESSAGE_STRUCT.size
    for e, n in zip(entries, sizes):
        shape = tuple(e.shape) if e.kind in (QUANT, RAW, STATS) else ()
        if len(shape) > MAX_RANK:
            raise WireError(f"tensor of rank {len(shape)}; at most {MAX_RANK}")
        dims = list(shape) + [0] * (MAX_RANK - len(shape))
        rows = isinstance(e.scale, torch.Tensor)   # a token tensor: 1 and 0 in the header
        ENTRY_STRUCT.pack_into(buf, pos, e.kind, _CODE.get(e.dtype, 0), e.bits, len(shape), *dims,
                               1.0 if rows else e.scale, 0 if rows else e.zero_point, n, e.codec)
        pos += ENTRY_STRUCT.size
    view = memoryview(buf)
    for parts in bodies:   # one copy of each payload, straight into the message
        for b in parts:
            view[pos:pos + b.nbytes] = b
            pos += b.nbytes
    crc = zlib.crc32(view[MESSAGE_STRUCT.size:])
    MESSAGE_STRUCT.pack_into(buf, 0, MAGIC, VERSION, flags, request_id, plan_id, len(entries), crc)
    return buf


def peek_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(request id, plan id, flags, entry count) of a message, checking magic and version."""
    if len(buf) < MESSAGE_STRUCT.size:
        raise WireError(f"message of {len(buf)} bytes is shorter than its {MESSAGE_STRUCT.size}-byte header")
    magic, version, flags, req, plan, count, _ = MESSAGE_STRUCT.unpack_from(buf, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not a coach_fx message")
    if version != VERSION:
        raise WireError(f"message format version {version}; this side speaks version {VERSION} "
                        "(upgrade the older side)")
    if count > LIMITS.max_entries:
        raise WireError(f"{count} entries; at most {LIMITS.max_entries}")
    return req, plan, flags, count


def decode(buf: bytes | bytearray | memoryview, limits: Limits = LIMITS) -> tuple[int, int, int, list[Entry]]:
    """(request id, plan id, flags, entries) of a message; raises :class:`WireError` only."""
    try:
        return _decode(buf, limits)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - any slip in a hostile message is a WireError
        raise WireError(f"malformed message: {type(e).__name__}: {e}") from None


def _decode(buf: bytes | bytearray | memoryview, limits: Limits) -> tuple[int, int, int, list[Entry]]:
    if len(buf) > limits.max_message_bytes:
        raise WireError(f"message of {len(buf)} bytes exceeds the limit of {limits.max_message_bytes}")
    req, plan, flags, count = peek_header(buf)
    crc = MESSAGE_STRUCT.unpack_from(buf, 0)[6]
    view = memoryview(buf)
    if zlib.crc32(view[MESSAGE_STRUCT.size:]) != crc:
        raise WireError("checksum mismatch: the message was corrupted or truncated")
    pos = MESSAGE_STRUCT.size
    heads = []
    total = 0
    for i in range(count):
        if pos + ENTRY_STRUCT.size > len(buf):
            raise WireError(f"truncated: entry header {i} of {count} is missing")
        kind, code, bits, rank, *rest = ENTRY_STRUCT.unpack_from(buf, pos)
        dims, (scale, zero, nbytes, codec) = rest[:MAX_RANK], rest[MAX_RANK:]
        pos += ENTRY_STRUCT.size
        if kind not in _KIND_NAMES:
            raise WireError(f"entry {i}: unknown kind {kind}")
        if code >= len(_DTYPES):
            raise WireError(f"entry {i}: unknown dtype code {code}")
        if rank > MAX_RANK:
            raise WireError(f"entry {i}: rank {rank} > {MAX_RANK}")
        shape = tuple(dims[:rank])
        if any(d > limits.max_dim for d in shape) or any(dims[rank:]):
            raise WireError(f"entry {i}: bad shape {dims}")
        numel = math.prod(shape)
        if numel > limits.max_elements:
            raise WireError(f"entry {i}: {numel} elements exceed the limit of {limits.max_elements}")
        dtype = _DTYPES[code]
        if kind == QUANT:
            if bits not in QUANT_BITS:
                raise WireError(f"entry {i}: quantized with {bits} bits")
            if dtype not in _FLOATS:
                raise WireError(f"entry {i}: quantized entry of non-float dtype {dtype}")
            if quant_rows(shape, bits) and (scale != 1.0 or zero != 0):
                raise WireError(f"entry {i}: a token tensor's header scale and zero point are 1 and 0 "
                                f"(its rows carry their own); got {scale} and {zero}")
            _check_quant_params(i, scale, scale, zero, zero, bits, dtype)
        if codec not in CODEC_NAMES or (codec and kind != QUANT):
            raise WireError(f"entry {i}: unknown codec {codec} for a {_KIND_NAMES[kind]} entry")
        if kind in (SIZE, INTS) and nbytes > 8 * MAX_RANK * 64:
            raise WireError(f"entry {i}: tuple of ints too long")
        want = _expected_nbytes(kind, dtype, bits, shape, nbytes, codec)
        if nbytes != want:
            expected = (f"fewer than the {packed_nbytes(numel, bits)} packed" if codec and kind == QUANT
                        else f"{want}")
            raise WireError(f"entry {i}: {nbytes} bytes, expected {expected} for its shape and bits")
        total += nbytes
        heads.append((kind, dtype, bits, shape, scale, zero, nbytes, codec))
    if pos + total != len(buf):
        raise WireError(f"message has {len(buf) - pos} payload bytes; its headers announce {total}")
    entries = []
    for kind, dtype, bits, shape, scale, zero, nbytes, codec in heads:
        chunk = view[pos:pos + nbytes]
        pos += nbytes
        if kind == QUANT and quant_rows(shape, bits):
            rows = quant_rows(shape, bits)
            row_scales = torch.frombuffer(bytearray(chunk[:4 * rows]), dtype=torch.float32)
            row_zeros = torch.frombuffer(bytearray(chunk[4 * rows:ROW_PARAM_BYTES * rows]), dtype=torch.uint8)
            # NaN propagates through min and max: a bad row shows in the bounds
            _check_quant_params(len(entries), row_scales.min().item(), row_scales.max().item(),
                                int(row_zeros.min()), int(row_zeros.max()), bits, dtype)
            data = _bytes_tensor(chunk[ROW_PARAM_BYTES * rows:], pos - nbytes + ROW_PARAM_BYTES * rows)
            entries.append(Entry(kind, dtype, bits, shape, row_scales, row_zeros, data, codec))
        elif kind in (QUANT, RAW, STATS):
            entries.append(Entry(kind, dtype, bits, shape, scale, zero, _bytes_tensor(chunk, pos - nbytes), codec))
        elif kind == INT:
            entries.append(Entry(INT, data=struct.unpack("<q", chunk)[0]))
        elif kind == FLOAT:
            entries.append(Entry(FLOAT, data=struct.unpack("<d", chunk)[0]))
        elif kind == BOOL:
            entries.append(Entry(BOOL, data=bool(chunk[0])))
        elif kind == NONE:
            entries.append(Entry(NONE))
        else:
            entries.append(Entry(kind, data=struct.unpack(f"<{nbytes // 8}q", chunk)))
    return req, plan, flags, entries


def _bytes_tensor(chunk: memoryview, offset: int) -> torch.Tensor:
    """A payload's bytes as a uint8 tensor: sharing a writable buffer's memory where aligned
    for any dtype, copied out of a read-only one."""
    if not len(chunk):
        return torch.empty(0, dtype=torch.uint8)
    share = not chunk.readonly and offset % 8 == 0
    return torch.frombuffer(chunk if share else bytearray(chunk), dtype=torch.uint8)


def _check_quant_params(i: int, lo: float, hi: float, zero_lo: int, zero_hi: int, bits: int,
                        dtype: torch.dtype) -> None:
    """An entry's scales (bounds ``lo``..``hi``) finite and positive, the largest code times the
    largest scale finite in the dtype it dequantizes to (a finite 3e38 would turn every value
    into inf or NaN), its zero points (``zero_lo``..``zero_hi``) codes. Plain floats: the cloud
    checks every request's entries."""
    for v in (lo, hi):
        if not math.isfinite(v) or v <= 0:
            raise WireError(f"entry {i}: bad scale {v}")
    if hi * ((1 << bits) - 1) > torch.finfo(dtype).max:
        raise WireError(f"entry {i}: scale {hi:g} overflows dtype {dtype} at {bits} bits")
    for z in (zero_lo, zero_hi):
        if not 0 <= z < (1 << min(bits, 16)):
            raise WireError(f"entry {i}: zero point {z} out of range for {bits} bits")
