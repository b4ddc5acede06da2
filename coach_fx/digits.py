"""A small CNN with residual and branching blocks, trained in seconds on scikit-learn's bundled
handwritten digits (real data, no download). Used by tests and benchmarks as a model whose
accuracy means something.

Splits (fixed seed, disjoint): 60 % train, 20 % calibration, 20 % test. The trained weights are
cached as a ``.npz`` (plain arrays, no pickle) under ``$COACH_CACHE`` or ``~/.cache/coach_fx``.

Example::

    >>> model = load_digits_model()                    # doctest: +SKIP
    >>> (xc, yc), (xt, yt) = digits_splits()[1:]       # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = _conv_bn(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + x)


class Branches(nn.Module):
    """Inception-style: three parallel branches concatenated."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.one = _conv_bn(cin, c, 1)
        self.three = nn.Sequential(_conv_bn(cin, c, 1), _conv_bn(c, c, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.one(x), self.three(x), self.pool(x)], 1)


class DigitsNet(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 16)
        self.res1 = Residual(16)
        self.branch = Branches(16, 16)
        self.down = nn.MaxPool2d(2)
        self.res2 = Residual(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.res2(self.down(self.branch(self.res1(self.stem(x)))))
        return self.head(h.mean((2, 3)))


def digits_splits(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((x_train, y_train), (x_calib, y_calib), (x_test, y_test)); x in [0, 1], shape (N,1,8,8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits model needs scikit-learn (pip install 'coach-fx[test]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _cache_path() -> Path:
    root = Path(os.environ.get("COACH_CACHE", Path.home() / ".cache" / "coach_fx"))
    return root / "digits_net_v1.npz"


def train_digits_model(epochs: int = 20, seed: int = 0) -> DigitsNet:
    torch.manual_seed(seed)
    (xtr, ytr), _, _ = digits_splits()
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_digits_model() -> DigitsNet:
    """The trained model (trained once, then loaded from the on-disk cache)."""
    path = _cache_path()
    model = DigitsNet()
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
        model.load_state_dict(state)
        return model.eval()
    model = train_digits_model()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    os.replace(tmp, path)
    return model


def accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    """Top-1 accuracy of ``fn`` (a model or a compiled model) on (x, y)."""
    with torch.no_grad():
        return (fn(x).argmax(1) == y).float().mean().item()
