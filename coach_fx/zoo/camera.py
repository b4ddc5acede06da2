"""torchvision models (ResNet-18, MobileNetV2, GoogLeNet) trained here, from scratch, on
camera-like frames of scikit-learn's bundled handwritten digits (real data, no download).

Each 8x8 digit becomes a ``frame`` x ``frame`` RGB frame: a smooth random background, the digit
upsampled to a random size and place, drawn in dark or coloured ink, plus sensor noise. The
digits are split once (fixed seed, disjoint): 40 % train, 30 % calibration, 30 % test; the
calibration and test splits (>= 530 frames each) are large enough for a statistical accuracy
bound. Training re-renders the training digits every epoch (new placement and background), so
~700 digits are enough for a from-scratch network.

Trained weights are cached as a ``.npz`` (plain arrays, never pickle) with a JSON sidecar that
records the recipe and the npz's sha256, under ``$COACH_CACHE`` or ``~/.cache/coach_fx``.

Example::

    >>> model = load_trained("resnet18")                    # doctest: +SKIP
    >>> splits = camera_digits()                            # doctest: +SKIP
    >>> top1(model, splits.test)                            # doctest: +SKIP
    0.96...

Command line: ``python -m coach_fx.zoo [--models resnet18 ...] [--frame 64]``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

FRAME = 64
"""Default frame size in pixels (the one place it is set)."""

TRAINED = ("resnet18", "mobilenet_v2", "googlenet")
"""The models this module trains and caches."""

EPOCHS: dict[str, int] = {"resnet18": 15, "mobilenet_v2": 40, "googlenet": 20}
"""Training epochs per model (test top-1 about 95 %; 7-13 minutes each on one core here)."""

DEFAULT_EPOCHS = 10
"""Epochs for a torchvision model not in :data:`EPOCHS`."""

VERSION = 1
"""Bump when rendering or training changes: cached weights of another version are retrained."""

BATCH = 64
LR = 2e-3
#: Peak learning rate where the default trains too slowly (mobilenet_v2 from scratch).
LRS: dict[str, float] = {"mobilenet_v2": 5e-3}

# Generator streams: one per use, so that e.g. rendering the test split does not depend on how
# many random numbers the training split consumed.
_STREAMS = {"train": 0, "calibration": 1, "test": 2, "shuffle": 3, "augment": 4}


@dataclass(frozen=True)
class Split:
    """Frames ``x`` (N, 3, frame, frame) float32 in [0, 1] and labels ``y`` (N,) long."""

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class Splits:
    """The three disjoint splits of the digits."""

    train: Split
    calibration: Split
    test: Split


@dataclass(frozen=True)
class FrameSet:
    """A labelled set of frames made from the digits: how one becomes a frame (``render``:
    (N, 8, 8) digits, frame size, generator -> (N, 3, frame, frame) in [0, 1]), at what size,
    how many frames each digit gives in the train (per epoch), calibration and test splits, the
    training epochs of its models and its version (a cached model of another is retrained)."""

    name: str
    render: Callable[[Tensor, int, torch.Generator], Tensor]
    frame: int
    per_digit: tuple[int, int, int]
    epochs: Mapping[str, int]
    version: int

    def size(self, frame: int | None) -> int:
        return self.frame if frame is None else frame


def _stream(seed: int, name: str) -> torch.Generator:
    # SeedSequence mixes (seed, stream) into well-separated, reproducible seeds.
    s = int(np.random.SeedSequence([seed, _STREAMS[name]]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # load_digits parses a CSV each call (~0.3 s); the arrays are read-only from here on.
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the camera digits need scikit-learn (pip install 'coach-fx[test]')") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, 8, 8) float32 in [0, 1] and labels (N,) long (fresh copies)."""
    images, labels = _digits_arrays()
    return torch.tensor(images), torch.tensor(labels)


