"""A small compiled plan saved once for the deploy tests: a conv stem on the end, a linear
head in the cloud, signed with ``KEY`` and saved with the whole model."""

import pytest
import torch
from torch import nn

import coach_fx

KEY = "a-token-of-at-least-16-bytes"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


@pytest.fixture(scope="package")
def net_plan(tmp_path_factory):
    """(the compiled model, an example input, its plan directory signed with ``KEY``)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    cm = coach_fx.compile(Net().eval(), (x,), strategy="manual", end_nodes=["stem_0", "stem_1"], bits=8,
                          costs="analytic", progress=False)
    d = tmp_path_factory.mktemp("net_plan")
    cm.save(d, key=KEY, whole=True)
    return cm, x, d
