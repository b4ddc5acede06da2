"""The camera digits and the zoo's cache (tiny training runs only: the full models take minutes)."""

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the camera digits need scikit-learn's bundled digits")
pytest.importorskip("torchvision", reason="the zoo's models come from torchvision")

from coach_fx.zoo import camera  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return camera.camera_digits()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COACH_CACHE", str(tmp_path))
    return tmp_path


def test_splits_disjoint_sizes_and_labels():
    images, labels = camera._digits()
    parts = camera.split_indices(len(labels), seed=0)
    sets = [set(p.tolist()) for p in parts]
    assert [len(s) for s in sets] == [718, 539, 540]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(len(labels)))
    assert all(len(p) >= 530 for p in parts[1:])       # enough for the accuracy bound
    s = camera.camera_digits(frame=32)
    for split, idx in zip((s.train, s.calibration, s.test), parts):
        assert torch.equal(split.y, labels[idx])


def test_splits_shapes_dtype_range(splits):
    for split, n in zip((splits.train, splits.calibration, splits.test), (718, 539, 540)):
        assert split.x.shape == (n, 3, camera.FRAME, camera.FRAME)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.long
        assert split.x.min() >= 0 and split.x.max() <= 1
        assert set(split.y.unique().tolist()) == set(range(10))


def test_splits_deterministic_per_seed():
    a, b = camera.camera_digits(frame=32, seed=0), camera.camera_digits(frame=32, seed=0)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.x, b.train.x)
    c = camera.camera_digits(frame=32, seed=1)
    assert not torch.equal(a.test.y, c.test.y)


def test_frames_vary_in_position_and_background(splits):
    x = splits.test.x[:200]
    means = x.mean((1, 2, 3))
    assert means.std() > 0.03                           # backgrounds differ in brightness
    colours = x.mean((2, 3))
    assert (colours.max(1).values - colours.min(1).values).std() > 0.005   # and in tint
    # the ink (the darkest pixels) sits at different places in different frames
    lum = x.mean(1)
    dark = lum < lum.flatten(1).quantile(0.05, dim=1)[:, None, None]
    rows = torch.arange(x.shape[-1], dtype=torch.float32)
    cy = (dark.float().sum(2) * rows).sum(1) / dark.float().sum((1, 2))
    cx = (dark.float().sum(1) * rows).sum(1) / dark.float().sum((1, 2))
    assert cy.std() > 3 and cx.std() > 3
    # one digit rendered twice: a different frame each time (training augmentation)
    digit = camera._digits()[0][:1]
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(camera.render(digit, 64, g), camera.render(digit, 64, g))


def test_render_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        camera.render(torch.rand(2, 1, 8, 8), 64, torch.Generator())


@pytest.mark.parametrize("name", camera.TRAINED)
def test_build_gives_logits_at_frame(name):
    model = camera.build(name).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, camera.FRAME, camera.FRAME)).shape == (2, 10)


TINY = {"frame": 32, "epochs": 1, "limit": 64}      # one step of resnet18 at 32 px


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny cache entry, trained once: (npz bytes, sidecar text, the model)."""
    root = tmp_path_factory.mktemp("zoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COACH_CACHE", str(root))
        model = camera.load_trained("resnet18", **TINY)
        npz, side = camera.cache_paths("resnet18", frame=32)
    return npz.read_bytes(), side.read_text(), model


@pytest.fixture
def cached(cache, tiny):
    """The tiny entry copied into this test's cache: the (npz, sidecar) paths."""
    npz, side = camera.cache_paths("resnet18", frame=32)
    npz.write_bytes(tiny[0])
    side.write_text(tiny[1])
    return npz, side


def test_cache_files_and_sidecar(cached):
    npz, side = cached
    assert npz.name == "zoo_resnet18_32px_s0_v1.npz" and side.name == "zoo_resnet18_32px_s0_v1.json"
    meta = json.loads(side.read_text())
    assert meta["recipe"] == camera.recipe("resnet18", frame=32, epochs=1, limit=64)
    assert {"name": "resnet18", "frame": 32, "seed": 0, "epochs": 1, "version": camera.VERSION,
            "limit": 64}.items() <= meta["recipe"].items()
    assert meta["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert 0 <= meta["test_top1"] <= 1 and meta["train_s"] > 0
    with np.load(npz, allow_pickle=False) as z:         # plain arrays, no pickled objects
        assert all(z[k].dtype != object for k in z.files)


def test_cache_round_trip(cached, tiny, monkeypatch):
    monkeypatch.setattr(camera, "train", lambda *a, **k: pytest.fail("retrained a valid cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = camera.load_trained("resnet18", **TINY)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny[2](x), loaded(x))


def test_training_is_reproducible(tiny):
    again = camera.train("resnet18", frame=32, epochs=1, limit=64, log=False)
    first, second = tiny[2].state_dict(), again.state_dict()
    assert not again.training
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tampered_npz_warns_and_retrains_without_loading_it(cached, monkeypatch):
    npz, side = cached
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.warns(RuntimeWarning, match=r"zoo_resnet18_32px_s0_v1\.npz.*sha256"):
        model = camera.load_trained("resnet18", **TINY)
    assert calls == []                                  # the tampered bytes were never parsed
    assert not model.training
    meta = json.loads(side.read_text())
    assert meta["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()   # both rewritten


def test_recipe_mismatch_retrains(cached):
    npz, side = cached
    meta = json.loads(side.read_text())
    meta["recipe"]["epochs"] = 99
    side.write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="recipe"):
        camera.load_trained("resnet18", **TINY)
    assert json.loads(side.read_text())["recipe"]["epochs"] == 1


def test_missing_sidecar_retrains(cached):
    npz, side = cached
    side.unlink()
    with pytest.warns(RuntimeWarning, match="FileNotFoundError"):
        camera.load_trained("resnet18", **TINY)
    assert side.exists()
