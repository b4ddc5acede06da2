"""The cloud worker survives what an end sends: every bad frame is that request's error reply."""
import struct

import pytest
import torch

from coach_fx.passes._compat import tree_flatten
from coach_fx.passes.partition import partition
from coach_fx.runtime.cloud import Arrival, CloudWorker
from coach_fx.runtime.codec import entries_to_output, payload_to_entries
from coach_fx.runtime.links import InProcessLink
from coach_fx.runtime.wire import (CLOSE_ID, FLAG_CONTROL, FLAG_ERROR, FLAG_RESULT, VERSION, decode,
                                   encode)


def split(tiny_split):
    model, gm, dag, x = tiny_split
    relu = next(n for n in dag.nodes if n.startswith("relu"))
    end, cloud, boundary = partition(gm, dag.ancestors([relu]), {relu: 8})
    return model, end, cloud, boundary, x


def request(end, boundary, x, req):
    with torch.no_grad():
        return bytes(encode(req, payload_to_entries(boundary, end(x))))


def mutations(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Frames an end (or a proxy) may send, each with the check that must name it."""
    flipped = bytearray(good)
    flipped[-1] ^= 0x10
    version = bytearray(good)
    struct.pack_into("<H", version, 4, VERSION + 1)
    return {"empty": (b"", "shorter"), "truncated": (good[:-7], "checksum|payload"),
            "flipped bit": (bytes(flipped), "checksum"), "version": (bytes(version), "version"),
            "garbage": (b"\x00" * 64, "magic"), "extended": (good + b"\x01\x02", "checksum|payload")}


@pytest.mark.parametrize("name", ["empty", "truncated", "flipped bit", "version", "garbage", "extended"])
def test_a_bad_frame_gets_its_error_and_the_next_request_its_answer(tiny_split, name):
    model, end, cloud, boundary, x = split(tiny_split)
    worker = CloudWorker({0: (cloud, boundary)}, None)
    good = request(end, boundary, x, 5)
    bad, check = mutations(good)[name]
    req, _, flags, entries = decode(worker.handle(bad, Arrival()))
    assert flags & FLAG_ERROR and flags & FLAG_RESULT
    text = bytes(entries[0].value().tolist()).decode()
    assert text.startswith("WireError") and any(w in text for w in check.split("|")), text
    if name in ("flipped bit", "truncated", "extended"):
        assert req == 5                    # the header still names the request
    assert worker.rejected == 1
    req, _, flags, entries = decode(worker.handle(good, Arrival()))
    assert req == 5 and not flags & FLAG_ERROR
    with torch.no_grad():
        want = model(x)
    out = entries_to_output(entries, tree_flatten(want)[1])
    assert torch.allclose(out, want, atol=0.1)


def test_the_serving_loop_goes_on_after_bad_frames_in_a_batch(tiny_split):
    """Good and bad frames that arrive together (one batch) each get their reply, in order,
    and the worker stops only at the end's close."""
    model, end, cloud, boundary, x = split(tiny_split)
    link = InProcessLink()
    worker = CloudWorker({0: (cloud, boundary)}, link.cloud)
    sent = [request(end, boundary, x, 0), b"junk", request(end, boundary, x, 2)[:-3],
            request(end, boundary, x, 3), bytes(encode(CLOSE_ID, [], FLAG_CONTROL))]
    for m in sent:
        link.end.send(m)
    worker.start()
    replies = [decode(link.end.recv(10.0)) for _ in range(5)]
    worker.join(10.0)
    assert worker.error is None and worker.rejected == 2
    assert [r[0] for r in replies] == [0, 0, 2, 3, CLOSE_ID]
    assert [bool(r[2] & FLAG_ERROR) for r in replies] == [False, True, True, False, False]


def test_a_cloud_device_is_checked_before_anything_runs():
    with pytest.raises(ValueError, match="a cloud device is"):
        CloudWorker({}, None, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            CloudWorker({}, None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cloud_half_on_cuda_answers_as_on_the_cpu(tiny_split):
    model, end, cloud, boundary, x = split(tiny_split)
    msgs = [(request(end, boundary, x, k), Arrival()) for k in range(4)]
    cpu = CloudWorker({0: (cloud, boundary)}, None)
    gpu = CloudWorker({0: (cloud, boundary)}, None, device="cuda")
    for a, b in zip(cpu.handle_batch(msgs), gpu.handle_batch(msgs)):
        ya, yb = decode(a)[3][0].value(), decode(b)[3][0].value()
        assert torch.allclose(ya, yb, atol=1e-4)


def test_a_reply_reports_how_many_ends_share_the_cloud(tiny_split):
    model, end, cloud, boundary, x = split(tiny_split)
    worker = CloudWorker({0: (cloud, boundary)}, None)
    reply = worker.handle(request(end, boundary, x, 3), Arrival(0.001, 2.0, ends=5))
    stats = decode(reply)[3][-1].value().tolist()
    assert stats[1:] == [len(request(end, boundary, x, 3)), 0.001, 2.0, 5.0]
