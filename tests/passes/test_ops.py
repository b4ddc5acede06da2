import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import coach_fx.passes.ops as ops
from coach_fx.passes.wire_sizes import packed_nbytes

c = torch.ops.coach


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_pack_unpack_bit_exact(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    packed = c.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(c.unpack(packed, bits, [n]), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000), kind=st.sampled_from(
    ["normal", "positive", "negative", "constant", "zeros", "float64", "float16"]),
       magnitude=st.integers(-6, 6))
@settings(max_examples=25, deadline=None)
def test_numpy_quantize_pack_is_bit_exact_with_the_ops(bits, n, seed, kind, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** magnitude
    x = {"positive": x.abs(), "negative": -x.abs(), "constant": torch.full((n,), 3.7),
         "zeros": torch.zeros(n), "float64": x.double(), "float16": (x / 1e6).half()}.get(kind, x)
    codes, scale, zero = ops.quantize_impl(x, bits)
    packed, s, z = ops.quantize_pack_cpu(x, bits)
    assert torch.equal(packed, ops.pack_impl(codes, bits))
    assert torch.equal(s, scale) and torch.equal(z, zero)


def test_numpy_quantize_rejects_inf():
    with pytest.raises(ValueError, match="inf or nan"):
        ops.quantize_pack_cpu(torch.tensor([1.0, float("inf")]), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_quantize_error_within_half_step(bits):
    x = torch.randn(3, 7, 5) * 4
    q, s, z = c.quantize(x, bits)
    assert q.dtype == torch.uint8 and int(q.max()) < (1 << bits)
    y = c.dequantize(c.unpack(c.pack(q, bits), bits, list(x.shape)), s, z, bits, x.dtype)
    assert (y - x).abs().max() <= s / 2 + 1e-5 * x.abs().max()


def test_half_keeps_range_and_tiny_values():
    for scale in (1e-9, 1.0, 1e7):
        x = torch.randn(1000) * scale
        q, s, z = c.quantize(x, 16)
        y = c.dequantize(c.unpack(c.pack(q, 16), 16, [1000]), s, z, 16, torch.float32)
        assert torch.isfinite(y).all()
        assert (y - x).norm() / x.norm() < 1e-3
        assert c.pack(q, 16).numel() == 2000


def test_constant_tensor_roundtrips():
    x = torch.full((10,), 3.5)
    assert torch.allclose(ops.roundtrip(x, 4), x, atol=1e-3)
    z = torch.zeros(10)
    assert torch.equal(ops.roundtrip(z, 2), z)


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="bits"):
        c.quantize(torch.randn(3), 7)
    with pytest.raises(ValueError, match="need"):
        c.unpack(torch.zeros(3, dtype=torch.uint8), 4, [100])


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(20, requires_grad=True)
    c.fake_quantize(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones(20))


def test_ops_export_with_fake_kernels():
    class M(torch.nn.Module):
        def forward(self, x):
            q, s, z = c.quantize(x, 4)
            p = c.pack(q, 4)
            return c.dequantize(c.unpack(p, 4, [2, 9]), s, z, 4, torch.float32)

    x = torch.randn(2, 9)
    ep = torch.export.export(M(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"coach.quantize.default", "coach.pack.default", "coach.unpack.default"} <= targets
    assert torch.allclose(ep.module()(x), M()(x))


def _tokens() -> torch.Tensor:
    """(batch, tokens, features) with tokens of very different magnitudes (ViT's class token
    is ~100x smaller than its patch tokens)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 48, generator=g) * torch.logspace(-3, 1, 5)[None, :, None]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_a_token_tensor_has_a_scale_per_token(bits):
    x = _tokens()
    q, s, z = c.quantize(x, bits)
    assert s.shape == z.shape == (2, 5, 1)
    y = c.dequantize(c.unpack(c.pack(q, bits), bits, list(x.shape)), s, z, bits, x.dtype)
    assert ((y - x).abs() <= s / 2 + 1e-6).all()          # every token within its own half step
    small = (y[:, 0] - x[:, 0]).norm() / x[:, 0].norm()
    assert small < 0.5 ** (bits - 2)                          # one scale: the small token is all zeros
    # the numpy path, the oracle's per-request fake quantization (any grouping) and the
    # training op give the same values
    packed, s2, z2 = ops.quantize_pack_cpu(x, bits)
    assert torch.equal(packed, ops.pack_impl(q, bits)) and torch.equal(s2, s) and torch.equal(z2, z)
    for group in (1, 2, 5):
        assert torch.equal(ops.fake_quantize_per_sample(x, bits, group), y)
    assert torch.equal(c.fake_quantize(x, bits), y)


@pytest.mark.parametrize("shape,bits", [((2, 5, 8), 4), ((2, 3, 6, 40), 4), ((4, 40), 4), ((2, 5, 48), 16)])
def test_feature_maps_narrow_tensors_and_half_keep_one_scale(shape, bits):
    _, s, z = c.quantize(torch.randn(shape), bits)
    assert s.shape == z.shape == ()


def test_token_ops_export_with_per_token_fake_shapes():
    class M(torch.nn.Module):
        def forward(self, x):
            q, s, z = c.quantize(x, 4)
            return c.dequantize(c.unpack(c.pack(q, 4), 4, [2, 5, 48]), s, z, 4, torch.float32), s

    x = _tokens()
    ep = torch.export.export(M(), (x,))
    out, s = ep.module()(x)
    assert s.shape == (2, 5, 1) and torch.equal(out, M()(x)[0])
