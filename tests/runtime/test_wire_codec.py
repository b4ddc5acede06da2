"""Deflate-coded quantized entries: round trip, fallback, and hostile coded payloads."""
import struct
import zlib

import pytest
import torch

from coach_fx.passes.ops import quantize_pack_cpu
from coach_fx.runtime.codec import quantized_entry
from coach_fx.passes.packed_codec import TENSOR_CODECS
from coach_fx.runtime.wire import QUANT, VERSION, Entry, WireError, decode, encode
from coach_fx.passes.wire_sizes import packed_nbytes


def sparse(shape=(1, 16, 8, 8), seed=0):
    """A post-ReLU-like activation: most values zero, so its codes compress."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g) - 1.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
def test_coded_roundtrip_equals_uncoded(bits):
    x = sparse()
    plain, coded = quantized_entry(x, bits), quantized_entry(x, bits, "deflate")
    assert coded.codec == TENSOR_CODECS["deflate"] and coded.data.numel() < plain.data.numel()
    (_, _, _, (got,)) = decode(encode(1, [coded]))
    assert got.codec_name == "deflate"
    assert torch.equal(got.packed(), plain.data)    # lossless: the same codes as uncoded
    assert (got.scale, got.zero_point) == (plain.scale, plain.zero_point)


def test_incompressible_codes_go_uncoded():
    g = torch.Generator().manual_seed(1)
    e = quantized_entry(torch.rand(4096, generator=g), 8, "deflate")
    assert e.codec == 0 and e.data.numel() == 4096


def test_unknown_codec_is_named():
    with pytest.raises(WireError, match="unknown tensor codec 'zstd'"):
        quantized_entry(sparse(), 4, "zstd")


def _forge_quant(shape, bits, body, codec=1, nbytes=None):
    dims = list(shape) + [0] * (8 - len(shape))
    ent = struct.pack("<BBBB8IfiQI", QUANT, 0, bits, len(shape), *dims, 0.5, 0,
                      len(body) if nbytes is None else nbytes, codec)
    rest = ent + body
    return struct.pack("<4sHHQHHI", b"COCH", VERSION, 0, 1, 0, 1, zlib.crc32(rest)) + rest


def _entry(msg):
    return decode(msg)[3][0]


def test_bomb_inflates_no_further_than_the_shape_allows():
    # 64 MiB of zeros deflate to ~64 KiB; claimed as 1024 4-bit values (512 packed bytes)
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    e = _entry(_forge_quant((1024,), 4, bomb[:511]))     # a prefix below the packed length
    with pytest.raises(WireError, match="inflates to more than the 512 packed bytes"):
        e.packed()


def test_coded_stream_shorter_than_the_shape_is_refused():
    e = _entry(_forge_quant((1024,), 4, zlib.compress(b"\1" * 100)))
    with pytest.raises(WireError, match="inflates to other than the 512 packed bytes"):
        e.packed()


def test_truncated_coded_stream_is_refused():
    full = zlib.compress(bytes(range(256)) * 2)
    e = _entry(_forge_quant((1024,), 4, full[:len(full) // 2]))
    with pytest.raises(WireError, match="packed bytes"):
        e.packed()


def test_garbage_coded_stream_is_refused():
    e = _entry(_forge_quant((1024,), 4, b"\xff" * 40))
    with pytest.raises(WireError, match="does not inflate"):
        e.packed()


def test_trailing_bytes_after_the_stream_are_refused():
    e = _entry(_forge_quant((1024,), 4, zlib.compress(b"\0" * 512) + b"junk"))
    with pytest.raises(WireError, match="packed bytes"):
        e.packed()


@pytest.mark.parametrize("nbytes,match", [
    (512, "fewer than the 512 packed"),     # a coded length must be shorter than the packed one
    (600, "fewer than the 512 packed"),
])
def test_coded_length_checked_before_anything_else(nbytes, match):
    with pytest.raises(WireError, match=match):
        decode(_forge_quant((1024,), 4, b"\0" * nbytes))


def test_unknown_codec_id_and_codec_on_raw_entries():
    with pytest.raises(WireError, match="unknown codec 7"):
        decode(_forge_quant((1024,), 4, b"\0" * 10, codec=7))
    ent = struct.pack("<BBBB8IfiQI", 1, 0, 32, 1, 4, *[0] * 7, 1.0, 0, 16, 1)
    msg = struct.pack("<4sHHQHHI", b"COCH", VERSION, 0, 1, 0, 1, zlib.crc32(ent + b"\0" * 16)) + ent + b"\0" * 16
    with pytest.raises(WireError, match="unknown codec 1 for a raw entry"):
        decode(msg)


def test_cloud_checks_the_plan_shape_before_inflating():
    """A coded entry whose header claims another shape is refused by the plan check, before
    any inflation (``entries_to_payload``)."""
    from coach_fx.passes.boundary import Boundary, Crossing
    from coach_fx.runtime.codec import entries_to_payload
    x = sparse((1, 4, 4, 4))
    b = Boundary((Crossing("relu", "relu", "quant", 4, (1, 4, 4, 4), torch.float32, "deflate"),), False)
    packed, scale, zero = quantize_pack_cpu(x, 4)
    big = Entry.quantized(torch.zeros(packed_nbytes(1 << 20, 4), dtype=torch.uint8), scale, zero, 4,
                          (1, 1 << 20), torch.float32, "deflate")
    (_, _, _, (got,)) = decode(encode(1, [big]))
    with pytest.raises(WireError, match="expected 4-bit"):
        entries_to_payload(b, [got])
    ok = Entry.quantized(packed, scale, zero, 4, x.shape, x.dtype, "deflate")
    (_, _, _, (got,)) = decode(encode(1, [ok]))
    assert torch.equal(entries_to_payload(b, [got])[0], packed)


def test_a_bomb_for_another_shape_allocates_nothing_before_the_plan_refuses_it():
    """64 KiB of deflated zeros that inflate to 64 MiB, in a header claiming 2**26 8-bit values:
    decoding keeps the coded bytes, and the plan's shape check refuses the entry before any
    inflation (peak allocation well under the bomb's size)."""
    import tracemalloc

    from coach_fx.passes.boundary import Boundary, Crossing
    from coach_fx.runtime.codec import entries_to_payload
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    msg = _forge_quant((1 << 26,), 8, bomb)
    b = Boundary((Crossing("relu", "relu", "quant", 8, (1, 4, 4, 4), torch.float32, "deflate"),), False)
    tracemalloc.start()
    try:
        (_, _, _, entries) = decode(msg)
        with pytest.raises(WireError, match="expected 8-bit"):
            entries_to_payload(b, entries)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(msg) + (1 << 20)


def test_a_scale_that_overflows_its_dtype_is_refused():
    ok = _forge_quant((1024,), 4, b"\0" * 512, codec=0)
    decode(ok)
    big = bytearray(ok)
    struct.pack_into("<f", big, 24 + 36, 3e38)              # finite, but 15 x 3e38 is not
    rest = bytes(big[24:])
    struct.pack_into("<I", big, 20, zlib.crc32(rest))
    with pytest.raises(WireError, match="scale 3e\\+38 overflows dtype"):
        decode(bytes(big))
