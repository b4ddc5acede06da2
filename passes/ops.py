"""Boundary custom ops: ``coach::quantize``, ``coach::pack``, ``coach::unpack``, ``coach::dequantize``.

They are ``torch.library.custom_op``s with fake implementations, so a graph that holds them
survives ``split_module``, ``torch.export`` and inductor. Quantization is uniform affine per
tensor with plain integer tensors (no ``torch.ao``), or per token for a (batch, tokens,
features) tensor (``passes.wire_sizes.token_rows``: scale and zero point of shape
``(batch, tokens, 1)``, so small tokens keep their precision)::

    q  = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)      # uint8 codes
    x' = (q - zero_point) * scale

``pack`` stores ``bits`` bits per code, so a tensor of ``n`` elements takes exactly
``ceil(n * bits / 8)`` bytes; ``unpack`` gives the codes back bit-exactly.

16 bits is half precision: the codes are ``x / scale`` as float16, where ``scale`` is the power
of two that puts the largest magnitude near 2**14, so neither large activations overflow to inf
nor tiny ones flush to zero.

Example::

    >>> import torch, coach_fx.passes.ops as ops
    >>> x = torch.randn(4, 5)
    >>> q, s, z = torch.ops.coach.quantize(x, 4)
    >>> p = torch.ops.coach.pack(q, 4); p.numel()
    10
    >>> y = torch.ops.coach.dequantize(torch.ops.coach.unpack(p, 4, [4, 5]), s, z, 4, x.dtype)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

# the bit widths (32 = the tensor as is, no op at all) are the wire format's
from coach_fx.passes.wire_sizes import QUANT_BITS, packed_nbytes, row_quantized



def _check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"coach quantize supports bits {QUANT_BITS}; got {bits}")


#: The smallest scale: a constant tensor has range 0, and any positive scale represents it.
TINY_SCALE = float(np.float32(torch.finfo(torch.float32).tiny * 1e6))


def affine_params(lo: Any, hi: Any, bits: int, xp: Any = torch) -> tuple[Any, Any]:
    """The quantizer's one rule, for torch tensors or numpy arrays (``xp``): the range
    ``lo``..``hi`` widened to hold 0, ``scale = range / (2**bits - 1)`` (at least
    :data:`TINY_SCALE`), ``zero = round(-lo / scale)`` clipped to the codes (float32, round half
    to even on both). Every quantizer here (the op, the numpy fast path, the per-sample fake
    quantizer) takes its scale and zero point from this."""
    qmax = (1 << bits) - 1
    zeros = xp.zeros_like(lo)
    lo, hi = xp.minimum(lo, zeros), xp.maximum(hi, zeros)
    scale = xp.maximum((hi - lo) / qmax, zeros + TINY_SCALE)
    return scale, xp.clip(xp.round(-lo / scale), 0, qmax)


def half_scale(amax: Tensor) -> Tensor:
    """16 bits' power-of-two scale: the largest magnitude ``amax`` lands near 2**14, so half's
    range is used in full, neither overflowing large nor flushing tiny activations."""
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp_min(torch.finfo(torch.float32).tiny))) - 14)


def _qparams(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``x`` at ``bits``: 0-d, or per row (shape ``(..., 1)``) for a
    token tensor (``quant_rows``)."""
    if row_quantized(x.shape, bits):
        lo, hi = x.amin(-1, keepdim=True).float(), x.amax(-1, keepdim=True).float()
    else:
        lo, hi = x.min().float(), x.max().float()
    scale, zero = affine_params(lo, hi, bits)
    return scale, zero.to(torch.int32)


