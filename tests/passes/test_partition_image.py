"""partition(codecs=...): a model input that crosses travels as JPEG/PNG images."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coach_fx.passes._compat import tree_flatten
from coach_fx.driver import prepare
from coach_fx.passes.partition import partition
from coach_fx.passes import imagecodec as ic
from coach_fx.runtime.codec import entries_to_payload, payload_to_entries
from coach_fx.runtime.links import InProcessLink
from coach_fx.runtime.cloud import CloudWorker
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.policy import StaticPolicy
from coach_fx.runtime.wire import FLAG_ERROR, QUANT, Entry, WireError, decode, encode
from coach_fx.settings import Settings

S = Settings.of(costs="analytic", progress=False)


class Tiny(nn.Module):
    """The input is read by the first conv and again at the end, so it may cross a later cut."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.d(torch.relu(self.c(x))) + x.mean()


def frames(n=2, size=16):
    return F.interpolate(torch.rand(n, 3, 4, 4), size=(size, size), mode="bilinear", align_corners=False)


def prepared(x):
    m = Tiny().eval()
    gm, _, dag = prepare(m, (x,), S)
    return m, gm, dag


def test_cloud_only_input_travels_as_jpeg():
    x = frames()
    m, gm, _ = prepared(x)
    e, c, b = partition(gm, (), {}, codecs={"x": "jpeg90"})
    (cr,) = b.crossings
    assert (cr.name, cr.kind, cr.codec, cr.n_payload, cr.shape) == ("x", "image", "jpeg90", 1, (2, 3, 16, 16))
    assert b.n_payload == 1
    with torch.no_grad():
        payload = e(x)
        assert len(payload) == 1 and payload[0].dtype == torch.uint8 and payload[0].dim() == 1
        assert torch.equal(payload[0], ic.encode(x, "jpeg90"))
        assert torch.equal(c(*payload), m(ic.roundtrip(x, "jpeg90")))
        # other frames of the same shape go through the same halves
        x2 = frames()
        assert torch.equal(c(*e(x2)), m(ic.roundtrip(x2, "jpeg90")))


def test_later_cut_where_the_input_still_crosses():
    x = frames()
    m, gm, _ = prepared(x)
    e, c, b = partition(gm, ("c", "relu"), {"relu": 8}, codecs={"x": "png"})
    assert [(cr.name, cr.kind) for cr in b.crossings] == [("x", "image"), ("relu", "quant")]
    assert b.n_payload == 4
    e32, c32, b32 = partition(gm, ("c", "relu"), {}, codecs={"x": "jpeg90"})
    with torch.no_grad():
        want = m.d(torch.relu(m.c(x))) + ic.roundtrip(x, "jpeg90").mean()
        assert torch.equal(c32(*e32(x)), want)
        out8 = c(*e(x))
        assert (out8 - m(x)).abs().max() < 0.05


def test_train_mode_is_the_roundtrip_with_a_straight_through_gradient():
    x = frames()
    m, gm, _ = prepared(x)
    for end_nodes in ((), ("c", "relu")):
        e, c, _ = partition(gm, end_nodes, {}, mode="train", codecs={"x": "jpeg75"})
        xr = x.clone().requires_grad_()
        out = c(*e(xr))
        if not end_nodes:
            assert torch.equal(out.detach(), m(ic.roundtrip(x, "jpeg75")).detach())
        out.sum().backward()
        assert xr.grad is not None and xr.grad.abs().sum() > 0
        assert m.d.weight.grad is not None


def test_codec_for_something_else_is_refused():
    x = frames()
    _, gm, _ = prepared(x)
    with pytest.raises(ValueError, match=r"model inputs only; 'relu' is not one"):
        partition(gm, (), {}, codecs={"relu": "jpeg90"})
    with pytest.raises(ValueError, match=r"jpeg<q>"):
        partition(gm, (), {}, codecs={"x": "jpeg0"})
    lin = nn.Linear(5, 2).eval()
    gm2, _, _ = prepare(lin, (torch.rand(2, 5),), S)
    name = next(n.name for n in gm2.graph.nodes if n.op == "placeholder")
    with pytest.raises(ValueError, match=r"cannot travel as 'png'"):
        partition(gm2, (), {}, codecs={name: "png"})


