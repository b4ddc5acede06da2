import pytest

from coach_fx.runtime.links import InProcessLink, LinkTimeout, PeerGone, TokenBucket, VirtualClock
from coach_fx.runtime.traces import Trace


def test_constant_rate_and_latency_on_virtual_clock():
    clock = VirtualClock()
    link = InProcessLink(uplink=8.0, downlink=80.0, latency_s=0.01, clock=clock)
    assert link.end.send(b"x" * 1_000_000) == pytest.approx(1.0)     # 8 Mbit at 8 Mbit/s
    assert link.cloud.recv() == b"x" * 1_000_000
    assert clock.now() == pytest.approx(1.01)
    link.cloud.send(b"y" * 100_000)
    link.end.recv()
    assert clock.now() == pytest.approx(1.01 + 0.01 + 0.01)


def test_fifo_queueing_and_trace_replay_fast():
    # a trace alternating 4 and 0 Mbit/s each second: 4 Mbit need one "on" second each
    trace = Trace((0.0, 1.0), (4.0, 0.0), 2.0)
    clock = VirtualClock()
    link = InProcessLink(uplink=trace, clock=clock, maxsize=512)
    for _ in range(300):   # ten minutes of trace
        link.end.send(b"z" * 500_000)
    for _ in range(300):
        link.cloud.recv()
    assert clock.now() == pytest.approx(599.0)
    assert link.up.busy_s == pytest.approx(599.0)


def test_timeout_and_close():
    link = InProcessLink(uplink=10.0)
    with pytest.raises(LinkTimeout):
        link.cloud.recv(timeout=0.05)
    link.end.close()
    with pytest.raises(PeerGone):
        link.cloud.recv(timeout=1)


def test_token_bucket_follows_trace():
    clock = VirtualClock()
    b = TokenBucket(Trace((0.0, 1.0), (8.0, 16.0), 2.0), clock)
    assert b.wait(1_000_000) == 0.0
    assert b.finish() == pytest.approx(1.0)
    b.wait(2_000_000)
    assert b.finish() == pytest.approx(2.0)


def test_real_traces_load(shared_dir):
    up = Trace.load(shared_dir / "traces/mahimahi-lte/Verizon-LTE-short.up")
    assert 4.0 < up.mean_mbps < 8.0          # README: 6.0 Mbit/s
    hs = Trace.load(shared_dir / "traces/norway-hsdpa/norway_bus_1", scale=10)
    assert hs.mean_mbps > 1.0
    t = up.finish_time(0.0, 1_000_000)
    assert 0.5 < t < 5.0


def test_bad_trace_files(tmp_path):
    p = tmp_path / "t"
    p.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Trace.load(p)
    p.write_text("0 1\n1 x\n")
    with pytest.raises(ValueError, match="bad number"):
        Trace.load(p)
    p.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="expected"):
        Trace.load(p)
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "missing")
