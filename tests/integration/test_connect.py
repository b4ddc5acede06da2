"""coach_fx.connect against coach_fx.serve over loopback TCP: the user's own inputs through a
served plan, one call, futures and an ordered stream; a killed cloud and an error reply with a
fallback. Outcomes only (counts, equality, order); the longest wait between two results is
printed, not asserted."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import coach_fx
from coach_fx.deploy.service import parse_address
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.links.base import LinkError
from coach_fx.runtime.session import RequestFailed

TOKEN = b"a shared secret for the test"   # conftest.PLAN_TOKEN: the plan fixture is signed with it
COACH = str(Path(sys.executable).with_name("coach"))
#: How long the frozen-cloud test stops the cloud (issue #16 asks about 20 s: set it so to see
#: that case; the suite keeps it shorter, the behaviour is the same after the first timeout)
FREEZE_S = float(os.environ.get("COACH_TEST_FREEZE_S", "6"))
ENV = {**os.environ, "COACH_TOKEN": TOKEN.decode()}   # never the token on a command line


def coach_serve(plan_dir, port):
    """``coach serve`` as a subprocess, once it listens."""
    proc = subprocess.Popen([COACH, "serve", str(plan_dir), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    line = proc.stdout.readline()
    assert "coach serve: cloud half" in line, line + proc.stdout.read()
    return proc


def close_to(m, f, r):
    with torch.no_grad():
        return torch.allclose(r, m(f), atol=1e-2)


def test_call_submit_and_stream_give_the_model_s_answers_in_order(plan):
    cm, m, d = plan
    with coach_fx.serve(d, port=0, token=TOKEN) as server:
        host, port = server.address
        frames = [torch.randn(1, 3, 8, 8) for _ in range(60)]
        with coach_fx.connect(d, f"{host}:{port}", token=TOKEN) as rm:
            assert close_to(m, frames[0], rm(frames[0]))
            futs = [rm.submit(f) for f in frames[:5]]
            assert all(close_to(m, f, fu.result(timeout=30)) for f, fu in zip(frames, futs))
            # a lazy source read at most a window ahead: a generator of unbounded length
            source = (f for f in itertools.chain(frames, (torch.randn(1, 3, 8, 8) for _ in itertools.count())))
            got = list(itertools.islice(rm.stream(source, window=4), len(frames)))
            assert all(close_to(m, f, r) for f, r in zip(frames, got))
            assert rm.stats().n >= 1 + 5 + len(frames)
        # the compiled model itself connects to the server of its own plan
        with coach_fx.connect(cm, (host, port), token=TOKEN) as rm:
            assert close_to(m, frames[1], rm(frames[1]))


def test_a_killed_cloud_with_fallback_local_answers_every_request_once_in_order(plan):
    cm, m, d = plan
    server = coach_fx.serve(d, port=0, token=TOKEN)
    host, port = server.address
    frames = [torch.randn(1, 3, 8, 8) for _ in range(200)]
    cfg = StreamConfig(timeout_s=2.0, retry_s=0.2)
    got, gaps = [], []
    with coach_fx.connect(d, (host, port), token=TOKEN, fallback="local", config=cfg) as rm:
        last = time.perf_counter()
        for k, r in enumerate(rm.stream(frames)):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            got.append(r)
            if k == 50:
                server.stop()            # the cloud is gone mid-stream
        stats = rm.stats()
    print(f"\nkilled cloud: {len(got)} results, {stats.outcomes.fell_back} on the device, "
          f"longest gap between results {max(gaps):.2f} s (timeout {cfg.timeout_s} s)")
    assert len(got) == len(frames) and stats.n == len(frames)
    assert all(close_to(m, f, r) for f, r in zip(frames, got))
    assert stats.outcomes.fell_back >= 1


def test_an_error_reply_with_a_fallback_settles_that_request_alone(plan):
    """A frame whose cloud result is not finite gets an error reply: with fallback="error" that
    request alone gets a RequestFailed; the stream goes on, in order."""
    cm, m, d = plan
    with coach_fx.serve(d, port=0, token=TOKEN) as server:
        frames = [torch.randn(1, 3, 8, 8) for _ in range(20)]
        frames[7] = torch.full((1, 3, 8, 8), float("inf"))
        with coach_fx.connect(d, server.address, token=TOKEN, fallback="error") as rm:
            got = list(rm.stream(frames))
            with pytest.raises(RequestFailed):
                rm(frames[7])
            assert close_to(m, frames[0], rm(frames[0]))
    assert len(got) == 20 and isinstance(got[7], RequestFailed)
    assert all(close_to(m, f, r) for k, (f, r) in enumerate(zip(frames, got)) if k != 7)


def test_no_cloud_without_a_fallback_is_a_clear_error_and_with_one_the_device_answers(plan, free_port):
    cm, m, d = plan
    with pytest.raises(LinkError, match="cannot reach the cloud"):
        coach_fx.connect(d, ("127.0.0.1", free_port), token=TOKEN, config=StreamConfig(timeout_s=1))
    x = torch.randn(1, 3, 8, 8)
    with coach_fx.connect(cm, ("127.0.0.1", free_port), token=TOKEN, fallback="local",
                          config=StreamConfig(timeout_s=1, retry_s=0.1)) as rm:
        assert close_to(m, x, rm(x))
        assert rm.stats().outcomes.fell_back == 1


def test_bad_targets_and_addresses_are_named():
    assert parse_address("[::1]:29517") == ("::1", 29517)
    assert parse_address(("h", 1)) == ("h", 1)
    for bad in ("nohost", "h:x", "h:0", ":80"):
        with pytest.raises(ValueError, match="address|port"):
            parse_address(bad)
    with pytest.raises(TypeError, match="CompiledModel, an OnlineModel or a saved plan directory"):
        coach_fx.connect(object(), "h:1", token=TOKEN)


def test_a_frozen_cloud_blocks_no_caller_longer_than_the_timeout(plan, free_port):
    """``coach serve`` stopped (SIGSTOP) for FREEZE_S mid-stream, 2 s timeout, fallback="local":
    every request is answered once, in order, by the cloud or the device; after SIGCONT the
    end reconnects in the background. The longest wait between two results is printed."""
    cm, m, d = plan
    proc = coach_serve(d, free_port)
    try:
        frames, events = [], {}

        def camera():
            """Frames until 60 after the end is back on the cloud (or 120 s after the thaw): the
            cloud is stopped at frame 50 for FREEZE_S."""
            k = 0
            while "back" not in events or k < events["back"] + 60:
                if "thawed" in events and "back" not in events and (
                        rm.stats().outcomes.reconnects or time.monotonic() - events["stopped"] > 140):
                    events["back"] = k
                if k == 50:
                    proc.send_signal(signal.SIGSTOP)
                    events["stopped"] = time.monotonic()
                if "stopped" in events and "thawed" not in events \
                        and time.monotonic() - events["stopped"] > FREEZE_S:
                    proc.send_signal(signal.SIGCONT)
                    events["thawed"] = k
                f = torch.randn(1, 3, 8, 8)
                frames.append(f)
                yield f
                k += 1
                time.sleep(0.01)   # a camera's pace, not synchronisation

        cfg = StreamConfig(timeout_s=2.0, retry_s=0.5)
        got, gaps, last = [], [], time.monotonic()
        with coach_fx.connect(d, ("127.0.0.1", free_port), token=TOKEN, fallback="local",
                              config=cfg) as rm:
            for r in rm.stream(camera()):
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                got.append(r)
            stats, link_events = rm.stats(), rm.events
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(60)
    o = stats.outcomes
    print(f"\nfrozen cloud: {len(got)} results, {o.fell_back} on the device, {o.reconnects} "
          f"reconnects, {o.dropped} late replies dropped; longest gap between results "
          f"{max(gaps):.2f} s (timeout {cfg.timeout_s} s)")
    assert len(got) == len(frames) == stats.n
    assert all(close_to(m, f, r) for f, r in zip(frames, got))
    assert o.fell_back >= 1 and o.reconnects >= 1, link_events
    assert len(got) - o.fell_back > 60       # the cloud answered before and after the freeze


def test_coach_run_input_folder_writes_each_image_s_top1(plan, free_port, tmp_path):
    """``coach run --input`` a folder of images, ``--output`` JSONL: one line per image, in name
    order, with the model's top-1 class on that image as the plan's input."""
    from PIL import Image

    from coach_fx.deploy.inputs import read_inputs
    from coach_fx.deploy.schema import InputSpec
    cm, m, d = plan
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(12):
        img = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8).numpy()
        Image.fromarray(img).save(pics / f"img{k:02d}.{'png' if k % 2 else 'jpg'}")
    out = tmp_path / "out.jsonl"
    proc = coach_serve(d, free_port)
    try:
        run = subprocess.run([COACH, "run", str(d), "--port", str(free_port), "--input", str(pics),
                              "--output", str(out), "--quiet"], capture_output=True, text=True,
                             timeout=120, env=ENV)
    finally:
        proc.kill()
        proc.wait(60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12 frames from" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = [(name, int(cm(x).argmax(1))) for name, (x,) in read_inputs(pics, (InputSpec((1, 3, 8, 8), torch.float32),))]
    assert [(r["source"], r["top1"][0]) for r in rows] == want
    bad = subprocess.run([COACH, "run", str(d), "--port", str(free_port), "--input", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode != 0 and "no such file" in bad.stdout + bad.stderr
