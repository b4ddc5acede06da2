"""om.save / load_online: every plan's halves and run-time records read back as they were, the
weights stored once and shared, every file verified before it is read."""

import json

import pytest
import torch

from coach_fx.artifact import ArtifactError, load_half, plan_meta
from coach_fx.runtime.policy import OnlinePolicy
from coach_fx.saved_online import STORE, load_online

TOKEN = "a token for the saved online model"


@pytest.fixture(scope="module")
def saved(online_digits, tmp_path_factory):
    model, om, xt, _ = online_digits
    d = tmp_path_factory.mktemp("online")
    om.save(d, key=TOKEN, whole=True)
    return model, om, xt, d


def test_every_plan_reads_back_as_it_was(saved):
    model, om, xt, d = saved
    end = load_online(d, "end", key=TOKEN, whole=True)
    cloud = load_online(d, "cloud", key=TOKEN).cloud
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
    end = load_online(d, "end", key=TOKEN)
    ptrs = [{p.data_ptr() for p in v.end.module.parameters()} for v in end.plans.variants.values()]
    assert len(set.union(*ptrs)) < sum(len(p) for p in ptrs)  # halves share their tensors


def test_the_directory_is_verified_and_tells_what_it_holds(saved, tmp_path):
    _, _, _, d = saved
    assert plan_meta(d, TOKEN)["kind"] == "online"
    with pytest.raises(ArtifactError, match="online model"):
        load_half(d, "end", key=TOKEN)
    with pytest.raises(ArtifactError, match="not signed with this side's token"):
        load_online(d, "end", key="another token, not the one it was saved with")
    with pytest.raises(ValueError, match="side"):
        load_online(d, "both", key=TOKEN)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    doc = json.loads((bad / "online.json").read_text())
    doc["plans"]["0"]["cache"] = None                          # changed after it was signed
    (bad / "online.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="SHA-256|lists"):
        load_online(bad, "end", key=TOKEN)
