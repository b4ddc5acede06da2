"""A small CNN with residual and branching blocks, trained in seconds on scikit-learn's bundled
handwritten digits (real data, no download). Used by tests and benchmarks as a model whose
accuracy means something.

Splits (fixed seed, disjoint): 40 % train, 30 % calibration, 30 % test (539 calibration
samples: enough for the default accuracy budget at 90 % confidence, see ``coach_fx.accuracy``). The trained weights are
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


class CameraDigitsNet(DigitsNet):
    """The digits network for camera-sized frames: the 8x8 digit seen as a 32x32 frame
    (bilinear upsampling), with a strided stem and a pool that bring it back to 8x8.

    An edge-style front end: the features after the stem (16x8x8) are smaller than the frame
    at few bits, so a cut there is worth it on a slow link; the 8x8 model's raw input (64
    bytes) is smaller than any of its features, so every plan for it sends the input.
    """

    input_shape = (1, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))


def digits_splits(seed: int = 0, frame: int = 8) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((x_train, y_train), (x_calib, y_calib), (x_test, y_test)); x in [0, 1], shape
    (N, 1, frame, frame) (``frame`` > 8: the digits upsampled bilinearly, as a camera sees them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits model needs scikit-learn (pip install 'coach-fx[test]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if frame != 8:
        x = nn.functional.interpolate(x, size=(frame, frame), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b = int(0.4 * len(y)), int(0.7 * len(y))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _cache_path(frame: int = 8) -> Path:
    root = Path(os.environ.get("COACH_CACHE", Path.home() / ".cache" / "coach_fx"))
    # v2: trained on the 40 % train split
    return root / ("digits_net_v2.npz" if frame == 8 else f"digits_net_{frame}px_v2.npz")


def _net(frame: int) -> DigitsNet:
    if frame == 8:
        return DigitsNet()
    if frame == 32:
        return CameraDigitsNet()
    raise ValueError(f"digits model: frame must be 8 or 32, got {frame}")


def train_digits_model(epochs: int = 20, seed: int = 0, frame: int = 8) -> DigitsNet:
    torch.manual_seed(seed)
    (xtr, ytr), _, _ = digits_splits(frame=frame)
    model = _net(frame)
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


def load_digits_model(frame: int = 8) -> DigitsNet:
    """The trained model for ``frame`` x ``frame`` inputs (8: the digits as they are; 32:
    :class:`CameraDigitsNet`), trained once, then loaded from the on-disk cache."""
    path = _cache_path(frame)
    model = _net(frame)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
        model.load_state_dict(state)
        return model.eval()
    model = train_digits_model(frame=frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    os.replace(tmp, path)
    return model


def accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    """Top-1 accuracy of ``fn`` (a model or a compiled model) on (x, y)."""
    with torch.no_grad():
        return (fn(x).argmax(1) == y).float().mean().item()
