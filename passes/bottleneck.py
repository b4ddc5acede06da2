"""Learned bottlenecks at cuts: a small encoder that the end runs before a tensor crosses (fewer
channels, optionally fewer pixels) and the decoder that restores it on the cloud, inserted
into a GraphModule after the nodes named (``coach_fx.train_cut`` trains them).

Before::

    v = layer1(x); w = layer2(v)

After ``insert_bottlenecks(gm, {"layer1": Bottleneck(64, 4)})``::

    v = layer1(x); c = coach_cut_0_enc(v); r = coach_cut_0_dec(c); w = layer2(r)

The encoder's output ``c`` is a node like any other: the planner may cut after it, and then
``c`` (4 channels instead of 64) is what crosses, quantized and coded like any crossing. While
the encoder trains, its output goes through the crossing's quantizer with a straight-through
gradient at ``Bottleneck.train_bits`` (set per step by the trainer), so that it learns codes
that survive the bits the planner will give them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from coach_fx.passes.ops import fake_quantize_per_sample

#: Inserted modules are named ``coach_cut_<k>_enc`` / ``coach_cut_<k>_dec``.
PREFIX = "coach_cut_"


#: The bottleneck modules' layout (their parameters): a checkpoint of another is not resumed.
ARCHITECTURE = 2

@dataclass(frozen=True)
class BottleneckSpec:
    """A bottleneck for a (N, C, H, W) tensor: ``channels`` code channels, every ``stride`` x
    ``stride`` pixels one code (1: channels only), ``hidden`` channels in the decoder."""

    in_channels: int
    channels: int
    stride: int = 1
    hidden: int = 0

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.channels < 1 or self.stride < 1:
            raise ValueError(f"a bottleneck needs positive channels and stride, got {self}")

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The code's shape for an input of ``shape`` (N, C, H, W)."""
        n, _, h, w = shape
        return (n, self.channels, h // self.stride, w // self.stride)


class BottleneckEncoder(nn.Module):
    """The end's side: one convolution to ``channels`` (``stride`` x ``stride`` patches)."""

    def __init__(self, spec: BottleneckSpec) -> None:
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.channels, spec.stride, spec.stride)
        #: while training: the crossing's bits in the loop (None: none), and what it saw
        self.train_bits: int | None = None

    def flops(self, n_out: int) -> float:
        """Multiply-adds x 2 for an output of ``n_out`` elements (``passes.annotate``)."""
        return 2.0 * n_out * self.conv.in_channels * self.conv.kernel_size[0] * self.conv.kernel_size[1]

    def forward(self, x: Tensor) -> Tensor:
        code = self.conv(x)
        if self.training and self.train_bits is not None:   # straight through the quantizer
            code = code + (fake_quantize_per_sample(code, self.train_bits, 1) - code).detach()
        return code


