"""Image codecs for a crossing model input: numerics, measured sizes, and the cloud's checks."""

import math
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F

from coach_fx.passes.ops import fake_quantize_per_sample, roundtrip as op_roundtrip
from coach_fx.passes import imagecodec as ic
from coach_fx.profile import measure_codec
from coach_fx.runtime.wire import WireError

H = ic.SAMPLE_HEADER.size


def smooth(n=2, c=3, h=16, w=16):
    """Camera-like frames (smooth), where JPEG's quality setting matters."""
    return F.interpolate(torch.rand(n, c, 4, 4), size=(h, w), mode="bilinear", align_corners=False)


def test_parse_and_applicable():
    assert ic.parse("jpeg90") == ic.ImageCodec("jpeg", 90)
    assert ic.parse("png") == ic.ImageCodec("png")
    assert ic.parse("jpeg1").name == "jpeg1" and ic.parse("jpeg100").quality == 100
    assert all(ic.parse(c).name == c for c in ic.CODECS_DEFAULT)
    for bad in ("jpeg0", "jpeg101", "jpeg", "jpeg090", "webp", "PNG", "", "jpeg9x"):
        with pytest.raises(ValueError, match=r"jpeg<q>.*png"):
            ic.parse(bad)
    assert ic.applicable((2, 3, 16, 16), torch.float32)
    assert ic.applicable((1, 1, 8, 8), torch.float16)
    assert ic.applicable((3, 16, 16), torch.float32)
    assert not ic.applicable((2, 4, 16, 16), torch.float32)     # 4 channels
    assert not ic.applicable((2, 3, 16, 16), torch.int64)
    assert not ic.applicable((2, 3), torch.float32)
    assert not ic.applicable(None, None)
    with pytest.raises(ValueError, match="C in"):
        ic.encode(torch.rand(2, 4, 8, 8), "png")


def test_png_is_exactly_the_per_sample_8bit_quantization():
    x = torch.rand(3, 3, 16, 16) * 4 - 1
    x[1] *= 10                                    # samples of very different ranges
    y = ic.roundtrip(x, "png")
    assert torch.equal(y, fake_quantize_per_sample(x, 8))
    assert torch.equal(y, torch.cat([op_roundtrip(x[i:i + 1], 8) for i in range(3)]))
    # one image (C, H, W) and grayscale
    g = torch.rand(1, 12, 20)
    assert torch.equal(ic.roundtrip(g, "png"), op_roundtrip(g, 8))
    assert ic.roundtrip(torch.rand(2, 1, 9, 7), "jpeg90").shape == (2, 1, 9, 7)


def test_jpeg_is_close_and_lower_quality_is_worse():
    x = smooth(4, 3, 32, 32)
    err = {c: (ic.roundtrip(x, c) - x).abs().mean().item() for c in ("jpeg90", "jpeg50")}
    assert err["jpeg90"] < 0.02
    assert err["jpeg50"] > err["jpeg90"]
    assert len(ic.encode(x, "jpeg50")) < len(ic.encode(x, "jpeg90"))
    # the same numerics as deployment: decode(encode(x))
    assert torch.equal(ic.roundtrip(x, "jpeg75"), ic.decode(ic.encode(x, "jpeg75"), "jpeg75", x.shape, x.dtype))


def test_payload_layout():
    x = smooth(2)
    p = ic.encode(x, "jpeg90")
    assert p.dtype == torch.uint8 and p.dim() == 1
    pos = 0
    for i in range(2):
        length, scale, zero = ic.SAMPLE_HEADER.unpack_from(p.numpy().tobytes(), pos)
        data = bytes(p[pos + H:pos + H + length].tolist())
        assert data[:2] == b"\xff\xd8" and ic.jpeg_header(data) == (16, 16, 3)
        assert math.isclose(scale, (x[i].max() - 0).item() / 255, rel_tol=1e-5)   # min >= 0
        assert zero == 0
        pos += H + length
    assert pos == len(p)


def test_measure_sizes_are_the_real_payload_sizes():
    x = smooth(5, 3, 24, 24)
    for codec in ("jpeg90", "png"):
        m = measure_codec(x, codec, repeat=2)
        assert m.sizes == tuple(len(ic.encode(x[i:i + 1], codec)) for i in range(5))
        assert sum(m.sizes) == len(ic.encode(x, codec))
        assert m.encode_s > 0 and m.decode_s > 0
        assert m.quantile(1.0) == max(m.sizes) and m.quantile(0.0) == min(m.sizes)
        assert min(m.sizes) <= m.quantile() <= max(m.sizes)


def test_bound_holds_for_noise_at_top_quality():
    for shape in [(1, 3, 1, 1), (1, 1, 8, 8), (2, 3, 33, 17), (1, 3, 64, 64)]:
        x = torch.rand(shape)
        for codec in ("jpeg100", "png"):
            assert len(ic.encode(x, codec)) <= ic.max_payload_bytes(shape, codec)


