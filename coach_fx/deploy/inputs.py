"""Frames for a saved plan's inputs (``SavedPlan.inputs``): synthetic ones (``make_frames``, for
warm-ups, tests and ``coach run --synthetic``) and the user's own for ``coach run --input``: a folder of images (PNG/JPEG, decoded with
Pillow, resized to the plan's input shape, as floats in [0, 1]), a single image, a
``.npy`` file or a folder of them (loaded with ``allow_pickle=False``), or a video file where
this torchvision can decode one. Frames are read lazily, one at a time.

Example::

    >>> frames = read_inputs("photos/", (InputSpec((1, 3, 64, 64), torch.float32),))  # doctest: +SKIP
    >>> name, (x,) = next(iter(frames))                                                     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from coach_fx.deploy.schema import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


@dataclass(frozen=True)
class Frames:
    """Named model inputs from ``path``, shaped like the plan's one input; ``count`` where it is
    known before reading (a folder, an array), else None."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int | None

    def __iter__(self) -> Iterator[tuple[str, tuple[torch.Tensor]]]:
        p = self.path
        if p.is_dir():
            for f in _files(p):
                yield from self._file(f)
        else:
            yield from self._file(p)

    def _file(self, f: Path) -> Iterator[tuple[str, tuple[torch.Tensor]]]:
        suffix = f.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            yield f.name, (self._image(f),)
        elif suffix == ".npy":
            arr = np.load(f, allow_pickle=False)
            for k, x in enumerate(self._batches(torch.from_numpy(np.ascontiguousarray(arr)), f.name)):
                yield f"{f.name}[{k}]", (x,)
        elif suffix in VIDEO_SUFFIXES:
            for k, img in enumerate(_video_frames(f)):
                yield f"{f.name}#{k}", (self._fit(img),)
        else:
            raise ValueError(f"{f}: not an image ({', '.join(IMAGE_SUFFIXES)}), .npy or video file")

    def _image(self, f: Path) -> torch.Tensor:
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise ValueError("reading images needs Pillow: pip install 'coach_fx[vision]'") from None
        try:
            with Image.open(f) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: cannot decode the image ({e})") from None
        return self._fit(torch.from_numpy(rgb.copy()).permute(2, 0, 1))

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """A (3, H, W) uint8 image as the plan's input: its channels (gray = the mean), size and
        batch (the image repeated), floats in [0, 1]."""
        b, c, h, w = self.shape
        x = img.float().div(255).unsqueeze(0)
        if c == 1:
            x = x.mean(1, keepdim=True)
        elif c != 3:
            raise ValueError(f"the plan takes {c} channels; images have 1 or 3")
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                            align_corners=False)
        return x.expand(b, c, h, w).contiguous().to(self.dtype)

    def _batches(self, t: torch.Tensor, name: str) -> Iterator[torch.Tensor]:
        if tuple(t.shape) == self.shape:
            yield t.to(self.dtype)
            return
        b = self.shape[0]
        if tuple(t.shape[1:]) != self.shape[1:] or t.shape[0] % b:
            raise ValueError(f"{name}: an array of shape {tuple(t.shape)} is neither the plan's input "
                             f"{self.shape} nor a stack of them (N x {b}, {', '.join(map(str, self.shape[1:]))})")
        for k in range(0, t.shape[0], b):
            yield t[k:k + b].to(self.dtype)


def read_inputs(path: str | Path, inputs: Sequence[InputSpec]) -> Frames:
    """The frames at ``path`` for a plan whose inputs are ``inputs`` (``SavedPlan.inputs``: one
    input; images need it to be (N, 1 or 3, H, W))."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input {p}: no such file or folder")
    if len(inputs) != 1:
        raise ValueError(f"the plan takes {len(inputs)} inputs; --input feeds plans of one input "
                         "(use coach_fx.connect from Python for more)")
    shape, dtype = inputs[0].shape, inputs[0].dtype
    files = _files(p) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"--input {p}: no images, .npy or video files in it")
    needs_image = any(f.suffix.lower() not in (".npy",) for f in files)
    if needs_image and (len(shape) != 4 or not dtype.is_floating_point):
        raise ValueError(f"the plan's input is {shape} {dtype}: images need a float (N, C, H, W) input")
    count = None
    if all(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
        count = len(files)
    return Frames(p, shape, dtype, count)


def make_frames(inputs: Sequence[InputSpec], n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random frames matching a saved plan's ``inputs`` (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(n):
        xs = []
        for spec in inputs:
            if spec.dtype.is_floating_point:
                xs.append(torch.randn(spec.shape, generator=g).to(spec.dtype))
            else:
                xs.append(torch.randint(0, 10, spec.shape, generator=g).to(spec.dtype))
        frames.append(tuple(xs))
    return frames


def _files(folder: Path) -> list[Path]:
    known = IMAGE_SUFFIXES + (".npy",) + VIDEO_SUFFIXES
    if folder.is_file():
        return [folder]
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in known)


def _video_frames(f: Path) -> Iterator[torch.Tensor]:
    try:
        from torchvision.io import read_video
        video, _, _ = read_video(str(f), output_format="TCHW", pts_unit="sec")
    except Exception as e:  # noqa: BLE001 - no video backend in this torchvision, or a bad file
        raise ValueError(f"{f}: this torchvision cannot decode the video ({type(e).__name__}: {e}); "
                         "extract its frames as images and pass the folder") from None
    for img in video:
        yield img if img.shape[0] == 3 else img[:3]


__all__ = ["Frames", "IMAGE_SUFFIXES", "make_frames", "read_inputs"]
