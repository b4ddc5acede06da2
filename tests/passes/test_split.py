import pytest
import torch
import torch.fx as fx
from torch import nn

from coach_fx.passes.split import SplitError, split_at


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, y):
        h = self.stem(x)
        r = torch.relu(self.b(torch.relu(self.a(h))) + h) * self.scale
        return r, r.mean((2, 3))


@pytest.fixture(scope="module")
def gm():
    torch.manual_seed(0)
    return fx.symbolic_trace(Res().eval())


def names(g):
    return [n.name for n in g.graph.nodes]


@pytest.mark.parametrize("at", ["stem_0", "stem_2", "relu_1", "mul"])
def test_tail_of_head_is_the_graph(gm, at):
    x, y = torch.randn(2, 1, 6, 6), torch.randn(2)
    head, tail = split_at(gm, at)
    mid = head(x, y)                              # the head takes what the graph takes
    assert isinstance(mid, tuple) and len(mid) == 1
    with torch.no_grad():
        for got, want in zip(tail(*mid), gm(x, y)):
            assert torch.equal(got, want)
    assert at not in names(tail)[1:] and "x" not in names(tail)
    # the same parameters, not copies
    ptrs = {p.data_ptr() for p in gm.parameters()}
    assert all(p.data_ptr() in ptrs for p in [*head.parameters(), *tail.parameters()])


def test_a_node_that_does_not_split_the_graph_is_refused(gm):
    with pytest.raises(SplitError, match="reads 'stem_2'"):
        split_at(gm, "a")                         # the skip connection reads the stem after it
    with pytest.raises(SplitError, match="no operation named 'nope'"):
        split_at(gm, "nope")
    with pytest.raises(SplitError, match="no operation"):
        split_at(gm, "x")


def test_an_input_read_after_the_node_is_refused():
    class Late(nn.Module):
        def forward(self, x, y):
            return torch.relu(x) + y

    with pytest.raises(SplitError, match="'y' is read after it"):
        split_at(fx.symbolic_trace(Late()), "relu")