def quantize_impl(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``coach::quantize`` as a plain function (the runtime calls it per request
    without the dispatcher's overhead; the graphs call the op)."""
    _check_bits(bits)
    if bits == 16:   # a power of two: exact to apply
        scale = half_scale(x.detach().abs().max())
        return (x.detach().float() / scale).to(torch.float16), scale, x.new_zeros((), dtype=torch.int32)
    scale, zero = _qparams(x.detach(), bits)
    q = torch.clamp(torch.round(x.detach().float() / scale) + zero, 0, (1 << bits) - 1)
    return q.to(torch.uint8), scale, zero


@torch.library.custom_op("coach::quantize", mutates_args=())
def quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantization per tensor (per token for a token tensor); returns (codes, scale,
    zero_point): uint8 codes for bits <= 8 (uniform affine), float16 codes for 16."""
    return quantize_impl(x, bits)


@quantize.register_fake
def _(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    params = (*x.shape[:-1], 1) if row_quantized(x.shape, bits) else ()
    return (x.new_empty(x.shape, dtype=torch.float16 if bits == 16 else torch.uint8),
            x.new_empty(params, dtype=torch.float32), x.new_empty(params, dtype=torch.int32))


def dequantize_impl(codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                    dtype: torch.dtype) -> Tensor:
    """The body of ``coach::dequantize`` as a plain function (the runtime calls it per request
    without the dispatcher's overhead; the graphs call the op)."""
    _check_bits(bits)
    if bits == 16:
        return (codes.float() * scale).to(dtype)
    return ((codes.to(torch.int32) - zero_point).float() * scale).to(dtype)


@torch.library.custom_op("coach::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
               dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize``: ``(codes - zero_point) * scale`` in ``dtype``."""
    return dequantize_impl(codes, scale, zero_point, bits, dtype)


@dequantize.register_fake
def _(codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    return codes.new_empty(codes.shape, dtype=dtype)


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(bits, device=device, dtype=torch.uint8)


def pack_impl(codes: Tensor, bits: int) -> Tensor:
    """The body of ``coach::pack`` as a plain function (the runtime calls it per request
    without the dispatcher's overhead; the graphs call the op)."""
    _check_bits(bits)
    if bits == 16:
        return codes.reshape(-1).to(torch.float16).view(torch.uint8).clone()
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    # Spread every code into its bits, then regroup the bit stream eight at a time.
    stream = ((flat.unsqueeze(1) >> _shifts(bits, flat.device)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.reshape(-1, 8) << _shifts(8, flat.device)).sum(1, dtype=torch.uint8)


_SHIFTS64 = {b: np.arange(8, dtype=np.uint64) * np.uint64(b) for b in QUANT_BITS if b < 8}


def quantize_pack_cpu(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``pack_impl(*quantize_impl(x, bits)[:1], bits)`` with its scale and zero point (as
    ``quantize_impl`` gives them: 0-d, or per token), computed in numpy for a CPU tensor and
    ``bits`` <= 8: bit-exact with the ops (the same float32 arithmetic, round half to even), in
    a fraction of the time.

    The end device quantizes every request; on a small tensor torch's per-op overhead (a dozen
    ops) costs several times the arithmetic, and the emulated device pays it × its slowdown.

    >>> p, s, z = quantize_pack_cpu(torch.randn(4, 5), 4); p.numel()
    10
    """
    _check_bits(bits)
    if bits > 8 or x.device.type != "cpu":
        codes, scale, zero = quantize_impl(x, bits)
        return pack_impl(codes, bits), scale, zero
    rows = row_quantized(x.shape, bits)
    a = x.detach().float().numpy().reshape(-1, x.shape[-1] if rows else max(x.numel(), 1))
    qmax = np.float32((1 << bits) - 1)
    scale, zero = affine_params(a.min(1, initial=np.inf), a.max(1, initial=-np.inf), bits, np)
    if not np.isfinite(scale).all():
        raise ValueError(f"cannot quantize a tensor holding inf or nan to {bits} bits")
    q = np.clip(np.rint(a / scale[:, None]) + zero[:, None], 0, qmax).astype(np.uint8).reshape(-1)
    if bits < 8:
        # LSB first, as pack_impl lays it out: eight codes fill ``bits`` bytes exactly, so
        # each group of eight goes into one little-endian 64-bit word, whose low bytes are it
        n = q.size
        if n % 8:
            q = np.concatenate([q, np.zeros(8 - n % 8, np.uint8)])
        words = (q.reshape(-1, 8).astype(np.uint64) << _SHIFTS64[bits]).sum(axis=1, dtype=np.uint64)
        q = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[:(n * bits + 7) // 8]
    params = (*x.shape[:-1], 1) if rows else ()
    return (torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scale.astype(np.float32)).reshape(params),
            torch.from_numpy(zero.astype(np.int32)).reshape(params))


@torch.library.custom_op("coach::pack", mutates_args=())
def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack codes of ``bits`` bits each into ``ceil(numel*bits/8)`` bytes (LSB first)."""
    return pack_impl(codes, bits)


@pack.register_fake
def _(codes: Tensor, bits: int) -> Tensor:
    n = codes.numel()
    return codes.new_empty(((n * bits + 7) // 8,), dtype=torch.uint8)


def unpack_impl(packed: Tensor, bits: int, shape: list[int]) -> Tensor:
    """The body of ``coach::unpack`` as a plain function (the runtime calls it per request
    without the dispatcher's overhead; the graphs call the op)."""
    _check_bits(bits)
    numel = math.prod(shape)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed tensor has {packed.numel()} bytes; {numel} codes of {bits} bits "
                         f"need {packed_nbytes(numel, bits)}")
    if bits == 16:
        return packed.view(torch.float16).reshape(shape).clone()
    if bits == 8:
        return packed.reshape(shape).clone()
    stream = ((packed.unsqueeze(1) >> _shifts(8, packed.device)) & 1).reshape(-1)[: numel * bits]
    codes = (stream.reshape(numel, bits) << _shifts(bits, packed.device)).sum(1, dtype=torch.uint8)
    return codes.reshape(shape)


@torch.library.custom_op("coach::unpack", mutates_args=())
def unpack(packed: Tensor, bits: int, shape: list[int]) -> Tensor:
    """Inverse of ``pack``: the uint8 codes, reshaped to ``shape``."""
    return unpack_impl(packed, bits, shape)


@unpack.register_fake
def _(packed: Tensor, bits: int, shape: list[int]) -> Tensor:
    return packed.new_empty(shape, dtype=torch.float16 if bits == 16 else torch.uint8)


@torch.library.custom_op("coach::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize in one op; its gradient passes straight through (for training)."""
    if bits >= 32:
        return x.clone()
    q, s, z = quantize(x, bits)
    return dequantize(q, s, z, bits, x.dtype)


def straight_through(op: Any) -> Any:
    """Give a ``custom_op`` of ``(x, one non-tensor argument) -> like x`` a fake kernel (an
    empty tensor like ``x``) and a straight-through gradient (``x``'s gradient passes as it is):
    the fake quantizer and the image codecs' training round trip."""
    op.register_fake(lambda x, arg: torch.empty_like(x))
    op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)
    return op


straight_through(fake_quantize)


def roundtrip(x: Tensor, bits: int) -> Tensor:
    """What the cloud sees of ``x`` sent with ``bits`` bits (eager helper for tests)."""
    return x if bits >= 32 else fake_quantize(x, bits)


def fake_quantize_per_sample(x: Tensor, bits: int, group: int = 1) -> Tensor:
    """Each request of a batch quantized on its own, then dequantized: what ``quantize`` ->
    ``dequantize`` give every request of ``group`` samples (dim 0), for a whole calibration
    batch at once (a scale shared by the batch would be coarser or finer than any request's).
    A token tensor has a scale per token (``row_quantized``), whatever the grouping."""
    if bits >= 32 or not x.is_floating_point() or x.dim() == 0:
        return x
    _check_bits(bits)
    n = x.shape[0]
    if group > n:      # a last, partial request: one group
        group = n
    if row_quantized(x.shape, bits):
        flat = x.detach().reshape(-1, x.shape[-1]).float()
    elif group > 1 and n % group:
        cut = n - n % group
        return torch.cat([fake_quantize_per_sample(x[:cut], bits, group),
                          fake_quantize_per_sample(x[cut:], bits, n % group)])
    else:
        flat = x.detach().reshape(n // max(group, 1), -1).float()
    if bits == 16:
        scale = half_scale(flat.abs().amax(1))[:, None]
        return ((flat / scale).half().float() * scale).to(x.dtype).reshape(x.shape)
    qmax = (1 << bits) - 1
    scale, zero = affine_params(flat.amin(1)[:, None], flat.amax(1)[:, None], bits)
    q = torch.clamp(torch.round(flat / scale) + zero, 0, qmax)
    return ((q - zero) * scale).to(x.dtype).reshape(x.shape)
