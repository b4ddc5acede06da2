"""Plan directories hold no code: halves as JSON graphs and raw tensors, checked against a
manifest before anything is read."""
import json

import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.deploy import ArtifactError, open_plan
from coach_fx.deploy.graphfile import GraphFileError, resolve_target


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        f = self.stem(x)
        return {"logits": self.head(f.mean((2, 3))), "feat": f.sum()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    cm = coach_fx.compile(m, (x,), strategy="manual", end_nodes=["stem_0", "stem_1", "stem_2"], bits=8,
                          costs="analytic", progress=False)
    d = tmp_path_factory.mktemp("plan")
    cm.save(d, whole=True)
    return cm, m, d


def test_halves_load_back_and_compute_what_the_split_did(saved):
    cm, m, d = saved
    end, cloud = open_plan(d, "end", whole=True), open_plan(d, "cloud").cloud[0]
    for _ in range(3):
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            got = cloud.module(*end.end(x))
            want = cm(x)
            assert torch.equal(got["logits"], want["logits"]) and torch.equal(got["feat"], want["feat"])
            assert torch.allclose(end.whole(x)["logits"], m(x)["logits"], atol=1e-6)
    # the end half holds the end's weights only
    assert sum(p.numel() for p in end.end.parameters()) < sum(p.numel() for p in m.parameters())


def test_no_file_is_a_pickle_or_an_archive(saved):
    _, _, d = saved
    names = sorted(p.name for p in d.iterdir())
    assert not any(n.endswith((".pt", ".pt2", ".pkl")) for n in names), names
    for p in d.iterdir():
        head = p.read_bytes()[:4]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), p.name   # pickle / zip


@pytest.mark.parametrize("victim", ["cloud.tensors", "cloud.graph.json", "plan.json"])
def test_a_changed_file_is_refused_before_it_is_read(saved, tmp_path, victim):
    import shutil
    _, _, d = saved
    copy = tmp_path / "plan"
    shutil.copytree(d, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        open_plan(copy, "cloud")


WALKS = ["aten.__class__.__class__", "aten.__class__.__getstate__", "aten.__class__.__str__",
         "aten.conv2d.__class__", "aten.conv2d.default.__call__", "coach.__dict__.get",
         "prims.__loader__.load_module", "aten.__getattr__.default", "operator.__builtins__",
         "operator.attrgetter", "builtins.eval", "os.system", "torch.load", "aten", "aten.conv2d",
         "aten.conv2d.default.extra", " aten.conv2d.default", "aten.nonexistent_op.default", 7, None]


@pytest.mark.parametrize("name", WALKS)
def test_a_graph_may_call_only_allow_listed_full_names(name):
    with pytest.raises(GraphFileError, match="not an allowed operator"):
        resolve_target(name)


def test_every_allow_listed_name_is_a_real_operator():
    from coach_fx.deploy.graph_ops import ALLOWED_OPS
    assert resolve_target("aten.conv2d.default") is torch.ops.aten.conv2d.default
    assert resolve_target("operator.getitem") is __import__("operator").getitem
    for name in ALLOWED_OPS:
        assert isinstance(resolve_target(name), torch._ops.OpOverload), name
        assert "__" not in name and name.count(".") == 2, name


def test_a_half_calling_an_unlisted_operator_is_saved_decomposed(tmp_path, caplog):
    """aten.logit is not on the list; its core ATen decomposition is, and computes the same."""
    from coach_fx.deploy.graph_ops import ALLOWED_OPS
    from coach_fx.deploy.graphfile import build_half, parse_graph, parse_tensors, save_exported
    assert "aten.logit.default" not in ALLOWED_OPS

    class Logit(nn.Module):
        def forward(self, x):
            return torch.logit(x, eps=1e-3) * 2

    x = torch.rand(3, 4)
    save_exported(torch.export.export(Logit(), (x,)), tmp_path / "h")
    assert "outside the operators" in caplog.text and "aten.logit.default" in caplog.text
    doc = parse_graph((tmp_path / "h.graph.json").read_bytes(), "h")
    assert "aten.logit.default" not in {r.get("target") for r in doc["nodes"]}
    raw = (tmp_path / "h.tensors").read_bytes()
    half = build_half(doc, parse_tensors(torch.frombuffer(bytearray(raw), dtype=torch.uint8), "h"), "h")
    assert torch.allclose(half(x), Logit()(x), atol=1e-6)


def test_a_directory_without_manifest_is_refused(saved, tmp_path):
    import shutil
    _, _, d = saved
    copy = tmp_path / "plan"
    shutil.copytree(d, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        open_plan(copy, "end")
    doc = json.loads((d / "manifest.json").read_text())
    assert set(doc["sha256"]) == {p.name for p in d.iterdir()} - {"manifest.json"}


KEY = "a-token-of-at-least-16-bytes"


@pytest.fixture(scope="module")
def signed(saved, tmp_path_factory):
    cm, m, _ = saved
    d = tmp_path_factory.mktemp("signed")
    cm.save(d, key=KEY)
    return d


def test_a_signed_plan_loads_only_with_its_token(signed):
    assert open_plan(signed, "cloud", key=KEY).cloud[0].module is not None
    open_plan(signed, "cloud")                       # no token here: the hashes are still checked
    with pytest.raises(ArtifactError, match="not signed with this side's token"):
        open_plan(signed, "cloud", key="another-token-of-16-bytes")


def test_a_side_with_a_token_refuses_an_unsigned_plan(saved):
    _, _, d = saved
    with pytest.raises(ArtifactError, match="not signed"):
        open_plan(d, "end", key=KEY)


@pytest.mark.parametrize("forged", [None, "0" * 64])
def test_rewritten_files_with_rewritten_hashes_are_refused(signed, tmp_path, forged):
    """Whoever can write the directory can recompute the SHA-256s, not the HMAC."""
    import hashlib
    import shutil
    copy = tmp_path / "plan"
    shutil.copytree(signed, copy)
    data = bytearray((copy / "cloud.tensors").read_bytes())
    data[-1] ^= 1
    (copy / "cloud.tensors").write_bytes(bytes(data))
    doc = json.loads((copy / "manifest.json").read_text())
    doc["sha256"]["cloud.tensors"] = hashlib.sha256(bytes(data)).hexdigest()
    doc.pop("hmac_sha256")
    if forged:
        doc["hmac_sha256"] = forged
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="signed"):
        open_plan(copy, "cloud", key=KEY)


def test_the_batched_cloud_half_is_saved_and_batches(saved, signed):
    cm, m, _ = saved
    half = open_plan(signed, "cloud", key=KEY).cloud[0]
    assert half.batched is not None
    xs = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        floats = cm._train_end(xs)      # the end half on floats: fake-quantized per sample
        got = half.batched(*floats if isinstance(floats, tuple) else (floats,))
        want = m(xs)
    assert torch.allclose(got["logits"], want["logits"], atol=5e-2)


def _tensor_file(path):
    from coach_fx.deploy.graphfile import parse_tensors
    return parse_tensors(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), str(path))


