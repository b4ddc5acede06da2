import socket
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "traces").is_dir():
        pytest.skip(f"needs ../shared/traces (not found at {SHARED}); a fresh clone has none")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch):
    """A developer's own $COACH_TOKEN must not sign or unlock the tests' plans: each test says
    which token it uses (subprocesses get theirs in their env)."""
    monkeypatch.delenv("COACH_TOKEN", raising=False)


@pytest.fixture
def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Tiny(nn.Module):
    """conv -> conv, relu, pool -> linear: a small model with several cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.conv(x))).flatten(1))


class StemHead(nn.Module):
    """conv -> relu | mean -> linear: the servers' tests split it after the relu."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="session")
def online_digits():
    """(model, OnlineModel, test inputs, test labels): the digits camera network compiled for
    online control on analytic costs (plans for 0.2, 1 and 50 Mbit/s, the end 10x slower),
    shared by the online unit tests and the deploy integration test (it takes ~30 s)."""
    from coach_fx.online import compile_online
    from coach_fx.settings import Device, Network
    from coach_fx.zoo.digits import digits_splits, load_digits_model

    torch.manual_seed(0)
    model = load_digits_model(32)
    (_, _), (xc, yc), (xt, yt) = digits_splits(frame=32)
    om = compile_online(model, (xc[:1],), network=Network(1.0), end=Device("end", 10),
                        calibration=(xc, yc), accuracy_budget=0.005, bands_mbps=[0.2, 1.0, 50.0],
                        costs="analytic", progress=False, grid=(4,), calibration_frames=600)
    return model, om, xt, yt


@pytest.fixture(scope="module")
def stem_head_split():
    """(compiled, eager) ``StemHead`` for 1x3x8x8 inputs, its 8-bit relu output crossing."""
    import coach_fx
    torch.manual_seed(0)
    m = StemHead().eval()
    cm = coach_fx.compile(m, (torch.randn(1, 3, 8, 8),), strategy="manual", end_nodes=["stem", "relu"],
                          bits=8, costs="analytic", progress=False)
    return cm, m


@pytest.fixture(scope="module")
def tiny_split():
    """(model, its annotated GraphModule, its LayerDAG, an example input) of ``Tiny``."""
    from coach_fx.driver import prepare
    from coach_fx.settings import Settings
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(1, 1, 8, 8)
    gm, inputs, dag = prepare(model, (x,), Settings.of(costs="analytic", progress=False))
    return model, gm, dag, x
