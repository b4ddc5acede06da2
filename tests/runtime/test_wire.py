import struct

import pytest
import torch

from coach_fx.runtime.wire import (FLAG_RESULT, LIMITS, VERSION, Entry, WireError, decode, encode,
                                   peek_header)


def sample():
    g = torch.Generator().manual_seed(0)
    return [Entry.raw(torch.randn(2, 3, generator=g)), Entry.raw(torch.arange(5)),
            Entry.raw(torch.tensor([True, False])), Entry.raw(torch.randn(4, generator=g).half()),
            Entry.quantized(torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g), 0.25, 3, 4, (10,), torch.float32),
            Entry.of_value(torch.Size([2, 3])), Entry.of_value((1, 2)), Entry.of_value(None),
            Entry.of_value(7), Entry.of_value(2.5), Entry.of_value(True), Entry.stats([1.0, 2.0])]


def test_roundtrip_every_kind():
    msg = encode(42, sample(), FLAG_RESULT, plan_id=3)
    req, plan, flags, entries = decode(msg)
    assert (req, plan, flags) == (42, 3, FLAG_RESULT)
    want = sample()
    for a, b in zip(entries, want):
        va, vb = a.value(), b.value()
        if isinstance(vb, torch.Tensor):
            assert torch.equal(va, vb)
        else:
            assert va == vb and type(va) is type(vb)
    q = entries[4]
    assert (q.bits, q.shape, q.scale, q.zero_point) == (4, (10,), 0.25, 3)


def test_header_sizes_match_cost_model():
    from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES
    msg = encode(1, [Entry.raw(torch.zeros(10))])
    assert len(msg) == MESSAGE_HEADER_BYTES + TENSOR_HEADER_BYTES + 40


def test_version_mismatch_is_clear():
    msg = bytearray(encode(1, []))
    struct.pack_into("<H", msg, 4, VERSION + 1)
    with pytest.raises(WireError, match="version"):
        decode(bytes(msg))


@pytest.mark.parametrize("mutate,match", [
    (lambda m: b"XXXX" + m[4:], "magic"),
    (lambda m: m[:10], "shorter"),
    (lambda m: m[:-3], "checksum|truncated|payload"),
    (lambda m: m + b"\0", "checksum|payload"),
])
def test_malformed(mutate, match):
    msg = encode(1, [Entry.raw(torch.randn(8))])
    with pytest.raises(WireError, match=match):
        decode(mutate(msg))


def _forge(kind, code, bits, rank, dims, nbytes, scale=1.0, zero=0, body=b""):
    import zlib
    ent = struct.pack("<BBBB8IfiQI", kind, code, bits, rank, *dims, scale, zero, nbytes, 0)
    rest = ent + body
    return struct.pack("<4sHHQHHI", b"COCH", VERSION, 0, 1, 0, 1, zlib.crc32(rest)) + rest


def test_limits_checked_before_allocation():
    # 2**31-1 elements claimed with a tiny body: refused without allocating
    huge = _forge(1, 0, 32, 2, [65535, 65535, 0, 0, 0, 0, 0, 0], 65535 * 65535 * 4)
    with pytest.raises(WireError, match="elements exceed"):
        decode(huge)
    bad_bits = _forge(0, 0, 7, 1, [4, 0, 0, 0, 0, 0, 0, 0], 4, body=b"\0" * 4)
    with pytest.raises(WireError, match="bits"):
        decode(bad_bits)
    bad_len = _forge(1, 0, 32, 1, [4, 0, 0, 0, 0, 0, 0, 0], 15, body=b"\0" * 15)
    with pytest.raises(WireError, match="expected 16"):
        decode(bad_len)
    with pytest.raises(WireError, match="entries"):
        peek_header(struct.pack("<4sHHQHHI", b"COCH", VERSION, 0, 1, 0, LIMITS.max_entries + 1, 0))


def test_unsendable_value():
    with pytest.raises(WireError, match="cannot send"):
        Entry.of_value(object())


def test_importing_the_wire_format_loads_no_optimizer(tmp_path):
    """A run-time process (the cloud server, an end device) imports the wire format without the
    planner, the accuracy oracle or networkx: ``coach_fx`` re-exports lazily. (Run from an
    empty folder: ``python -c`` puts the current folder first on the path, and the source
    tree is not the installed package.)"""
    import subprocess
    import sys
    code = ("import sys, coach_fx.runtime.wire, coach_fx.runtime.end, coach_fx.runtime.cloud; "
            "bad = [m for m in ('networkx', 'scipy', 'coach_fx.optimize', 'coach_fx.accuracy', "
            "'coach_fx.driver') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def _token_message(codec=None):
    from coach_fx.runtime.codec import quantized_entry
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))
    x[:, 0] *= 0.01
    return x, encode(1, [quantized_entry(x, 4, codec)])


@pytest.mark.parametrize("codec", [None, "deflate"])
def test_a_token_tensor_travels_with_its_row_scales(codec):
    import coach_fx.passes.ops as ops
    from coach_fx.passes.wire_sizes import message_bytes, tensor_bytes, token_rows
    x, msg = _token_message(codec)
    if codec is None:
        assert len(msg) == message_bytes([tensor_bytes(x.numel(), x.numel() * 4, True, 4, token_rows(x.shape))])
    e = decode(msg)[3][0]
    assert e.scale.shape == e.zero_point.shape == (10,)
    s, z = e.quant_params()
    want_q, want_s, want_z = ops.quantize_impl(x, 4)
    assert torch.equal(s, want_s) and torch.equal(z, want_z)
    assert torch.equal(ops.unpack_impl(e.packed(), 4, [2, 5, 48]), want_q)


def _patched(msg, offset, fmt, value):
    import zlib
    m = bytearray(msg)
    struct.pack_into(fmt, m, offset, value)
    struct.pack_into("<I", m, 20, zlib.crc32(m[24:]))
    return bytes(m)


@pytest.mark.parametrize("where,fmt,value,match", [
    (24 + 56, "<f", float("nan"), "bad scale"),            # the first row's scale
    (24 + 56 + 4, "<f", 0.0, "bad scale"),
    (24 + 56, "<f", 3e37, "overflows"),
    (24 + 56 + 40, "<B", 16, "zero point 16 out of range"),  # a row's zero point at 4 bits
    (24 + 36, "<f", 2.0, "header scale"),                  # the header's scale must be 1
])
def test_bad_row_parameters_are_refused(where, fmt, value, match):
    _, msg = _token_message()
    decode(msg)
    with pytest.raises(WireError, match=match):
        decode(_patched(msg, where, fmt, value))
