"""Image codecs for a model input that crosses the cut: what a deployed camera sends.

A float image batch ``(N, C, H, W)`` (or one image ``(C, H, W)``), C in (1, 3), travels as
JPEG (``"jpeg<q>"``, q in 1..100) or PNG (``"png"``, lossless). Each sample is first
quantized to 8 bits on its own, with the boundary ops' rule (``passes.ops``: scale and zero
point from that sample's min/max), exactly as one request is when deployed; its uint8 codes
``(C, H, W)`` are then coded with ``torchvision.io``. One crossing's payload is ONE 1-D uint8
tensor, the samples back to back, each::

    byte count u32 | scale f32 | zero point i32 | coded bytes (JPEG or PNG)    (little-endian)

The cloud side (:func:`decode`) checks everything before it decodes a pixel: the payload's
total length against :func:`max_payload_bytes`, every sample's length, the sample count
against the plan's batch size, scale and zero point, and the image header itself, read
without decoding (JPEG: the markers up to the frame header SOF0/1/2; PNG: signature and
IHDR), against the plan's (H, W, C). So a decompression bomb or a frame of another size is
refused before any allocation, and any problem raises
:class:`coach_fx.runtime.wire.WireError` naming the field.

The graphs call the ops ``coach::image_encode``, ``coach::image_decode`` and (training)
``coach::image_roundtrip``, whose gradient passes straight through; they are
``torch.library.custom_op`` wrappers of :func:`encode`, :func:`decode` and :func:`roundtrip`.

Example::

    >>> x = torch.rand(2, 3, 16, 16)
    >>> p = encode(x, "jpeg90"); p.dtype, p.dim()
    (torch.uint8, 1)
    >>> decode(p, "jpeg90", x.shape, x.dtype).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from coach_fx.passes.ops import dequantize_impl, quantize_pack_cpu, straight_through
from coach_fx.passes.wire_sizes import WireError

#: the codecs the planner offers for an image input (its search space)
CODECS_DEFAULT = ("jpeg95", "jpeg90", "jpeg75", "jpeg50", "png")

#: per sample: coded byte count u32, scale f32, zero point i32
SAMPLE_HEADER = struct.Struct("<Ifi")
BITS = 8
_NAME = re.compile(r"(jpeg)(\d{1,3})|(png)")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR = {1: 0, 3: 2}          # channels -> PNG color type (grayscale, truecolor)
_JPEG_SOF = (0xC0, 0xC1, 0xC2)     # baseline, extended sequential, progressive (Huffman)
_JPEG_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


@dataclass(frozen=True)
class ImageCodec:
    """A parsed codec name: ``kind`` "jpeg" (with ``quality`` 1..100) or "png"."""

    kind: str
    quality: int | None = None

    @property
    def name(self) -> str:
        return f"jpeg{self.quality}" if self.kind == "jpeg" else "png"


def parse(name: str | ImageCodec) -> ImageCodec:
    """``"jpeg<q>"`` (q in 1..100) or ``"png"`` -> :class:`ImageCodec`; ValueError otherwise."""
    if isinstance(name, ImageCodec):
        return name
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None or (m.group(1) and not 1 <= int(m.group(2)) <= 100) or \
            (m.group(2) is not None and m.group(2) != str(int(m.group(2)))):
        raise ValueError(f"unknown image codec {name!r}: expected 'jpeg<q>' with q in 1..100 "
                         "(e.g. 'jpeg90') or 'png'")
    return ImageCodec("jpeg", int(m.group(2))) if m.group(1) else ImageCodec("png")


def applicable(shape: Sequence[int] | None, dtype: torch.dtype | None) -> bool:
    """Whether a value of ``shape`` and ``dtype`` can travel as images: a float tensor
    (N, C, H, W) or (C, H, W) with C in (1, 3) and non-empty sides."""
    if shape is None or dtype not in _FLOATS or len(shape) not in (3, 4):
        return False
    c, h, w = shape[-3:]
    return c in (1, 3) and h > 0 and w > 0 and (len(shape) == 3 or shape[0] > 0)


def _chw_n(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(samples, C, H, W) of an applicable shape."""
    shape = tuple(int(s) for s in shape)
    if not applicable(shape, torch.float32):
        raise ValueError(f"image codecs send float (N, C, H, W) or (C, H, W) tensors with C in "
                         f"(1, 3); got shape {shape}")
    n = shape[0] if len(shape) == 4 else 1
    return (n, *shape[-3:])


def max_payload_bytes(shape: Sequence[int], codec: str | ImageCodec) -> int:
    """The largest payload the cloud accepts for ``shape``: per sample its header, twice the
    raw 8-bit size and 1 KiB (JPEG tables, PNG chunks); no honest encoder comes near it."""
    parse(codec)
    n, c, h, w = _chw_n(shape)
    return n * (SAMPLE_HEADER.size + 2 * c * h * w + 1024)