def _graph(path, tensors):
    from coach_fx.deploy.graphfile import build_half, parse_graph
    return build_half(parse_graph(path.read_bytes(), str(path)), tensors, str(path))


def test_halves_saved_with_a_shared_store_write_each_weight_once_and_share_it(tmp_path):
    from coach_fx.deploy.graphfile import save_exported, write_store
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    store = {}
    with torch.no_grad():
        save_exported(torch.export.export(m, (x,)), tmp_path / "a", store)
        whole = dict(store)
        save_exported(torch.export.export(m.stem, (x,)), tmp_path / "b", store)
    assert not (tmp_path / "a.tensors").exists()
    assert store == whole         # the stem's tensors are the whole model's: each stored once
    write_store(store, tmp_path / "w.tensors")
    tensors = _tensor_file(tmp_path / "w.tensors")
    a, b = _graph(tmp_path / "a.graph.json", tensors), _graph(tmp_path / "b.graph.json", tensors)
    with torch.no_grad():
        assert torch.equal(a(x)["logits"], m(x)["logits"]) and torch.equal(b(x), m.stem(x))
    shared = {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}
    assert len(shared) == sum(1 for _ in m.stem.parameters())      # the same tensors, not copies
    with pytest.raises(GraphFileError, match="shared store"):
        _graph(tmp_path / "a.graph.json", None)
    with pytest.raises(GraphFileError, match="not in the shared store"):
        _graph(tmp_path / "a.graph.json", {})


def test_tensors_are_aligned_in_their_file_and_share_its_buffer(tmp_path):
    from coach_fx.deploy.graphfile import ALIGN, parse_tensors, write_store
    ts = {"a": torch.randn(3), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2, 7).half(),
          "empty": torch.empty(0, 4)}
    write_store(ts, tmp_path / "t.tensors")
    buf = torch.frombuffer(bytearray((tmp_path / "t.tensors").read_bytes()), dtype=torch.uint8)
    got = parse_tensors(buf, "t")
    assert set(got) == set(ts) and all(torch.equal(got[k], ts[k]) for k in ts)
    for k in ("a", "b", "c"):   # views of the file's one buffer, not copies
        assert got[k].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert (got[k].data_ptr() - buf.data_ptr()) % ALIGN == 0


@pytest.mark.parametrize("header", [b"[]", b"{", b'{"a": 5}', b'{"a": {"dtype": "float32", "shape": [-1], '
                                    b'"offset": 0, "nbytes": 0}}', b'{"a": {"dtype": "object", "shape": [1], '
                                    b'"offset": 0, "nbytes": 8}}', b'{"a": {"dtype": "float32", "shape": [4], '
                                    b'"offset": 0, "nbytes": 16}}'])
def test_a_bad_tensor_file_is_a_clear_error(header):
    from coach_fx.deploy.graphfile import parse_tensors
    raw = len(header).to_bytes(8, "little") + header + bytes(8)
    with pytest.raises(GraphFileError, match="tensor|header"):
        parse_tensors(torch.frombuffer(bytearray(raw), dtype=torch.uint8), "t")
