"""The natural-looking frames: digits blended into patches of real photographs, reproducible,
with the split sizes the issue asks for and the JPEG sizes of natural images."""
import io

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits are scikit-learn's")
pytest.importorskip("skimage", reason="the photographs are scikit-image's")
pytest.importorskip("torchvision", reason="the zoo's models come from torchvision")

from coach_fx.zoo import camera  # noqa: E402
from coach_fx.zoo.natural import NATURAL, natural_digits, photos, render_natural  # noqa: E402


def test_photographs_are_real_and_colour():
    ps = photos()
    assert len(ps) == 14
    for p in ps:
        assert p.shape[0] == 3 and min(p.shape[1:]) == 256 and 0 <= p.min() and p.max() <= 1
    assert sum(float((p[0] - p[1]).abs().mean()) > 0.02 for p in ps) >= 8   # most are colour photographs


def test_the_splits_have_their_sizes_and_keep_the_digits_apart():
    s = natural_digits(frame=32)       # small frames: the sizes do not depend on the frame
    assert (len(s.train.y), len(s.calibration.y), len(s.test.y)) == (10_052, 1_078, 2_160)
    assert s.test.x.shape == (2_160, 3, 32, 32) and s.test.x.dtype == torch.float32
    assert 0 <= s.train.x.min() and s.train.x.max() <= 1
    _, labels = camera._digits()
    train, calib, test = camera.split_indices(len(labels))
    assert torch.equal(s.test.y, labels[test].repeat(4)) and torch.equal(s.calibration.y, labels[calib].repeat(2))
    assert set(s.test.y.tolist()) == set(range(10))


def test_frames_are_reproducible_and_each_copy_of_a_digit_differs():
    images, _ = camera._digits()
    a = render_natural(images[:16], 96, torch.Generator().manual_seed(3))
    b = render_natural(images[:16], 96, torch.Generator().manual_seed(3))
    c = render_natural(images[:16], 96, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 96, 96)
    assert NATURAL.frame == 96 and NATURAL.per_digit == (14, 2, 4)


def test_a_frame_s_jpeg_is_a_natural_image_s():
    from PIL import Image
    images, _ = camera._digits()
    x = render_natural(images[:48], 96, torch.Generator().manual_seed(0))
    sizes = []
    for f in x:
        buf = io.BytesIO()
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=90)
        sizes.append(len(buf.getvalue()))
    assert np.mean(sizes) > 3000          # several KB (the camera frames' smooth ones: about 2 KB at 64x64)