# ------------------------------------------------------------------------------ encode
def _samples(x: Tensor) -> list[Tensor]:
    return [x] if x.dim() == 3 else list(x.unbind(0))


def _encode_sample(s: Tensor, codec: ImageCodec) -> bytes:
    import torchvision.io as tio

    # the boundary ops' 8-bit rule (bit-exact with coach::quantize), this sample on its own
    # with one scale (as a batch of one: a lone (C, H, W) sample is no token tensor)
    flat, scale, zero = quantize_pack_cpu(s.detach().cpu().unsqueeze(0), BITS)
    codes = flat.reshape(s.shape)
    with warnings.catch_warnings():   # torchvision 0.29 points at TorchCodec, not installed here
        warnings.simplefilter("ignore", DeprecationWarning)
        data = tio.encode_jpeg(codes, quality=codec.quality) if codec.kind == "jpeg" else tio.encode_png(codes)
    return SAMPLE_HEADER.pack(data.numel(), float(scale), int(zero)) + data.numpy().tobytes()


def encode(x: Tensor, codec: str | ImageCodec) -> Tensor:
    """The payload of image batch ``x`` (N, C, H, W) or (C, H, W): one 1-D uint8 tensor."""
    codec = parse(codec)
    if not applicable(tuple(x.shape), x.dtype):
        raise ValueError(f"image codecs send float (N, C, H, W) or (C, H, W) tensors with C in "
                         f"(1, 3); got {x.dtype} of shape {tuple(x.shape)}")
    out = b"".join(_encode_sample(s, codec) for s in _samples(x))
    limit = max_payload_bytes(tuple(x.shape), codec)
    if len(out) > limit:   # cannot happen with torchvision's coders; the cloud would refuse it
        raise ValueError(f"{codec.name} payload of {len(out)} bytes exceeds the bound {limit}")
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)


# ------------------------------------------------------------------------------ header checks
def jpeg_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(height, width, components) from a JPEG's frame header, without decoding: walks the
    markers from SOI to the first SOF0/SOF1/SOF2. WireError if there is none or it is odd."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise WireError("JPEG: no start-of-image marker (not a JPEG)")
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            raise WireError(f"JPEG: expected a marker at byte {pos}, found {data[pos]:#04x}")
        while pos < n and data[pos] == 0xFF:   # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # standalone markers
            continue
        if marker in (0xD9, 0xDA):
            raise WireError("JPEG: no frame header (SOF) before the scan")
        if pos + 2 > n:
            break
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            raise WireError(f"JPEG: marker {marker:#04x} segment length {length} runs past the data")
        if marker in _JPEG_SOF:
            if length < 8:
                raise WireError(f"JPEG: frame header length {length} too short")
            precision, height, width, comps = struct.unpack_from(">BHHB", data, pos + 2)
            if precision != 8:
                raise WireError(f"JPEG: sample precision {precision}; only 8 bits")
            return height, width, comps
        if marker in _JPEG_OTHER_SOF:
            raise WireError(f"JPEG: unsupported coding process (SOF marker {marker:#04x})")
        pos += length
    raise WireError("JPEG: truncated before its frame header (SOF)")


