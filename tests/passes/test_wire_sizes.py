"""Every message size the planner, the controller and the online end side predict is the
encoded length: one home of the sizes (``coach_fx.runtime.wire``), checked against ``encode``."""

import math
import random

import pytest
import torch
from torch import nn

from coach_fx.driver import prepare
from coach_fx.passes.partition import partition
from coach_fx.plan import evaluate
from coach_fx.runtime.codec import payload_to_entries, quantized_entry
from coach_fx.runtime.plans import CrossingBits, CutProfile, EndHalf, Sizes, Variant
from coach_fx.runtime.wire import Entry, encode
from coach_fx.passes.wire_sizes import ALL_BITS, TENSOR_HEADER_BYTES, message_bytes, tensor_bytes, token_rows
from coach_fx.settings import Network, Settings

DTYPES = (torch.float32, torch.float16, torch.int64)
SHAPES = ((1,), (3, 5), (1, 3, 5, 7), (2, 1, 9), (1, 1000), (2, 3, 40))   # the last: a token tensor


@pytest.mark.parametrize("seed", range(5))
def test_random_crossings_encode_to_the_predicted_bytes(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        tensors = []
        for _ in range(rng.randint(1, 4)):
            shape, dtype = rng.choice(SHAPES), rng.choice(DTYPES)
            t = (torch.randn(shape, generator=g) * 3).to(dtype) if dtype.is_floating_point else \
                torch.randint(-50, 50, shape, generator=g, dtype=dtype)
            tensors.append((t, rng.choice(ALL_BITS)))
        # as the online end side sends them: each float tensor quantized with its bits
        entries = [quantized_entry(t, b) for t, b in tensors]
        predicted = message_bytes([tensor_bytes(t.numel(), t.numel() * t.element_size(),
                                                t.is_floating_point(), b, token_rows(t.shape)) for t, b in tensors])
        assert len(encode(1, entries)) == predicted


class Mixed(nn.Module):
    """Crossings of three dtypes: float32 (relu), float16 (half) and int64 (argmax)."""

    def forward(self, x):
        a = torch.relu(x)
        h = (x * 2).half()
        i = x.flatten(1).argmax(1)
        return a.flatten(1).sum(1) + h.float().flatten(1).mean(1) + i.float()


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (1, 1, 4, 4), (1, 2, 11, 3), (2, 6, 40)])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_the_cost_model_prices_the_encoded_message(shape, bits):
    x = torch.randn(shape)
    gm, inputs, dag = prepare(Mixed().eval(), (x,), Settings.of(costs="analytic", progress=False))
    end_nodes = ("relu", "mul", "half", "flatten", "argmax")
    plan = evaluate(dag, end_nodes, bits, Network(10))
    assert sorted(plan.cut) == ["argmax", "half", "relu"]
    end, _, boundary = partition(gm, end_nodes, {c: bits for c in plan.cut})
    msg = encode(0, payload_to_entries(boundary, end(x)))
    assert plan.bytes_sent == len(msg)

    # the online end side: the controller's view and the run-time plan of the same cut
    float_end, _, float_boundary = partition(gm, end_nodes, {})
    fixed = tuple(None if c.dtype.is_floating_point else 32 for c in float_boundary.crossings)
    numels = [math.prod(c.shape) for c in float_boundary.crossings]
    sizes = [n * c.dtype.itemsize for n, c in zip(numels, float_boundary.crossings)]
    quant = [k for k, f in enumerate(fixed) if f is None]
    raw = sum(s for k, s in enumerate(sizes) if k not in quant)
    v = Variant(0, EndHalf(float_end), float_boundary, CutProfile(Sizes(), 2, 0.0, 0.0), CrossingBits(fixed, bits))
    sent = encode(0, [quantized_entry(t, bits if f is None else 32)
                      for t, f in zip(float_end(x), fixed)])
    assert v.message_bytes(bits) == len(sent)
    rows = tuple(token_rows(float_boundary.crossings[k].shape) for k in quant)
    profile = CutProfile(Sizes(tuple(numels[k] for k in quant), tuple(sizes[k] for k in quant), raw, len(numels),
                               quant_rows=rows), 2, 0.0, 0.0)
    assert profile.message_bytes(bits) == len(sent)


def test_tensor_bytes_rules():
    assert tensor_bytes(10, 40, True, 3) == 4 + TENSOR_HEADER_BYTES       # packed
    assert tensor_bytes(10, 40, True, 32) == 40 + TENSOR_HEADER_BYTES     # as it is
    assert tensor_bytes(10, 80, False, 4) == 80 + TENSOR_HEADER_BYTES     # not a float: as it is
    assert len(encode(0, [Entry.of_value(torch.zeros(3, dtype=torch.float64))])) == \
        message_bytes([tensor_bytes(3, 24, True, 32)])
