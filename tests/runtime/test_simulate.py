import dataclasses

import pytest

from coach_fx.runtime.controller import OnlineController
from coach_fx.runtime.plans import CutProfile, Sizes
from coach_fx.runtime.simulate import simulate
from coach_fx.runtime.traces import Trace


def plan(t_end, t_cloud, nbytes, **kw):
    return {0: CutProfile(Sizes(own_bytes=nbytes), 32, t_end, t_cloud, **kw)}


@pytest.mark.parametrize("t_end,t_cloud,nbytes,period", [
    (0.010, 0.002, 10_000, 0.010),     # end-bound
    (0.002, 0.012, 10_000, 0.012),     # cloud-bound
    (0.002, 0.002, 50_000, 0.020),     # link-bound: 50 kB at 20 Mbit/s
])
def test_throughput_is_the_slowest_stage(t_end, t_cloud, nbytes, period):
    st = simulate(plan(t_end, t_cloud, nbytes), 400, 20.0)
    assert st.throughput == pytest.approx(1 / period, rel=1e-6)
    one = simulate(plan(t_end, t_cloud, nbytes), 1, 20.0)
    assert one.latencies[0] == pytest.approx(t_end + nbytes * 8 / 20e6 + t_cloud)
    assert 0 <= st.bubble_ratio < 1


def test_camera_streams_queue_only_beyond_the_period():
    p = plan(0.010, 0.010, 25_000)       # period 10 ms (link), single latency 30 ms
    slow = simulate(p, 300, 20.0, fps=30)
    assert max(slow.latencies) == pytest.approx(0.030)       # every frame finds empty queues
    fast = simulate(p, 300, 20.0, fps=200)                    # 5 ms between frames: a queue builds
    assert fast.latencies[-1] > 10 * fast.latencies[0]
    assert fast.throughput == pytest.approx(100, rel=0.01)


def test_end_only_and_hits_never_touch_the_link():
    st = simulate(plan(0.004, 0.0, 10_000, end_only=True), 100, 1.0)
    assert st.bytes_sent == 0 and st.throughput == pytest.approx(250)
    hits = simulate(plan(0.002, 0.002, 50_000, hit_rate=0.5), 2000, 20.0, audit_rate=0.0)
    assert 0.4 < hits.outcomes.answered_on_end / 2000 < 0.6
    assert hits.bytes_sent < 0.6 * 2000 * 50_000
    # a hit answered on the end costs only its own end work: on a fast link, end-bound
    cheap = simulate(plan(0.004, 0.001, 1_000, hit_rate=0.5, t_hit=0.002), 2000, 100.0, audit_rate=0.0)
    dear = simulate(plan(0.004, 0.001, 1_000, hit_rate=0.5), 2000, 100.0, audit_rate=0.0)
    assert dear.throughput == pytest.approx(250, rel=0.01)
    assert cheap.throughput == pytest.approx(1 / (0.5 * 0.004 + 0.5 * 0.002), rel=0.05)


def test_hours_of_trace_in_seconds(tmp_path):
    p = tmp_path / "trace"
    p.write_text("".join(f"{i}\t{1 + (i // 60) % 5}\n" for i in range(3600)))   # an hour
    tr = Trace.load(p)
    st = simulate(plan(0.005, 0.005, 20_000), 60_000, tr)     # 32-160 ms per frame on the link
    assert st.wall_s > 3000 and st.n == 60_000 and len(st.latencies) == 60_000


def test_the_controller_drives_bits_over_a_step_trace(tmp_path):
    p = tmp_path / "step"
    p.write_text("0\t100\n5\t2\n1000\t2\n")        # 5 s fast, then a long slow stretch
    tr = Trace.load(p)
    sizes = Sizes((100_000,))
    prof = CutProfile(dataclasses.replace(sizes, own_bytes=sizes.message_bytes(8)), 3, 0.01, 0.005)
    ctl = OnlineController({0: prof}, end_s={0: 0.01})
    st = simulate({0: prof}, 600, tr, controller=ctl)
    fixed = simulate({0: prof}, 600, tr)              # its own widths: 8 bits
    assert st.wall_s < 0.6 * fixed.wall_s           # fewer bits while the link is slow
    assert st.bytes_sent < 0.95 * fixed.bytes_sent
    assert ctl.estimator.mbps == pytest.approx(2.0, rel=0.05)


def test_a_trace_that_ships_with_coach_fx_loads_by_name_on_a_fresh_clone():
    from coach_fx.runtime.traces import SHIPPED_TRACES, Trace
    t = Trace.load("norway_bus_1")                     # no ../shared needed
    assert (SHIPPED_TRACES / "norway_bus_1").is_file() and 0.5 < t.mean_mbps < 8
    with pytest.raises(FileNotFoundError, match="norway_bus_1"):
        Trace.load("no_such_trace")                    # the error names what ships
