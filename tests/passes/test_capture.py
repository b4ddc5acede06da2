import pytest
import torch
from torch import nn

from coach_fx.passes.capture import CaptureError, capture


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_leaf_policy_builtin_and_user():
    x = torch.randn(2, 4)
    gm = capture(Net(), (x,))
    assert gm.meta["coach_capture"] == "symbolic_trace"
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"block.a", "block.b", "head"}
    gm2 = capture(Net(), (x,), leaf_modules=[Block])
    assert {n.target for n in gm2.graph.nodes if n.op == "call_module"} == {"block", "head"}
    gm3 = capture(Net(), (x,), leaf_modules=["block"])
    assert "block" in {n.target for n in gm3.graph.nodes if n.op == "call_module"}


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.fc(x) * 2
        return self.fc(x)


class DataBranch(nn.Module):
    """Control flow on tensor values: neither fx nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


def test_fallback_to_export():
    m = ShapeBranch().eval()
    x = torch.randn(3, 4)
    gm = capture(m, (x,))
    assert gm.meta["coach_capture"] == "torch.export"
    assert torch.allclose(gm(x), m(x))


def test_data_dependent_error_names_module_and_construct():
    with pytest.raises(CaptureError) as e:
        capture(DataBranch(), (torch.randn(3, 4),))
    msg = str(e.value)
    assert "DataBranch" in msg
    assert "x.sum() > 0" in msg
    assert "control flow" in msg
