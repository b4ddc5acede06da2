"""Natural-looking frames of scikit-learn's digits, in the manner of MNIST-M: each digit blended
into a random patch of a real photograph that an installed package ships (scikit-image's
``skimage.data`` photographs and textures, scikit-learn's two sample images), 96x96 colour.

A frame is a random square crop of a random photograph (a side of 96 pixels up to the
photograph's shorter one, which is first brought to 256 pixels; flipped left-right half the
time), resampled to 96x96; the digit, upsampled to 50-80 % of the frame at a random place,
inverts the colours under it (``|patch - ink|``, as MNIST-M does), plus a little sensor noise.
Its JPEG is a natural image's: several KB at quality 90, against about 2 KB for the smooth
backgrounds of :mod:`coach_fx.zoo.camera`.

The digits are split as there (40/30/30, disjoint); each gives 14 frames to an epoch of the
training split (10,052 frames, rendered anew every epoch), 2 to the calibration split (1,078)
and 4 to the test split (2,160), each on another patch. Everything is reproducible from the
seed. Trained models are cached and verified as the camera zoo's (``load_trained(name,
frames=NATURAL)``).

Example::

    >>> splits = natural_digits()                                   # doctest: +SKIP
    >>> splits.test.x.shape                                         # doctest: +SKIP
    torch.Size([2160, 3, 96, 96])
    >>> model = load_trained("resnet18", frames=NATURAL)            # doctest: +SKIP
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from coach_fx.zoo.camera import FrameSet, Splits, digit_frames, place_digits

FRAME = 96
#: Photographs are brought to this shorter side first (crops are 96 to 256 pixels wide).
PHOTO_SIDE = 256
#: The photographs and textures of ``skimage.data`` used (grey ones as grey RGB).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                  "rocket", "brick", "camera", "grass", "gravel", "moon")
#: Training epochs per model on these frames (each epoch 10,052 frames).
EPOCHS = {"resnet18": 8, "mobilenet_v2": 12, "googlenet": 8}
VERSION = 1


@functools.lru_cache(maxsize=1)
def photos() -> tuple[Tensor, ...]:
    """The photographs, (3, H, W) float32 in [0, 1] with the shorter side ``PHOTO_SIDE``."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the natural frames need scikit-image and scikit-learn "
                          "(pip install 'coach-fx[test]')") from e
    arrays = [getattr(skimage.data, n)() for n in SKIMAGE_PHOTOS] + list(load_sample_images().images)
    out = []
    for a in arrays:
        t = torch.from_numpy(np.array(a)).float() / 255.0   # a copy: skimage returns read-only arrays
        t = t.expand(3, *t.shape) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
        scale = PHOTO_SIDE / min(t.shape[1:])
        size = (round(t.shape[1] * scale), round(t.shape[2] * scale))
        out.append(F.interpolate(t[None], size=size, mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(0, 1).contiguous())
    return tuple(out)


def render_natural(images_8x8: Tensor, frame: int, generator: torch.Generator) -> Tensor:
    """Natural-looking RGB frames of 8x8 digits: (N, 8, 8) in [0, 1] -> (N, 3, frame, frame)
    float32 in [0, 1] (see the module docstring). Deterministic for a given generator state.

    >>> x = render_natural(torch.rand(5, 8, 8), 96, torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> x.shape                                                                      # doctest: +SKIP
    torch.Size([5, 3, 96, 96])
    """
    if images_8x8.dim() != 3 or images_8x8.shape[1:] != (8, 8):
        raise ValueError(f"render_natural: expected (N, 8, 8) digits, got {tuple(images_8x8.shape)}")
    pics, n, g = photos(), images_8x8.shape[0], generator
    # every random number first, in one order: the frames do not depend on how they are grouped
    which = torch.randint(len(pics), (n,), generator=g)
    side_u, x_u, y_u = (torch.rand(n, generator=g) for _ in range(3))
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    bg = torch.empty(n, 3, frame, frame)
    for p in which.unique().tolist():
        idx = (which == p).nonzero().flatten()
        pic = pics[p]
        h, w = pic.shape[1:]
        side = frame + (min(h, w) - frame) * side_u[idx]
        x0, y0 = (w - side) * x_u[idx], (h - side) * y_u[idx]
        theta = torch.zeros(len(idx), 2, 3)   # output [-1, 1] -> the crop in the photo's [-1, 1]
        theta[:, 0, 0], theta[:, 0, 2] = side / w * flip[idx], (2 * x0 + side) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = side / h, (2 * y0 + side) / h - 1
        grid = F.affine_grid(theta, [len(idx), 3, frame, frame], align_corners=False)
        bg[idx] = F.grid_sample(pic[None].expand(len(idx), -1, -1, -1), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)
    ink = place_digits(images_8x8, frame, g, 0.5, 0.3)
    out = (bg - ink).abs() + 0.01 * torch.randn(bg.shape, generator=g)
    return out.clamp(0, 1).contiguous()


NATURAL = FrameSet("natural", render_natural, FRAME, (14, 2, 4), EPOCHS, VERSION)
"""The natural-looking frames: 96x96, 14 / 2 / 4 frames per digit in train / calibration / test."""


def natural_digits(frame: int = FRAME, seed: int = 0) -> Splits:
    """The natural frames' splits: train (one epoch's 10,052), calibration (1,078), test (2,160).

    >>> natural_digits().test.x.shape      # doctest: +SKIP
    torch.Size([2160, 3, 96, 96])
    """
    return digit_frames(NATURAL, frame, seed)


__all__ = ["EPOCHS", "FRAME", "NATURAL", "natural_digits", "photos", "render_natural"]