# ---------------------------------------------------------------------------- the cloud's checks
def reject(payload, codec, shape, match):
    with pytest.raises(WireError, match=match):
        ic.decode(payload, codec, shape, torch.float32)
    # the graph op raises the same
    with pytest.raises(WireError, match=match):
        torch.ops.coach.image_decode(payload, codec, list(shape), torch.float32)


def sample(data: bytes, scale=0.01, zero=0) -> bytes:
    return ic.SAMPLE_HEADER.pack(len(data), scale, zero) + data


def as_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def test_rejects_a_jpeg_of_another_size():
    p = ic.encode(smooth(1, 3, 32, 32), "jpeg90")
    reject(p, "jpeg90", (1, 3, 64, 64), r"sample 0 image size 32x32 .* expects 64x64")
    g = ic.encode(smooth(1, 1, 64, 64), "jpeg90")     # right size, one channel
    reject(g, "jpeg90", (1, 3, 64, 64), r"with 1 channel\(s\); the plan expects 64x64 with 3")


def test_rejects_truncated_and_garbage():
    p = ic.encode(smooth(2), "jpeg90")
    reject(p[:-10], "jpeg90", (2, 3, 16, 16), r"sample 1 length \d+ runs past .*truncated")
    reject(p[:5], "jpeg90", (2, 3, 16, 16), r"length 5 bytes is too short")
    g = torch.Generator().manual_seed(1)
    junk = torch.randint(0, 256, (600,), dtype=torch.uint8, generator=g)
    reject(junk, "jpeg90", (1, 3, 16, 16), r"sample 0")
    reject(as_tensor(sample(bytes(range(200)))), "jpeg90", (1, 3, 16, 16),
           r"sample 0 header: JPEG: no start-of-image marker")
    reject(as_tensor(sample(bytes(range(200)))), "png", (1, 3, 16, 16),
           r"sample 0 header: PNG: bad signature")
    # a sound header, then the scan cut short: refused while decoding, as a WireError
    one = ic.encode(smooth(1), "jpeg90")
    data = bytes(one[H:].tolist())
    reject(as_tensor(sample(data[:len(data) // 2])), "jpeg90", (1, 3, 16, 16),
           r"sample 0 does not decode")
    # a PNG sent where the plan says JPEG
    reject(ic.encode(smooth(1), "png"), "jpeg90", (1, 3, 16, 16), r"not a JPEG")


def test_rejects_wrong_sample_count():
    p = ic.encode(smooth(2), "png")
    reject(p, "png", (3, 3, 16, 16), r"sample count 2, the plan expects 3")
    p3 = ic.encode(smooth(3), "jpeg50")
    reject(p3, "jpeg50", (2, 3, 16, 16), r"after sample count 2")


def test_rejects_bad_scale_and_zero_point():
    p = bytearray(ic.encode(smooth(1), "png").numpy().tobytes())
    nan = bytearray(p)
    struct.pack_into("<f", nan, 4, float("nan"))
    reject(as_tensor(nan), "png", (1, 3, 16, 16), r"sample 0 scale nan is not finite and > 0")
    neg = bytearray(p)
    struct.pack_into("<f", neg, 4, -1.0)
    reject(as_tensor(neg), "png", (1, 3, 16, 16), r"scale -1.0")
    zp = bytearray(p)
    struct.pack_into("<i", zp, 8, 300)
    reject(as_tensor(zp), "png", (1, 3, 16, 16), r"zero point 300")


def png_ihdr(width, height, color=2, depth=8) -> bytes:
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
            + struct.pack(">I", 10) + b"IDAT" + zlib.compress(b"\0" * 64)[:10] + b"\0" * 4)


def test_rejects_a_png_bomb_before_decoding():
    reject(as_tensor(sample(png_ihdr(60000, 60000))), "png", (1, 3, 16, 16),
           r"sample 0 image size 60000x60000 \(height x width\) with 3 channel\(s\); the plan expects 16x16")
    reject(as_tensor(sample(png_ihdr(16, 16, depth=16))), "png", (1, 3, 16, 16), r"bit depth 16")
    reject(as_tensor(sample(png_ihdr(16, 16, color=6))), "png", (1, 3, 16, 16), r"color type 6")
    bad_crc = bytearray(png_ihdr(16, 16))
    bad_crc[20] ^= 1
    reject(as_tensor(sample(bytes(bad_crc))), "png", (1, 3, 16, 16), r"IHDR crc")


def test_rejects_oversized_and_non_uint8_payloads():
    shape = (1, 3, 16, 16)
    limit = ic.max_payload_bytes(shape, "jpeg90")
    reject(torch.zeros(limit + 1, dtype=torch.uint8), "jpeg90", shape, rf"length {limit + 1} bytes exceeds the limit {limit}")
    reject(torch.zeros(100, dtype=torch.int32), "jpeg90", shape, r"1-D uint8")
    reject(torch.zeros(2, 100, dtype=torch.uint8), "jpeg90", shape, r"1-D uint8")
