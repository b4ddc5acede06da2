import pytest
import torch
from torch import nn

from coach_fx.driver import prepare
from coach_fx.passes.partition import partition
from coach_fx.settings import Settings

S = Settings.of(costs="analytic", progress=False)


def split_run(model, inputs, end_nodes, bits):
    gm, inputs, dag = prepare(model, inputs, S)
    e, c, b = partition(gm, end_nodes(dag) if callable(end_nodes) else end_nodes, bits(dag) if callable(bits) else bits)
    with torch.no_grad():
        payload = e(*inputs)
        out = payload if b.end_only else c(*payload)
    return gm, dag, e, c, b, out


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(h))) + h
        return self.head(y.mean((2, 3)))


def test_residual_cut_crosses_two_tensors_and_matches_eager():
    m = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    _, dag, e, c, b, out = split_run(m, (x,), lambda d: d.ancestors(["a"]), {})
    assert len(b.crossings) == 2   # the skip (relu) and the branch (a)
    assert torch.allclose(out, m(x), atol=1e-6)
    gm, dag, e, c, b, out8 = split_run(m, (x,), lambda d: d.ancestors(["a"]),
                                      lambda d: {n: 8 for n in d.nodes})
    assert [cr.kind for cr in b.crossings] == ["quant", "quant"]
    assert (out8 - m(x)).norm() / m(x).norm() < 0.03


def test_cloud_only_and_end_only():
    m = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    _, dag, e, c, b, out = split_run(m, (x,), (), {"x": 32})
    assert [cr.name for cr in b.crossings] == ["x"]
    assert torch.equal(out, m(x))
    _, dag, e, c, b, out = split_run(m, (x,), lambda d: d.nodes, {})
    assert b.end_only and not b.crossings
    assert torch.equal(out, m(x))
    assert len(list(c.parameters())) == 0


class IntsAndDicts(nn.Module):
    """Several inputs, an integer tensor and a size crossing, and a dict output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)

    def forward(self, tokens, scale):
        idx = tokens % 10
        h = self.emb(idx) * scale
        n = h.size(1)
        y = self.fc(h).reshape(-1, n * 6)
        return {"y": y, "pair": (idx, y.sum())}


def test_non_float_crossing_and_dict_output():
    m = IntsAndDicts().eval()
    toks = torch.randint(0, 100, (2, 4))
    scale = torch.tensor(0.5)
    gm, dag, e, c, b, out = split_run(m, (toks, scale), lambda d: d.ancestors(["mod"]),
                                     lambda d: {n: 4 for n in d.nodes})
    kinds = {cr.name: cr.kind for cr in b.crossings}
    assert kinds["mod"] == "raw"          # an integer tensor is never quantized
    ref = m(toks, scale)
    assert torch.equal(out["pair"][0], ref["pair"][0])
    assert torch.allclose(out["y"], ref["y"])


def test_parameters_disjoint_and_complete():
    m = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    _, dag, e, c, b, _ = split_run(m, (x,), lambda d: d.ancestors(["a"]), {})
    pe = {id(p) for p in e.parameters()}
    pc = {id(p) for p in c.parameters()}
    assert not pe & pc
    assert pe | pc == {id(p) for p in m.parameters()}


def test_unknown_node_and_bad_bits():
    m = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    gm, _, dag = prepare(m, (x,), S)
    with pytest.raises(ValueError, match="unknown"):
        partition(gm, {"nope"}, {})
    with pytest.raises(ValueError, match="bits"):
        partition(gm, dag.ancestors(["stem"]), {"stem": 7})


def test_end_half_exports():
    m = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    gm, _, dag = prepare(m, (x,), S)
    e, c, _ = partition(gm, dag.ancestors(["a"]), {n: 4 for n in dag.nodes})
    ep = torch.export.export(e, (x,))
    got = ep.module()(x)
    want = e(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class MutatesAfterCloudReader(nn.Module):
    """`h.relu_()` on the end after the cloud has (in graph order) read h."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.cloud_head = nn.Conv2d(4, 4, 1)
        self.end_branch = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.c1(x)
        a = self.cloud_head(h)
        h.relu_()
        b = self.end_branch(h)
        return a + b


def test_in_place_ops_survive_capture_and_split():
    m = MutatesAfterCloudReader().eval()
    x = torch.randn(1, 3, 6, 6)
    gm, _, dag = prepare(m, (x,), S)
    assert "relu_" in dag.nodes                       # not dropped as dead code
    assert "relu_" in dag.preds("end_branch")         # reads h after the change: follows it
    end = dag.ancestors(["end_branch"])
    for mode in ("deploy", "train"):
        e, c, b = partition(gm, end, {}, mode=mode)
        with torch.no_grad():
            assert torch.allclose(c(*e(x)), m(x), atol=1e-6)
    e, c, b = partition(gm, end, {"c1": 8})
    with torch.no_grad():
        assert ((c(*e(x)) - m(x)).norm() / m(x).norm()) < 0.03