def split_indices(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of the train (40 %), calibration (30 %) and test (30 %) digits: disjoint slices
    of one fixed-seed permutation of ``range(n)``.

    >>> [len(i) for i in split_indices(1797)]
    [718, 539, 540]
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(0.4 * n), int(0.7 * n)
    return perm[:a], perm[a:b], perm[b:]


def render(images_8x8: Tensor, frame: int, generator: torch.Generator) -> Tensor:
    """Camera-like RGB frames of 8x8 digits.

    ``images_8x8``: (N, 8, 8) in [0, 1] (ink intensity). Returns (N, 3, frame, frame) float32 in
    [0, 1]: a smooth random background (a light grey with a random 4x4 colour tint upsampled
    bicubically and a random illumination gradient), the digit upsampled bilinearly to 45-75 %
    of the frame at a random offset, blended as dark or coloured ink by its intensity, plus
    gaussian sensor noise (sigma 0.02). Deterministic for a given generator state.

    >>> x = render(torch.rand(5, 8, 8), 64, torch.Generator().manual_seed(0))
    >>> x.shape, x.dtype
    (torch.Size([5, 3, 64, 64]), torch.float32)
    """
    if images_8x8.dim() != 3 or images_8x8.shape[1:] != (8, 8):
        raise ValueError(f"render: expected (N, 8, 8) digits, got {tuple(images_8x8.shape)}")
    n, g = images_8x8.shape[0], generator

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    # Background: a light grey (paper or desk under some light) with low-frequency colour
    # blobs and a linear illumination gradient; lighter than any ink, so the digit always
    # stands out by its luminance (with ink as light as the paper, the networks here need
    # several times more steps to learn).
    grey = 0.55 + 0.3 * rand(n, 1, 1, 1)
    tint = 0.2 * (rand(n, 3, 4, 4) - 0.5)
    bg = grey + F.interpolate(tint, size=(frame, frame), mode="bicubic", align_corners=False)
    ramp = torch.linspace(-1.0, 1.0, frame)
    angle = 2 * torch.pi * rand(n)
    light = (torch.cos(angle)[:, None, None] * ramp[None, None, :]
             + torch.sin(angle)[:, None, None] * ramp[None, :, None])      # (n, frame, frame)
    bg = bg + (0.1 * rand(n))[:, None, None, None] * light[:, None]

    ink = place_digits(images_8x8, frame, g, 0.45, 0.30)           # (n, 1, frame, frame)

    # Ink: half the frames dark (pencil), half a saturated colour (pen: random hue,
    # HSV -> RGB with s in [0.7, 1], v in [0.3, 0.55]); slightly translucent.
    dark = 0.15 * rand(n, 3)
    hue, sat, val = 6 * rand(n, 1), 0.7 + 0.3 * rand(n, 1), 0.3 + 0.25 * rand(n, 1)
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue) % 6
    colour = val - val * sat * torch.minimum(k, 4 - k).clamp(0, 1)
    colour = torch.where((rand(n) < 0.5)[:, None], dark, colour)
    alpha = ink.clamp(0, 1) * (0.85 + 0.15 * rand(n))[:, None, None, None]
    out = bg * (1 - alpha) + colour[:, :, None, None] * alpha
    out = out + 0.02 * torch.randn(out.shape, generator=g)                  # sensor noise
    return out.clamp(0, 1).contiguous()


def place_digits(images_8x8: Tensor, frame: int, g: torch.Generator, smallest: float,
                 spread: float) -> Tensor:
    """The digits' ink (N, 1, frame, frame) in [0, 1]: each upsampled (bilinear) to a random
    ``smallest``..``smallest + spread`` of the frame at a random place, zero outside."""
    n = images_8x8.shape[0]

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    # The digit: size s (pixels) and top-left offset o; an affine grid maps each output pixel
    # to the 8x8 digit (bilinear, zero ink outside), all frames in one grid_sample call.
    size = frame * (smallest + spread * rand(n))
    ox, oy = (frame - size) * rand(n), (frame - size) * rand(n)
    scale = frame / size                                    # output normalized -> digit normalized
    cx, cy = 2 * (ox + size / 2) / frame - 1, 2 * (oy + size / 2) / frame - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = scale, -cx * scale
    theta[:, 1, 1], theta[:, 1, 2] = scale, -cy * scale
    grid = F.affine_grid(theta, [n, 1, frame, frame], align_corners=False)
    return F.grid_sample(images_8x8.float().unsqueeze(1), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)


CAMERA = FrameSet("camera", render, FRAME, (1, 1, 1), EPOCHS, VERSION)
"""Camera-like frames of the digits on smooth backgrounds (:func:`render`), 64x64."""


def camera_digits(frame: int = FRAME, seed: int = 0) -> Splits:
    """The digits as camera frames, split 40/30/30 into train/calibration/test (disjoint).

    Each split is rendered from its own generator stream of ``seed``, so it is the same on
    every call.

    >>> s = camera_digits(frame=64)                          # doctest: +SKIP
    >>> s.test.x.shape, len(s.calibration.y)                 # doctest: +SKIP
    (torch.Size([540, 3, 64, 64]), 539)
    """
    return digit_frames(CAMERA, frame, seed)


def digit_frames(frames: FrameSet, frame: int | None = None, seed: int = 0) -> Splits:
    """The splits of a frame set (its train split as one epoch renders it), each rendered from
    its own generator stream of ``seed``: the same on every call."""
    return Splits(*(_split(name, frames.size(frame), seed, frames) for name in ("train", "calibration", "test")))