class BottleneckDecoder(nn.Module):
    """The cloud's side: back to the tensor the rest of the model reads. A linear map from the
    code (a 1x1, or for ``stride`` > 1 a transposed, convolution: with the encoder, a linear
    autoencoder that ``init_from`` starts at the principal components), then a residual
    refinement that sees each pixel's neighbours (3x3 to ``hidden`` channels, ReLU, 3x3 back;
    zero at the start): the detail a patch's few components lose is guessed from its
    surroundings, on the cloud, where a few million multiply-adds cost little."""

    def __init__(self, spec: BottleneckSpec) -> None:
        super().__init__()
        hidden = spec.hidden or max(16, spec.in_channels // 2)
        self.linear = (nn.Conv2d(spec.channels, spec.in_channels, 1) if spec.stride == 1 else
                       nn.ConvTranspose2d(spec.channels, spec.in_channels, spec.stride, spec.stride))
        self.expand = nn.Conv2d(spec.in_channels, hidden, 3, padding=1)
        self.act = nn.ReLU()
        self.restore = nn.Conv2d(hidden, spec.in_channels, 3, padding=1)
        nn.init.zeros_(self.restore.weight)
        nn.init.zeros_(self.restore.bias)

    def flops(self, n_out: int) -> float:
        """Multiply-adds x 2 for an output of ``n_out`` elements (``passes.annotate``)."""
        per_pixel = self.linear.in_channels + 2 * 9 * self.expand.out_channels   # linear, then the refinement
        return 2.0 * n_out * per_pixel

    def forward(self, code: Tensor) -> Tensor:
        y = self.linear(code)
        return y + self.restore(self.act(self.expand(y)))


def init_from(enc: BottleneckEncoder, dec: BottleneckDecoder, features: Tensor, spec: BottleneckSpec,
              most: int = 20_000) -> None:
    """Start a bottleneck as the best linear autoencoder of ``features`` ((N, C, H, W) samples
    of the tensor it will carry): the encoder projects each ``stride`` x ``stride`` patch on
    its ``channels`` principal components, the decoder maps them back (PCA, exact for the
    samples' covariance)."""
    s = spec.stride
    x = features.detach().float()
    rows = (F.unfold(x, s, stride=s) if s > 1 else x.flatten(2)).transpose(1, 2).reshape(-1, spec.in_channels * s * s)
    if rows.shape[0] > most:   # a fixed, even subsample: the result does not depend on a generator
        rows = rows[torch.linspace(0, rows.shape[0] - 1, most).long()]
    mean_c = rows.reshape(-1, spec.in_channels, s * s).mean((0, 2))            # per channel
    mean = mean_c.repeat_interleave(s * s)
    cov = torch.cov((rows - mean).T)
    _, vecs = torch.linalg.eigh(cov)                                           # ascending
    v = vecs[:, -spec.channels:].flip(1)                                       # (C*s*s, c)
    with torch.no_grad():
        enc.conv.weight.copy_(v.T.reshape(spec.channels, spec.in_channels, s, s))
        enc.conv.bias.copy_(-(v.T @ mean))
        if s > 1:
            dec.linear.weight.copy_(v.T.reshape(spec.channels, spec.in_channels, s, s))
        else:
            dec.linear.weight.copy_(v.reshape(spec.in_channels, spec.channels, 1, 1))
        dec.linear.bias.copy_(mean_c)


def insert_bottlenecks(gm: fx.GraphModule, points: Mapping[str, BottleneckSpec]) -> fx.GraphModule:
    """A copy of ``gm`` with a bottleneck after each node named in ``points`` (a placeholder
    for a model input, or a node computing a (N, C, H, W) tensor): every reader of the node
    reads the decoder instead. ``gm`` itself is not changed.

    >>> student = insert_bottlenecks(gm, {"x": BottleneckSpec(3, 8, stride=4)})   # doctest: +SKIP
    """
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    missing = [p for p in points if p not in nodes]
    if missing:
        raise ValueError(f"insert_bottlenecks: no node {missing[0]!r} in the graph")
    for k, (name, spec) in enumerate(points.items()):
        node = nodes[name]
        enc, dec = f"{PREFIX}{k}_enc", f"{PREFIX}{k}_dec"
        out.add_submodule(enc, BottleneckEncoder(spec))
        out.add_submodule(dec, BottleneckDecoder(spec))
        readers = list(node.users)
        with out.graph.inserting_after(node):
            code = out.graph.call_module(enc, (node,))
        with out.graph.inserting_after(code):
            back = out.graph.call_module(dec, (code,))
        for r in readers:
            r.replace_input_with(node, back)
    out.graph.lint()
    out.recompile()
    return out


def bottlenecks(gm: nn.Module) -> list[tuple[BottleneckEncoder, BottleneckDecoder]]:
    """The (encoder, decoder) pairs :func:`insert_bottlenecks` put into ``gm``, in order."""
    mods = dict(gm.named_children())
    pairs, k = [], 0
    while f"{PREFIX}{k}_enc" in mods:
        pairs.append((mods[f"{PREFIX}{k}_enc"], mods[f"{PREFIX}{k}_dec"]))
        k += 1
    return pairs


__all__ = ["BottleneckDecoder", "BottleneckEncoder", "BottleneckSpec", "bottlenecks", "init_from",
           "insert_bottlenecks"]