def png_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's signature and IHDR, without decoding (8-bit
    grayscale or truecolor, not interlaced only). WireError otherwise."""
    if len(data) < 33 or bytes(data[:8]) != _PNG_SIGNATURE:
        raise WireError("PNG: bad signature (not a PNG)")
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise WireError("PNG: first chunk is not a 13-byte IHDR")
    width, height, depth, color, comp, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(bytes(data[12:29])) != crc:
        raise WireError("PNG: IHDR crc mismatch")
    if depth != 8:
        raise WireError(f"PNG: bit depth {depth}; only 8")
    if color not in _PNG_COLOR.values():
        raise WireError(f"PNG: color type {color}; only 0 (grayscale) or 2 (truecolor)")
    if comp or filt or interlace:
        raise WireError("PNG: compression, filter or interlace method is not the standard 0")
    return height, width, 1 if color == 0 else 3


# ------------------------------------------------------------------------------ decode
def decode(payload: Tensor, codec: str | ImageCodec, shape: Sequence[int],
           dtype: torch.dtype) -> Tensor:
    """The image batch of ``shape`` and ``dtype`` a payload carries, validated first (see the
    module's docstring); any problem raises :class:`WireError` naming it."""
    codec = parse(codec)
    shape = tuple(int(s) for s in shape)
    try:
        n, c, h, w = _chw_n(shape)
    except ValueError as e:
        raise WireError(str(e)) from None
    if not isinstance(payload, Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise WireError(f"{codec.name} payload: expected a 1-D uint8 tensor, got "
                        f"{getattr(payload, 'dtype', type(payload).__name__)} "
                        f"{tuple(getattr(payload, 'shape', ()))}")
    total = payload.numel()
    limit = max_payload_bytes(shape, codec)
    if total > limit:
        raise WireError(f"{codec.name} payload length {total} bytes exceeds the limit {limit} "
                        f"for shape {shape}")
    if total < n * SAMPLE_HEADER.size:
        raise WireError(f"{codec.name} payload length {total} bytes is too short for {n} "
                        "sample header(s)")
    buf = memoryview(payload.contiguous().numpy()).cast("B")
    header = jpeg_header if codec.kind == "jpeg" else png_header
    spans = []
    pos = 0
    for i in range(n):
        if pos + SAMPLE_HEADER.size > total:
            raise WireError(f"{codec.name} payload: sample count {i}, the plan expects {n} "
                            "(truncated payload)")
        length, scale, zero = SAMPLE_HEADER.unpack_from(buf, pos)
        pos += SAMPLE_HEADER.size
        if length == 0 or pos + length > total:
            raise WireError(f"{codec.name} payload: sample {i} length {length} runs past the "
                            f"payload's {total} bytes (truncated payload)")
        if not math.isfinite(scale) or scale <= 0:
            raise WireError(f"{codec.name} payload: sample {i} scale {scale} is not finite and > 0")
        if not 0 <= zero < (1 << BITS):
            raise WireError(f"{codec.name} payload: sample {i} zero point {zero} out of 0..255")
        try:
            got = header(buf[pos:pos + length])
        except WireError as e:
            raise WireError(f"{codec.name} payload: sample {i} header: {e}") from None
        if got != (h, w, c):
            raise WireError(f"{codec.name} payload: sample {i} image size {got[0]}x{got[1]} "
                            f"(height x width) with {got[2]} channel(s); the plan expects "
                            f"{h}x{w} with {c}")
        spans.append((pos, length, scale, zero))
        pos += length
    if pos != total:
        raise WireError(f"{codec.name} payload: {total - pos} bytes after sample count {n}: "
                        "holds more than the plan's samples")
    import torchvision.io as tio

    mode = tio.ImageReadMode.GRAY if c == 1 else tio.ImageReadMode.RGB
    out = []
    for i, (pos, length, scale, zero) in enumerate(spans):
        data = payload[pos:pos + length]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                codes = tio.decode_jpeg(data, mode=mode) if codec.kind == "jpeg" else tio.decode_png(data, mode=mode)
        except Exception as e:  # noqa: BLE001 - a corrupt image fails only its request
            raise WireError(f"{codec.name} payload: sample {i} does not decode: {e}") from None
        if tuple(codes.shape) != (c, h, w) or codes.dtype != torch.uint8:
            raise WireError(f"{codec.name} payload: sample {i} decoded to {codes.dtype} "
                            f"{tuple(codes.shape)}; the plan expects uint8 {(c, h, w)}")
        out.append(dequantize_impl(codes, torch.tensor(scale, dtype=torch.float32),
                                   torch.tensor(zero, dtype=torch.int32), BITS, dtype))
    return torch.stack(out) if len(shape) == 4 else out[0]


def roundtrip(x: Tensor, codec: str | ImageCodec) -> Tensor:
    """What the cloud sees of ``x`` sent with ``codec``: ``decode(encode(x))`` (the same
    numerics as deployment; for the accuracy oracle), on ``x``'s device."""
    return decode(encode(x, codec), codec, tuple(x.shape), x.dtype).to(x.device)



# ------------------------------------------------------------------------------ graph ops
@torch.library.custom_op("coach::image_encode", mutates_args=())
def image_encode(x: Tensor, codec: str) -> Tensor:
    """``encode`` as an op: the image payload (1-D uint8, data-dependent length)."""
    return encode(x, codec)


@image_encode.register_fake
def _(x: Tensor, codec: str) -> Tensor:
    return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


@torch.library.custom_op("coach::image_decode", mutates_args=())
def image_decode(payload: Tensor, codec: str, shape: list[int], dtype: torch.dtype) -> Tensor:
    """``decode`` as an op (validates the payload, raises WireError)."""
    return decode(payload, codec, shape, dtype)


@image_decode.register_fake
def _(payload: Tensor, codec: str, shape: list[int], dtype: torch.dtype) -> Tensor:
    return payload.new_empty(shape, dtype=dtype)


@torch.library.custom_op("coach::image_roundtrip", mutates_args=())
def image_roundtrip(x: Tensor, codec: str) -> Tensor:
    """``roundtrip`` as an op; its gradient passes straight through (for training)."""
    return roundtrip(x.detach(), codec)


straight_through(image_roundtrip)


__all__ = ["CODECS_DEFAULT", "SAMPLE_HEADER", "ImageCodec", "parse", "applicable",
           "max_payload_bytes", "encode", "decode", "roundtrip", "jpeg_header",
           "png_header", "image_encode", "image_decode", "image_roundtrip"]
