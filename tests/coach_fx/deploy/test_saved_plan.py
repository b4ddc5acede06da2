"""open_plan: a saved online model's (om.save) every plan's halves and run-time records read back
as they were, the weights stored once and shared, every file verified before it is read; a
compiled plan's (cm.save) sides, and each side reading only its own files."""

import json

import pytest
import torch

import coach_fx
from coach_fx.deploy import ArtifactError, open_plan
from coach_fx.deploy import files as plan_files
from coach_fx.deploy.files import STORE
from coach_fx.deploy.schema import InputSpec
from coach_fx.runtime.policy import OnlinePolicy, StaticPolicy

TOKEN = "a token for the saved online model"
KEY = "a-token-of-at-least-16-bytes"   # the compiled plan's (conftest.py)


@pytest.fixture(scope="module")
def saved(online_digits, tmp_path_factory):
    model, om, xt, _ = online_digits
    d = tmp_path_factory.mktemp("online")
    om.save(d, key=TOKEN, whole=True)
    return model, om, xt, d


def test_every_plan_reads_back_as_it_was(saved):
    model, om, xt, d = saved
    end = open_plan(d, "end", key=TOKEN, whole=True)
    cloud = open_plan(d, "cloud", key=TOKEN).cloud
    assert (end.kind, end.side, end.online) == ("online", "end", True)
    assert end.inputs == tuple(InputSpec(tuple(t.shape), t.dtype) for t in om.example_inputs)
    assert end.plans.bands == om.bands and end.plans.hold == om.settings.online.hold
    x = xt[:1]
    with torch.no_grad():
        assert torch.equal(end.whole(x), model(x))
        for pid, v in om.variants.items():
            w = end.plans.variants[pid]
            assert (w.profile, w.bits, w.cache, w.times, w.boundary) == (v.profile, v.bits, v.cache, v.times, v.boundary)
            a, b = v.end.module(x), w.end.module(x)
            assert all(torch.equal(p, q) for p, q in zip(a, b))
            assert (w.end.lookup_split is None) == (v.end.lookup_split is None)
            if v.end.lookup_split is not None:
                assert all(torch.equal(p, q) for p, q in zip(v.end.lookup_split[0](x), w.end.lookup_split[0](x)))
            if v.end_only:
                assert pid not in cloud and w.finish_on_end is None
                continue
            want = om.cloud[pid][0](*a)
            assert torch.equal(cloud[pid].module(*b), want) and torch.equal(w.finish_on_end.module(*b), want)
            two = tuple(torch.cat([t, t]) for t in b)     # the server batches requests of many ends
            assert torch.allclose(cloud[pid].batched(*two)[:1], want, atol=1e-5)
    # the same policy runs on what was read back
    assert OnlinePolicy.of(end.plans, "full").control.current == om.policy("full").control.current


def test_weights_are_stored_once_and_shared_as_in_memory(saved):
    model, om, _, d = saved
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (d / STORE).stat().st_size < 1.2 * weights        # once, not once per plan
    assert not list(d.glob("*_end.tensors"))
    end = open_plan(d, "end", key=TOKEN)
    ptrs = [{p.data_ptr() for p in v.end.module.parameters()} for v in end.plans.variants.values()]
    assert len(set.union(*ptrs)) < sum(len(p) for p in ptrs)  # halves share their tensors


def test_the_directory_is_verified_and_tells_what_it_holds(saved, tmp_path):
    _, _, _, d = saved
    meta = open_plan(d, key=TOKEN)
    assert (meta.kind, meta.side, meta.has_whole, meta.plans, dict(meta.cloud)) == ("online", "meta", True, None, {})
    with pytest.raises(ValueError, match="opened for its meta side"):
        meta.end_policy()
    with pytest.raises(ArtifactError, match="not signed with this side's token"):
        open_plan(d, "end", key="another token, not the one it was saved with")
    with pytest.raises(ValueError, match="side"):
        open_plan(d, "both", key=TOKEN)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    doc = json.loads((bad / "online.json").read_text())
    doc["plans"]["0"]["cache"] = None                          # changed after it was signed
    (bad / "online.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="SHA-256|lists"):
        open_plan(bad, "end", key=TOKEN)


@pytest.fixture(scope="module")
def compiled(net_plan):
    return net_plan


def _opened_files(monkeypatch):
    opened = []
    real = plan_files.os.open

    def spy(path, *args, **kw):
        opened.append(plan_files.os.path.basename(path))
        return real(path, *args, **kw)
    monkeypatch.setattr(plan_files.os, "open", spy)
    return opened


def test_a_compiled_plan_opens_for_each_side_reading_only_its_own_files(compiled, monkeypatch):
    cm, x, d = compiled
    opened = _opened_files(monkeypatch)
    meta = open_plan(d, key=KEY)
    assert opened == ["plan.json"]                      # no half read for the metadata
    assert (meta.kind, meta.boundary, meta.end_slowdown, meta.cloud_device) == \
        ("compiled", cm.boundary, cm.settings.end.slowdown, cm.settings.cloud.device)
    assert meta.inputs == (InputSpec((1, 3, 8, 8), torch.float32),) and meta.predicted == cm.predicted()
    opened.clear()
    end = open_plan(d, "end", key=KEY)
    assert sorted(opened) == ["end.graph.json", "end.tensors", "plan.json"]
    opened.clear()
    cloud = open_plan(d, "cloud", key=KEY)
    assert not any(f.startswith(("end.", "model.")) for f in opened)
    assert isinstance(end.end_policy(), StaticPolicy) and sorted(cloud.cloud) == [0]
    with torch.no_grad():
        assert torch.equal(cloud.cloud[0].module(*end.end(x)), cm(x))
        assert torch.equal(open_plan(d, "meta", key=KEY, whole=True).whole(x), cm.gm(x))
    with pytest.raises(ValueError, match="mode= is for an online model"):
        end.end_policy("full")
    with pytest.raises(ValueError, match="opened for its cloud side"):
        coach_fx.connect(cloud, "127.0.0.1:1", token=KEY)


def test_a_plan_file_whose_kind_disagrees_with_its_name_is_refused(compiled, tmp_path):
    _, _, d = compiled
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    doc = json.loads((bad / "plan.json").read_text())
    doc["kind"] = "online"
    (bad / "plan.json").write_text(json.dumps(doc))
    listed = json.loads((d / "manifest.json").read_text())["sha256"]
    plan_files.write_manifest(bad, [bad / n for n in listed], KEY.encode())   # re-signed, as any end could
    with pytest.raises(ArtifactError, match="says kind 'online'"):
        open_plan(bad, "end", key=KEY)
    del doc["inputs"]
    (bad / "plan.json").write_text(json.dumps({**doc, "kind": "compiled"}))
    plan_files.write_manifest(bad, [bad / n for n in listed], KEY.encode())
    with pytest.raises(ArtifactError, match="malformed"):
        open_plan(bad, "end", key=KEY)

