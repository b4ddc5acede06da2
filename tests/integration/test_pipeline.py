"""The in-process pipeline, and the same plan run for real in two processes over gloo."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.deploy import open_plan
from coach_fx.deploy.inputs import make_frames
from coach_fx.runtime.links import InProcessLink
from coach_fx.runtime.cloud import Arrival, CloudWorker
from coach_fx.runtime.config import Batching, StreamConfig
from coach_fx.runtime.end import EndWorker, RemoteError
from coach_fx.runtime.policy import StaticPolicy

# the installed console script: run from the source folder, "python -m coach_fx.cli" would
# import the source tree, which has no coach_fx.passes (pyproject maps it from passes/)
COACH = str(Path(sys.executable).with_name("coach"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.a(h) + h
        return {"logits": self.head(y.mean((2, 3))), "feat": y.mean()}


def compiled(end_nodes=("stem", "relu", "a"), bits=8, **kw):
    m = Net().eval()
    x = torch.randn(1, 3, 12, 12)
    return coach_fx.compile(m, (x,), strategy="manual", end_nodes=list(end_nodes), bits=bits,
                            costs="analytic", progress=False, network=coach_fx.Network(50), **kw), m


def test_stream_matches_direct_calls_in_order():
    cm, m = compiled()
    assert len(cm.plan.cut) == 2                       # the skip and the branch cross
    frames = [torch.randn(1, 3, 12, 12) for _ in range(12)]
    outs, stats = cm.stream(frames)
    with torch.no_grad():
        for f, o in zip(frames, outs):
            want = cm(f)
            assert torch.equal(o["logits"], want["logits"]) and torch.equal(o["feat"], want["feat"])
    assert stats.n == 12 and len(stats.latencies) == 12
    assert stats.bytes_sent == 12 * cm.plan.bytes_sent
    assert 0 <= stats.bubble_ratio <= 1 and stats.throughput > 0
    assert "throughput" in stats.table()


def test_sequential_mode_and_end_only():
    cm, _ = compiled()
    outs, st = cm.stream([torch.randn(1, 3, 12, 12) for _ in range(4)], pipelined=False)
    assert len(outs) == 4
    cm2, m = compiled(end_nodes=[n for n in compiled()[0].dag.nodes])
    x = torch.randn(1, 3, 12, 12)
    outs, st = cm2.stream([x])
    assert st.bytes_sent == 0 and torch.allclose(outs[0]["logits"], m(x)["logits"])


def test_stream_rejects_wrong_shape_before_sending():
    cm, _ = compiled()
    with pytest.raises(coach_fx.InputError, match="expected shape"):
        cm.stream([torch.randn(1, 3, 12, 12), torch.randn(2, 3, 12, 12)])


def test_cloud_failure_reaches_the_end_side():
    cm, _ = compiled()
    link = InProcessLink(50.0)
    def broken(*a):
        raise RuntimeError("out of memory on the cloud")
    cloud = CloudWorker({0: (broken, cm.boundary)}, link.cloud).start()
    end = EndWorker(link.end, cm.out_spec, StaticPolicy(cm.end_module, cm.boundary), StreamConfig(timeout_s=5))
    with pytest.raises(RemoteError, match="out of memory"):
        end.run([torch.randn(1, 3, 12, 12)])
    end.close()
    cloud.join(1)


def _coach(*args):
    return [COACH, *map(str, args)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cm, _ = compiled(bits=4)
    d = tmp_path_factory.mktemp("plan")
    cm.save(d)
    return cm, d


def test_save_loads_each_half_alone(saved):
    cm, d = saved
    end, cloud = open_plan(d, "end"), open_plan(d, "cloud")
    assert end.boundary == cm.boundary == cloud.boundary
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        out = cloud.cloud[0].module(*end.end(x))
        assert torch.allclose(out["logits"], cm(x)["logits"], atol=1e-5)
    assert sum(p.numel() for p in end.end.parameters()) < sum(p.numel() for p in cm.gm.parameters())


def test_two_processes_over_gloo_match_in_process(saved, tmp_path, free_port):
    cm, d = saved
    port = free_port
    frames = make_frames(open_plan(d).inputs, 6, seed=3)
    want, _ = cm.stream(frames)
    serve = subprocess.Popen(_coach("serve", d, "--port", port, "--timeout", 30, "--link", "gloo", "--host", "0.0.0.0"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = tmp_path / "out.npz"
        run = subprocess.run(_coach("run", d, "--port", port, "--synthetic", 6, "--seed", 3,
                                    "--output", out, "--timeout", 30, "--link", "gloo"),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "throughput" in run.stdout
        got = np.load(out)
        for i, w in enumerate(want):
            assert np.allclose(got[f"o{i}_0"], w["logits"].numpy(), atol=1e-5)
            assert np.allclose(got[f"o{i}_1"], w["feat"].numpy(), atol=1e-5)
        assert serve.wait(timeout=30) == 0
    finally:
        serve.kill()


def test_killed_cloud_gives_clear_error_within_timeout(saved, free_port):
    cm, d = saved
    port = free_port
    serve = subprocess.Popen(_coach("serve", d, "--port", port, "--slowdown", 50, "--link", "gloo", "--host", "0.0.0.0"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        serve.stdout.readline()     # the cloud has loaded its half and waits for the end
        run = subprocess.Popen(_coach("run", d, "--port", port, "--synthetic", 2000, "--timeout", 15, "--link", "gloo"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        serve.stdout.readline()     # the end side is connected
        time.sleep(1)           # streaming by now (2000 frames at slowdown 50 last long)
        serve.kill()
        # it never hangs: communicate's timeout fails the test if the end side does not exit
        out, _ = run.communicate(timeout=120)
        assert run.returncode != 0
        assert "cloud" in out and ("gone" in out or "no message" in out or "within" in out), out
    finally:
        serve.kill()
        if run.poll() is None:
            run.kill()


def test_cloud_batches_what_arrived_together_with_the_same_replies():
    from coach_fx.passes._compat import tree_flatten
    from coach_fx.runtime.codec import payload_to_entries
    from coach_fx.runtime.wire import FLAG_CONTROL, FLAG_ERROR, decode, encode

    class Plain(nn.Module):          # an output with the batch dimension: it batches
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x)).mean((2, 3)))

    m = Plain().eval()
    cm = coach_fx.compile(m, (torch.randn(1, 3, 12, 12),), strategy="manual", end_nodes=["stem"],
                          bits=32, costs="analytic", progress=False)
    link = InProcessLink(None, None)
    cloud = CloudWorker({0: (cm.cloud_module, cm.boundary)}, link.cloud, StreamConfig(batching=Batching(8)))
    frames = [torch.randn(1, 3, 12, 12) for _ in range(5)]
    msgs = [(encode(i, payload_to_entries(cm.boundary, cm.end_module(f)), 0, 0), Arrival(0.001 * i, 0.002 * i))
            for i, f in enumerate(frames)]
    served = cloud.served
    batched = cloud.handle_batch(msgs)
    assert cloud.served - served == 5
    _, spec = tree_flatten(m(frames[0]))
    from coach_fx.runtime.codec import entries_to_output
    from coach_fx.runtime.wire import ReplyStats
    for i, (reply, f) in enumerate(zip(batched, frames)):
        req, _, flags, entries = decode(reply)
        assert req == i and not flags & FLAG_ERROR
        assert torch.allclose(entries_to_output(entries, spec), m(f), atol=1e-5)
        # request bytes, wire s, arrival s, ends sharing the cloud (one here)
        st = ReplyStats.of(entries)
        assert (st.request_bytes, st.wire_s, st.arrival_s, st.ends) == (float(len(msgs[i][0])), 0.001 * i, 0.002 * i, 1.0)
    # a close among them: message by message, the close answered with None
    close = (encode((1 << 64) - 1, [], FLAG_CONTROL), Arrival())
    assert cloud.handle_batch([msgs[0], close])[1] is None
    # an unknown plan gets its own error, the others their results
    bad = (encode(9, payload_to_entries(cm.boundary, cm.end_module(frames[0])), 0, 7), Arrival())
    replies = cloud.handle_batch([msgs[0], bad])
    assert not decode(replies[0])[2] & FLAG_ERROR and decode(replies[1])[2] & FLAG_ERROR