def test_end_only_plan_ignores_the_codec():
    x = frames()
    m, gm, dag = prepared(x)
    e, c, b = partition(gm, dag.nodes, {}, codecs={"x": "jpeg90"})
    assert b.end_only and not b.crossings
    with torch.no_grad():
        assert torch.equal(e(x), m(x))


def test_through_the_wire_and_its_checks():
    x = frames()
    m, gm, _ = prepared(x)
    e, c, b = partition(gm, ("c", "relu"), {}, codecs={"x": "jpeg90"})
    with torch.no_grad():
        payload = e(x)
        msg = encode(3, payload_to_entries(b, payload))
        _, _, _, entries = decode(bytes(msg))
        got = entries_to_payload(b, entries)
        assert torch.equal(c(*got), c(*payload))
    k = [cr.kind for cr in b.crossings].index("image")
    name = b.crossings[k].name
    # a quantized entry, even where the cloud accepts per-request bits, is refused
    bad = list(entries)
    bad[k] = Entry.quantized(torch.zeros(1536, dtype=torch.uint8), 0.1, 0, 8, (2, 3, 16, 16), torch.float32)
    assert bad[k].kind == QUANT
    with pytest.raises(WireError, match=rf"image crossing {name} \(jpeg90\): expected a raw 1-D uint8"):
        entries_to_payload(b, bad, accept_quantized=True)
    bad[k] = Entry.raw(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(WireError, match=rf"image crossing {name}"):
        entries_to_payload(b, bad)
    limit = ic.max_payload_bytes((2, 3, 16, 16), "jpeg90")
    bad[k] = Entry.raw(torch.zeros(limit + 1, dtype=torch.uint8))
    with pytest.raises(WireError, match=rf"image crossing {name} \(jpeg90\): payload of {limit + 1} bytes exceeds"):
        entries_to_payload(b, bad)


def test_in_process_pipeline_and_a_bad_frame_fails_only_itself():
    x = frames(1)
    m, gm, _ = prepared(x)
    e, c, b = partition(gm, (), {}, codecs={"x": "jpeg90"})
    _, spec = tree_flatten(m(x))
    stream = [frames(1) for _ in range(6)]
    link = InProcessLink(100.0)
    cloud = CloudWorker({0: (c, b)}, link.cloud).start()
    outs, stats = EndWorker(link.end, spec, StaticPolicy(e, b), StreamConfig(timeout_s=10)).run(stream)
    cloud.join(5)
    with torch.no_grad():
        for f, o in zip(stream, outs):
            assert torch.equal(o, m(ic.roundtrip(f, "jpeg90")))
    assert stats.n == 6 and stats.bytes_sent > 0
    # a hostile frame (PNG header claiming 60000x60000) gets an error reply, the worker goes on
    worker = CloudWorker({0: (c, b)}, InProcessLink(100.0).cloud)
    bomb = ic.SAMPLE_HEADER.pack(40, 0.01, 0) + b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    reply = worker.handle(bytes(encode(1, [Entry.raw(torch.frombuffer(bytearray(bomb), dtype=torch.uint8))])))
    _, _, flags, ents = decode(reply)
    assert flags & FLAG_ERROR and b"sample 0 header: JPEG" in bytes(ents[0].value().tolist())
    good = worker.handle(bytes(encode(2, payload_to_entries(b, e(stream[0])))))
    assert not decode(good)[2] & FLAG_ERROR


def test_a_saved_plan_carries_the_codec_and_any_coded_length(tmp_path):
    import coach_fx
    from coach_fx.deploy import open_plan

    x = frames(1)
    cm = coach_fx.compile(Tiny().eval(), (x,), strategy="cloud-only+jpeg75", costs="analytic", progress=False)
    cm.save(tmp_path)
    end, cloud = open_plan(tmp_path, "end"), open_plan(tmp_path, "cloud")
    assert end.boundary == cm.boundary and cloud.boundary.crossings[0].codec == "jpeg75"
    for f in (frames(1), torch.rand(1, 3, 16, 16)):     # coded lengths differ
        with torch.no_grad():
            p = end.end(f)
            assert torch.equal(cloud.cloud[0].module(*p), cm.cloud_module(*cm.end_module(f)))