_SPLITS = ("train", "calibration", "test")


def _split(name: str, frame: int, seed: int, frames: FrameSet = CAMERA) -> Split:
    """One split (rendered from its own stream, so alone it is the same): each of its digits
    ``frames.per_digit`` times, each time on another background and place."""
    images, labels = _digits()
    k = _SPLITS.index(name)
    idx = split_indices(len(labels), seed)[k].repeat(frames.per_digit[k])
    return Split(frames.render(images[idx], frame, _stream(seed, name)), labels[idx])


def build(name: str, num_classes: int = 10) -> nn.Module:
    """An untrained torchvision model ``name`` for (N, 3, frame, frame) input (frame >= 32).

    >>> build("googlenet")(torch.rand(2, 3, 64, 64)).shape   # doctest: +SKIP
    torch.Size([2, 10])
    """
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the zoo needs torchvision (pip install 'coach-fx[vision]')") from e
    kwargs: dict = {}
    if name == "googlenet":
        # No auxiliary heads (a plain graph, one output); init_weights=False uses PyTorch's
        # default init (torchvision's truncated-normal init needs scipy and warns otherwise).
        kwargs = {"aux_logits": False, "init_weights": False}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def top1(model: nn.Module, split: Split, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (no grad, in batches).

    >>> top1(load_trained("resnet18"), camera_digits().test)   # doctest: +SKIP
    """
    with torch.no_grad():
        hits = sum((model(split.x[i:i + batch]).argmax(1) == split.y[i:i + batch]).sum().item()
                   for i in range(0, len(split.y), batch))
    return hits / max(len(split.y), 1)


def train(name: str, frame: int = FRAME, seed: int = 0, epochs: int | None = None,
          limit: int | None = None, *, log: bool = True, frames: FrameSet = CAMERA) -> nn.Module:
    """Train ``name`` from scratch on the training split; returns it in eval mode.

    Reproducible from ``seed`` (at a fixed thread count): the initial weights, the shuffling
    and the per-epoch re-rendering of the training digits (new placement and background each
    epoch, as augmentation) all come from it. AdamW with a one-cycle schedule, batch 64.
    ``epochs`` defaults to :data:`EPOCHS`; ``limit`` trains on the first ``limit`` training
    digits only (fast tests). One line per epoch goes to stderr.

    >>> model = train("resnet18", frame=32, epochs=1, limit=64)   # doctest: +SKIP
    """
    epochs = frames.epochs.get(name, DEFAULT_EPOCHS) if epochs is None else epochs
    torch.manual_seed(seed)
    model = build(name)
    images, labels = _digits()
    idx = split_indices(len(labels), seed)[0]
    if limit is not None:
        idx = idx[:limit]
    idx = idx.repeat(frames.per_digit[0])    # each digit this many times an epoch
    images, labels = images[idx], labels[idx]
    n = len(labels)
    steps = -(-n // BATCH)
    # From scratch on ~700 digits with a few hundred steps: AdamW under a one-cycle schedule
    # learnt fastest here (SGD + one-cycle at 0.05 was at 27 % where this was at 86 %).
    lr = LRS.get(name, LR)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, pct_start=0.2,
                                                total_steps=max(epochs * steps, 1))
    shuffle, augment = _stream(seed, "shuffle"), _stream(seed, "augment")
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        x = frames.render(images, frame, augment)
        perm = torch.randperm(n, generator=shuffle)
        total, seen = 0.0, 0
        for i in range(0, n, BATCH):
            b = perm[i:i + BATCH]
            if len(b) < 2:          # BatchNorm cannot train on one sample; skip the leftover
                continue
            loss = F.cross_entropy(model(x[b]), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(b), seen + len(b)
        if log:
            print(f"zoo {frames.name} {name} {frame}px epoch {epoch + 1}/{epochs} loss {total / max(seen, 1):.4f} "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Cache: <root>/zoo_{name}_{frame}px_s{seed}_v{VERSION}.npz + .json sidecar


def _cache_root() -> Path:
    return Path(os.environ.get("COACH_CACHE", Path.home() / ".cache" / "coach_fx"))


def cache_paths(name: str, frame: int = FRAME, seed: int = 0, frames: FrameSet = CAMERA) -> tuple[Path, Path]:
    """The (npz, json sidecar) paths of the cached weights of ``name``."""
    kind = "" if frames is CAMERA else f"{frames.name}_"
    stem = _cache_root() / f"zoo_{kind}{name}_{frame}px_s{seed}_v{frames.version}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def recipe(name: str, frame: int = FRAME, seed: int = 0, epochs: int | None = None,
           limit: int | None = None, frames: FrameSet = CAMERA) -> dict:
    """What the cached weights were trained with; a cache entry with another recipe is stale."""
    r = {"name": name, "frame": frame, "seed": seed,
         "epochs": frames.epochs.get(name, DEFAULT_EPOCHS) if epochs is None else epochs,
         "lr": LRS.get(name, LR), "version": frames.version}
    if frames is not CAMERA:
        r["frames"], r["per_digit"] = frames.name, list(frames.per_digit)
    if limit is not None:           # only tests train on part of the split
        r["limit"] = limit
    return r


def _atomic_write(path: Path, data: bytes) -> None:
    # Write beside the target then rename: a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)                # mkstemp's 0600 would hide the cache from others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _try_load(name: str, npz: Path, side: Path, want: dict) -> tuple[nn.Module, dict] | None:
    """The cached model and its sidecar, or None (with a warning saying why) if unusable."""
    if not npz.exists() and not side.exists():
        return None                                   # nothing cached yet: no warning
    problem = None
    try:
        meta = json.loads(side.read_text())
        data = npz.read_bytes()
        if meta.get("recipe") != want:
            problem = f"recipe {meta.get('recipe')} != current {want}"
        elif hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            problem = "sha256 of the npz does not match the sidecar (corrupt or tampered)"
        else:
            # The hash was checked on these very bytes, so what np.load reads is what was hashed.
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
            model = build(name)
            model.load_state_dict(state, strict=True)
            return model.eval(), meta
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
    warnings.warn(f"coach_fx.zoo: cached weights {npz} unusable ({problem}); retraining",
                  RuntimeWarning, stacklevel=3)
    return None


def _train_and_cache(name: str, frame: int, seed: int, want: dict,
                     limit: int | None, frames: FrameSet = CAMERA) -> tuple[nn.Module, dict]:
    npz, side = cache_paths(name, frame, seed, frames)
    t0 = time.perf_counter()
    model = train(name, frame, seed, epochs=want["epochs"], limit=limit, frames=frames)
    train_s = time.perf_counter() - t0
    acc = top1(model, _split("test", frame, seed, frames))
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    data = buf.getvalue()
    meta = {"recipe": want, "sha256": hashlib.sha256(data).hexdigest(),
            "test_top1": acc, "train_s": round(train_s, 2)}
    npz.parent.mkdir(parents=True, exist_ok=True)
    # npz first: if we die between the two, the old sidecar's hash no longer matches -> retrain.
    _atomic_write(npz, data)
    _atomic_write(side, (json.dumps(meta, indent=1) + "\n").encode())
    print(f"zoo {frames.name} {name} {frame}px: test top-1 {acc:.4f}, trained in {train_s:.1f}s -> {npz}",
          file=sys.stderr, flush=True)
    return model, meta


def _load_or_train(name: str, frame: int | None, seed: int, epochs: int | None,
                   limit: int | None, frames: FrameSet = CAMERA) -> tuple[nn.Module, dict]:
    frame = frames.size(frame)
    want = recipe(name, frame, seed, epochs, limit, frames)
    npz, side = cache_paths(name, frame, seed, frames)
    got = _try_load(name, npz, side, want)
    return got if got is not None else _train_and_cache(name, frame, seed, want, limit, frames)


def load_trained(name: str, frame: int | None = None, seed: int = 0, *, epochs: int | None = None,
                 limit: int | None = None, frames: FrameSet = CAMERA) -> nn.Module:
    """The trained model ``name`` in eval mode: loaded from the cache, or trained and cached.

    The sidecar's recipe must equal the current one and the npz's sha256 the recorded one
    (checked before the npz is parsed); otherwise a warning names the file and the mismatch
    and the model is retrained, both files rewritten atomically. ``epochs``/``limit`` are for
    tests (they enter the recipe). ``frames``: the frame set it is trained on (default the
    camera frames; ``coach_fx.zoo.natural.NATURAL`` for natural-looking ones); ``frame``
    defaults to the set's size.

    >>> model = load_trained("mobilenet_v2")                 # doctest: +SKIP
    >>> model(camera_digits().test.x[:4]).shape              # doctest: +SKIP
    torch.Size([4, 10])
    """
    return _load_or_train(name, frame, seed, epochs, limit, frames)[0]


def trained_accuracy(name: str, frame: int | None = None, seed: int = 0, frames: FrameSet = CAMERA) -> float:
    """Test top-1 of the cached model ``name`` as recorded in its sidecar (trains if needed).

    >>> trained_accuracy("googlenet") >= 0.95                # doctest: +SKIP
    True
    """
    return float(_load_or_train(name, frame, seed, None, None, frames)[1]["test_top1"])
