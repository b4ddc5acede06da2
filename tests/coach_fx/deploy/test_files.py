"""Plan directories are only data: every file read once, its size and hash checked against the
manifest before it is parsed, and a graph that names anything but an allow-listed operator
refused before any of it runs (signed or not)."""
import hashlib
import hmac
import json
import os
import shutil

import pytest
import torch

from coach_fx.deploy import files as plan_files
from coach_fx.deploy import open_plan
from coach_fx.deploy.files import ArtifactError, PlanFiles
from coach_fx.deploy.graphfile import GraphFileError

KEY = "a-token-of-at-least-16-bytes"


@pytest.fixture(scope="module")
def plan(net_plan):
    return net_plan


def resign(d, key=KEY):
    """Rewrite the manifest's hashes and sizes for the files as they are now, signed with ``key``
    (what an attacker holding the token, as every end does, can do)."""
    doc = json.loads((d / "manifest.json").read_text())
    doc["sha256"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in doc["sha256"]}
    doc["bytes"] = {n: (d / n).stat().st_size for n in doc["sha256"]}
    if key is None:
        doc.pop("hmac_sha256", None)
    else:
        doc["hmac_sha256"] = plan_files._manifest_mac(key.encode(), doc["sha256"], doc["bytes"])
    (d / "manifest.json").write_text(json.dumps(doc))


def copy_of(plan, tmp_path):
    d = tmp_path / "plan"
    shutil.copytree(plan[2], d)
    return d


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("target", ["aten.__class__.__class__", "aten.__class__.__getstate__",
                                    "aten.__class__.__str__", "builtins.exec", "aten.linear",
                                    "operator.attrgetter", "prims.__loader__.load_module"])
def test_a_graph_naming_anything_off_the_allow_list_is_refused_before_it_runs(plan, tmp_path, target, signed,
                                                                             monkeypatch):
    d = copy_of(plan, tmp_path)
    g = json.loads((d / "cloud.graph.json").read_text())
    calls = [r for r in g["nodes"] if r["op"] == "call_function"]
    calls[len(calls) // 2]["target"] = target
    (d / "cloud.graph.json").write_text(json.dumps(g))
    resign(d, KEY if signed else None)
    built = []
    monkeypatch.setattr(torch.fx, "GraphModule", lambda *a: built.append(a))   # nothing may be built
    with pytest.raises(GraphFileError, match="not an allowed operator"):
        open_plan(d, "cloud", key=KEY if signed else None)
    assert built == []


def test_a_file_swapped_after_it_is_opened_changes_nothing_loaded(plan, tmp_path, monkeypatch):
    """The loader opens each file once and parses the bytes it hashed: replacing the graph file
    (with one whose manifest entry would match nothing) once it is open leaves the load as it was."""
    cm, x, _ = plan
    d = copy_of(plan, tmp_path)
    evil = json.loads((d / "cloud.graph.json").read_text())
    [r for r in evil["nodes"] if r["op"] == "call_function"][0]["target"] = "aten.__class__.__class__"
    opened = []
    real_open = os.open

    def open_then_swap(path, *args, **kw):
        fd = real_open(path, *args, **kw)
        opened.append(os.path.basename(path))
        if str(path).endswith("cloud.graph.json"):
            (d / "swap.json").write_text(json.dumps(evil))
            os.replace(d / "swap.json", path)      # the next open would see the attacker's file
        return fd

    monkeypatch.setattr(plan_files.os, "open", open_then_swap)
    half = open_plan(d, "cloud", key=KEY).cloud[0]
    assert opened.count("cloud.graph.json") == 1 and opened.count("cloud.tensors") == 1
    assert len(opened) == len(set(opened))       # no file of the plan opened twice
    with torch.no_grad():
        assert torch.equal(half.module(*cm.end_module(x)), cm(x))


def test_a_file_rewritten_in_place_while_read_is_refused(plan, tmp_path, monkeypatch):
    d = copy_of(plan, tmp_path)
    real_open = os.open

    def open_then_rewrite(path, *args, **kw):
        fd = real_open(path, *args, **kw)
        if str(path).endswith("cloud.tensors"):
            with open(path, "r+b") as f:     # the same file, one byte changed
                f.seek(-1, 2)
                last = f.read(1)
                f.seek(-1, 2)
                f.write(bytes([last[0] ^ 1]))
        return fd

    monkeypatch.setattr(plan_files.os, "open", open_then_rewrite)
    with pytest.raises(ArtifactError, match="SHA-256"):
        open_plan(d, "cloud", key=KEY)


def test_a_file_of_another_size_is_refused_unread(plan, tmp_path, monkeypatch):
    d = copy_of(plan, tmp_path)
    with open(d / "cloud.tensors", "ab") as f:
        f.write(b"\0" * 10)
    files = PlanFiles(d, KEY)
    read = []
    real = plan_files.hashlib.sha256
    monkeypatch.setattr(plan_files.hashlib, "sha256", lambda *a: read.append(1) or real(*a))
    with pytest.raises(ArtifactError, match="lists"):
        files.tensors("cloud.tensors")
    assert read == []      # refused on its size: not a byte hashed


def test_a_fifo_planted_for_a_file_is_refused_without_hanging(plan, tmp_path):
    d = copy_of(plan, tmp_path)
    (d / "cloud.tensors").unlink()
    os.mkfifo(d / "cloud.tensors")
    with pytest.raises(ArtifactError, match="not a regular file"):
        open_plan(d, "cloud", key=KEY)


def test_a_huge_crossing_shape_is_refused_before_anything_is_allocated(plan, tmp_path):
    d = copy_of(plan, tmp_path)
    meta = json.loads((d / "plan.json").read_text())
    meta["boundary"]["crossings"][0]["shape"] = [1, 8, 100_000, 1000]   # 3 GB of floats
    (d / "plan.json").write_text(json.dumps(meta))
    resign(d)
    with pytest.raises(ArtifactError, match="the wire carries at most"):
        open_plan(d, "cloud", key=KEY)


def test_the_manifest_lists_sizes_and_its_signature_covers_them(plan, tmp_path):
    d = copy_of(plan, tmp_path)
    doc = json.loads((d / "manifest.json").read_text())
    assert doc["bytes"] == {n: (d / n).stat().st_size for n in doc["sha256"]}
    doc["bytes"]["cloud.tensors"] += 1
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not signed with this side's token"):
        PlanFiles(d, KEY)
    mac = hmac.new(b"x" * 16, b"", hashlib.sha256).hexdigest()
    doc["hmac_sha256"] = mac
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not signed with this side's token"):
        PlanFiles(d, KEY)


def test_a_manifest_of_an_older_version_says_save_again(plan, tmp_path):
    d = copy_of(plan, tmp_path)
    doc = json.loads((d / "manifest.json").read_text())
    del doc["bytes"]
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="save the plan again"):
        PlanFiles(d)
