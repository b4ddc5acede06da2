import pytest
import torch
from torch import nn

from coach_fx.driver import prepare
from coach_fx.dag import LayerDAG, NodeData
from coach_fx.dag_sets import PlanSpaceTooLarge
from coach_fx.settings import Settings

S = Settings.of(costs="analytic", progress=False)


def toy(edges, n, outputs=None):
    """LayerDAG over nodes v0..v{n-1} with data edges; input x feeds v0."""
    nodes = {f"v{i}": NodeData(f"v{i}", 10, 40, True, 1.0, 0.1) for i in range(n)}
    preds = {f"v{j}": {f"v{i}" for i, jj in edges if jj == j} for j in range(n)}
    preds["v0"] = preds["v0"] | {"x"}
    return LayerDAG({"x": NodeData("x", 10, 40, True, 0, 0)}, nodes, preds, {},
                    outputs or [f"v{n-1}"])


def test_diamond_closed_sets_crossing_articulation():
    d = toy([(0, 1), (0, 2), (1, 3), (2, 3)], 4)
    sets = list(d.closed_sets())
    assert len(sets) == 6   # {}, {0}, {0,1}, {0,2}, {0,1,2}, all
    assert all(d.is_closed(s) for s in sets)
    assert not d.is_closed({"v1"})
    assert d.crossing(set()) == ("x",)
    assert d.crossing({"v0", "v1"}) == ("v0", "v1")
    assert d.crossing(set(d.nodes)) == ()
    assert d.articulation_nodes() == ("v0", "v3")


def test_skip_edge_is_not_articulation():
    d = toy([(0, 1), (1, 2), (0, 3), (2, 3)], 4)
    assert d.articulation_nodes() == ("v0", "v3")


def test_brute_force_limit_message():
    d = toy([], 1)
    assert d.count_closed_sets(10) == 2
    wide = toy([(0, i) for i in range(1, 12)] + [(i, 12) for i in range(1, 12)], 13)
    with pytest.raises(PlanSpaceTooLarge, match="more than 100"):
        list(wide.closed_sets(limit=100))


class ShapeArith(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.tok = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n = x.shape[0]
        h = self.conv(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.tok.expand(n, -1, -1), h], dim=1)
        return self.fc(h[:, 0])


def test_weights_and_shape_arithmetic_fold():
    m = ShapeArith().eval()
    gm, _, dag = prepare(m, (torch.randn(2, 3, 6, 6),), S)
    # the shape lookup, its getitem and the parameter are not DAG nodes; tensor indexing is
    assert dag.nodes == ("conv", "flatten", "transpose", "expand", "cat", "getitem_1", "fc")
    assert "expand" in dag.nodes
    assert dag.nodes.index("conv") < dag.nodes.index("cat")
    assert dag.readers("conv") == {"flatten"}
    assert dag.info["conv"].bytes == 2 * 4 * 4 * 4 * 4


def test_torchvision_fold_counts():
    tv = pytest.importorskip("torchvision")
    m = tv.models.vit_b_16().eval()
    _, _, dag = prepare(m, (torch.randn(1, 3, 224, 224),), S)
    assert dag.count_closed_sets(10_000) == 143   # DESIGN: 143 after folding
