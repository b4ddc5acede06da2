"""coach run --input: images, .npy files and errors that name the problem; synthetic frames."""

import numpy as np
import pytest
import torch
from PIL import Image

from coach_fx.deploy.inputs import make_frames, read_inputs
from coach_fx.deploy.schema import InputSpec

SPEC = (InputSpec((1, 3, 8, 8), torch.float32),)


def test_a_folder_of_images_becomes_the_plan_s_inputs_in_name_order(tmp_path):
    imgs = [torch.randint(0, 256, (3, 16, 12), dtype=torch.uint8) for _ in range(3)]
    for k, img in enumerate(imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"f{k}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    frames = read_inputs(tmp_path, SPEC)
    got = list(frames)
    assert frames.count == 3 and [n for n, _ in got] == ["f0.png", "f1.png", "f2.png"]
    for img, (_, (x,)) in zip(imgs, got):
        want = torch.nn.functional.interpolate(img.float().div(255)[None], size=(8, 8), mode="bilinear",
                                               antialias=True, align_corners=False)
        assert x.shape == (1, 3, 8, 8) and torch.allclose(x, want)
    gray = list(read_inputs(tmp_path / "f0.png", (InputSpec((2, 1, 4, 4), torch.float32),)))
    assert gray[0][1][0].shape == (2, 1, 4, 4)


def test_npy_stacks_are_split_into_frames_without_pickle(tmp_path):
    arr = np.random.rand(4, 3, 8, 8).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    got = list(read_inputs(tmp_path / "a.npy", SPEC))
    assert [n for n, _ in got] == ["a.npy[0]", "a.npy[1]", "a.npy[2]", "a.npy[3]"]
    assert torch.equal(got[2][1][0], torch.from_numpy(arr[2:3]))
    np.save(tmp_path / "b.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        list(read_inputs(tmp_path / "b.npy", SPEC))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_inputs(tmp_path / "missing", SPEC)
    with pytest.raises(ValueError, match="no images"):
        read_inputs(tmp_path, SPEC)
    np.save(tmp_path / "c.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="neither the plan's input"):
        list(read_inputs(tmp_path / "c.npy", SPEC))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        list(read_inputs(tmp_path / "bad.png", SPEC))
    with pytest.raises(ValueError, match="2 inputs"):
        read_inputs(tmp_path / "c.npy", SPEC * 2)


def test_synthetic_frames_follow_the_specs_and_the_seed():
    specs = (InputSpec((2, 3), torch.float32), InputSpec((4,), torch.int64))
    a, b = make_frames(specs, 3, seed=1), make_frames(specs, 3, seed=1)
    assert len(a) == 3 and all(torch.equal(p, q) for fa, fb in zip(a, b) for p, q in zip(fa, fb))
    assert [(t.shape, t.dtype) for t in a[0]] == [((2, 3), torch.float32), ((4,), torch.int64)]
    assert not torch.equal(make_frames(specs, 1, seed=2)[0][0], a[0][0])
