"""Lossless coding of the quantized crossings: measured sizes, planning, and the coded wire."""
import math

import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.dag import CodecCost, LayerDAG, NodeData
from coach_fx.plan import evaluate, mean_bytes
from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES, TENSOR_HEADER_BYTES, packed_nbytes
from coach_fx.settings import Network, Settings


class Sparse(nn.Module):
    """conv -> relu with a negative bias (mostly zeros: codes that compress) -> a costly head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.conv.bias.fill_(-0.8)
        self.head = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def calibration(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g)


def settings(**kw):
    base = dict(costs="analytic", progress=False, network=Network(0.5), calibration=(calibration(), None),
                accuracy_confidence=None, output_tolerance=0.05)
    return {**base, **kw}


def test_sizes_are_measured_and_shorter_than_packed():
    cm = coach_fx.compile(Sparse().eval(), (calibration()[:1],), **settings())
    costs = cm.dag.tensor_codecs["deflate"]
    relu = next(n for n in cm.dag.nodes if n.startswith("relu"))
    for bits, c in costs[relu].items():
        packed = packed_nbytes(cm.dag.info[relu].numel, bits)
        assert 0 < c.average <= c.bytes < packed       # quantile >= mean, both coded smaller
    assert "x" in costs and set(costs["x"]) == {8}     # a model input at its input bits


def test_the_plan_codes_its_crossings_and_the_stream_is_lossless():
    x = calibration()[:6]
    frames = [x[k:k + 1] for k in range(6)]
    m = Sparse().eval()
    coded = coach_fx.compile(m, (frames[0],), **settings())
    plain = coach_fx.compile(m, (frames[0],), **settings(tensor_codecs=()))
    assert coded.plan.tensor_codecs and not plain.plan.tensor_codecs
    assert plain.dag.tensor_codecs == {}
    assert coded.plan.score < plain.plan.score
    same = evaluate(coded.dag, coded.plan.end_nodes, coded.plan.bits, coded.settings.network)
    assert coded.plan.bytes_sent < same.bytes_sent              # the same cut and bits, uncoded
    assert all(c.codec == "deflate" for c in coded.boundary.crossings if c.dag_node in coded.plan.tensor_codecs)
    # the coded wire changes nothing the cloud computes: the stream equals the unstreamed split
    outs, stats = coded.stream(frames)
    for f, o in zip(frames, outs):
        assert torch.equal(o, coded(f))
    assert stats.n == 6
    assert "+deflate" in coded.report()


def test_brute_force_prices_codecs_like_coach():
    m = Sparse().eval()
    x = calibration()[:1]
    a = coach_fx.compile(m, (x,), strategy="coach", **settings())
    b = coach_fx.compile(m, (x,), strategy="brute-force", **settings())
    assert a.plan.score == pytest.approx(b.plan.score)
    assert a.plan.tensor_codecs == b.plan.tensor_codecs


def test_baselines_never_code():
    m = Sparse().eval()
    cm = coach_fx.compile(m, (calibration()[:1],), strategy="dads+int8", **settings())
    assert cm.plan.tensor_codecs == {}


def chain_with_costs():
    nodes = {"a": NodeData("a", 1000, 4000, True, 0.010, 0.001),
             "b": NodeData("b", 100, 400, True, 0.020, 0.002)}
    dag = LayerDAG({"x": NodeData("x", 3000, 12000, True, 0, 0)}, nodes, {"a": {"x"}, "b": {"a"}}, {}, ["b"])
    dag.tensor_codecs = {"deflate": {"a": {4: CodecCost("deflate", 200, 0.001, 0.0005, 150),
                                           8: CodecCost("deflate", 1000, 0.001, 0.0005, 900)}}}
    return dag


def test_evaluate_codes_only_where_shorter_and_prices_the_quantile():
    dag, net = chain_with_costs(), Network(8)
    p = evaluate(dag, {"a"}, {"a": 4}, net, tensor_codec="deflate")
    assert p.tensor_codecs == {"a": "deflate"}
    assert p.bytes_sent == 200 + TENSOR_HEADER_BYTES + MESSAGE_HEADER_BYTES
    assert p.t_end == pytest.approx(0.011) and p.t_cloud > 0.0025
    assert mean_bytes(dag, p) == p.bytes_sent - 50                    # a stream averages the mean
    q = evaluate(dag, {"a"}, {"a": 8}, net, tensor_codec="deflate")   # 1000 coded = 1000 packed: no gain
    assert q.tensor_codecs == {} and q.bytes_sent == math.ceil(1000 * 8 / 8) + TENSOR_HEADER_BYTES + MESSAGE_HEADER_BYTES
    assert evaluate(dag, {"a"}, {"a": 4}, net).tensor_codecs == {}     # no codec asked


def test_settings_name_bad_codecs():
    with pytest.raises(ValueError, match="sequence of codec names"):
        Settings.of(tensor_codecs="deflate")
    with pytest.raises(ValueError, match="unknown tensor codec"):
        Settings.of(tensor_codecs=("zstd",))
