import math
import pytest

from coach_fx.runtime.wire import ReplyStats

from coach_fx.runtime.config import Bands, ControlConfig
from coach_fx.runtime.controller import (QUEUED_MARGIN_S, ArrivalSampler, BandwidthEstimator, BitController,
                                         OnlineController, PlanSwitcher)
from coach_fx.runtime.plans import CutProfile, Sizes


def test_harmonic_mean_resists_a_lucky_sample():
    est = BandwidthEstimator(window=4)
    assert est.mbps is None
    for mbps in (10, 10, 10, 1000):
        est.add(mbps * 1e6 / 8, 1.0)
    assert est.mbps < 14          # an arithmetic mean would say 257
    est.add(0, 1.0)               # empty transfers are not samples
    assert len(est.samples) == 4


def test_bits_fall_after_a_step_drop_and_rise_after_recovery():
    # 200k floats cross; compute bottleneck 40 ms; accuracy-safe minimum 3 bits
    prof = CutProfile(Sizes((200_000,)), min_bits=3, t_end=0.04, t_cloud=0.01)
    ctl, est = BitController(prof), BandwidthEstimator(window=5)
    schedule = [200.0] * 20 + [8.0] * 20 + [200.0] * 20
    chosen = []
    for mbps in schedule:
        b = ctl.choose(est.mbps)
        chosen.append(b)
        nbytes = prof.message_bytes(b)
        est.add(nbytes, nbytes * 8 / (mbps * 1e6))
    assert chosen[19] >= 8                    # fast link: more bits fit in the bottleneck
    assert min(chosen[20:40]) == 3 and chosen[20 + 5] == 3   # fell within the window
    assert all(b >= 3 for b in chosen)        # never below the safe minimum
    assert chosen[40 + 5] == chosen[19]       # back up within the window after recovery
    assert ctl.link_bound(1.0) and not ctl.link_bound(200.0)


def test_plan_switch_only_after_the_estimate_stays():
    sw = PlanSwitcher(edges_mbps=[5.0, 20.0], plans=[10, 11, 12], hold=4)
    assert sw.plan == 12                              # starts in the fastest band
    for mbps in (3, 30, 3, 30, 3, 3, 3):              # flapping, then three in a row
        sw.update(mbps)
    assert sw.plan == 12 and sw.switches == 0
    sw.update(3)                                      # the fourth in a row
    assert sw.plan == 10 and sw.switches == 1
    for _ in range(10):
        sw.update(10)
    assert sw.plan == 11 and sw.switches == 2
    with pytest.raises(ValueError):
        PlanSwitcher([5.0], [1, 2, 3])


def test_an_end_only_band_still_probes_the_link():
    local = CutProfile(Sizes(), 32, 0.05, 0.0, end_only=True)
    split = CutProfile(Sizes((10_000,)), 4, 0.01, 0.0)
    ctl = OnlineController({0: local, 1: split}, Bands((1.0,), (0, 1), start=0),
                           ControlConfig(hold=2, probe_s=0.5))
    assert ctl.next_plan(0.0) == 0 and ctl.next_plan(0.4) == 0
    assert ctl.next_plan(0.6) == 1 and ctl.probes == 1      # a pair of frames measures the link
    assert ctl.next_plan(0.6) == 1 and ctl.probes == 2
    assert ctl.next_plan(0.7) == 0
    for _ in range(2):                                        # the probes find it fast again
        ctl.on_result(1, 125_000, 0.01, 0.005)
    assert ctl.current == 1 and ctl.next_plan(0.8) == 1


def test_a_start_plan_that_serves_no_band_gives_way_to_the_bands_plan():
    fixed = CutProfile(Sizes((10_000,)), 4, 0.01, 0.0)
    cheap = CutProfile(Sizes((10_000,)), 4, 0.002, 0.0)
    # one band for all rates, served by another plan than the offline one it starts with
    ctl = OnlineController({0: fixed, 2: cheap}, Bands((), (2,), start=0))
    assert ctl.current == 0 and ctl.switches == 0
    ctl.on_result(0, 125_000, 0.01, 0.005)                    # the first estimate
    assert ctl.current == 2 and ctl.switches == 1
    for _ in range(5):
        ctl.on_result(2, 125_000, 0.5, 0.005)                 # a slower link: still one band
    assert ctl.current == 2 and ctl.switches == 1
    # without switching it stays where it started
    still = OnlineController({0: fixed, 2: cheap}, Bands((), (2,), start=0),
                             ControlConfig(switching=False))
    still.on_result(0, 125_000, 0.01, 0.005)
    assert still.current == 0 and still.switches == 0


def test_coded_sizes_raise_the_bits_that_fit_and_the_estimate_follows_them():
    # 200k floats, bottleneck 40 ms, at 16 Mbit/s: 40 ms carry 80 kB, i.e. 3 bits uncoded
    plain = CutProfile(Sizes((200_000,)), min_bits=2, t_end=0.04, t_cloud=0.0)
    coded = CutProfile(Sizes((200_000,), codec="deflate", coded_share=tuple((b, 0.4) for b in (2, 3, 4, 5, 6, 8, 16))),
                       min_bits=2, t_end=0.04, t_cloud=0.0)
    assert coded.message_bytes(4) < 0.41 * plain.message_bytes(4)
    assert BitController(plain).choose(16.0) == 3
    ctl = BitController(coded)
    assert ctl.choose(16.0) == 6                     # 40 % of 6-bit codes fit where 3 bits did
    for _ in range(20):                              # the frames code worse than calibrated
        ctl.observe(6, plain.message_bytes(6))
        ctl.observe(5, plain.message_bytes(5))
        ctl.observe(4, plain.message_bytes(4))
        ctl.observe(3, plain.message_bytes(3))
    assert ctl.size_factor[6] == pytest.approx(2.5, rel=0.02)
    assert ctl.choose(16.0) == 3                     # back to what fits uncoded


def test_a_link_that_did_not_queue_raises_the_estimate_by_the_probing_gain_never_lowers_it():
    from coach_fx.runtime.controller import PROBE_GAIN
    split = CutProfile(Sizes((10_000,)), 4, 0.01, 0.0)
    ctl = OnlineController({1: split}, Bands(start=1), ControlConfig(switching=False))
    ctl.on_result(1, 125_000, 0.1, 0.005)                 # exact: 10 Mbit/s
    assert ctl.estimator.mbps == pytest.approx(10.0)
    ctl.on_result(1, 125_000, 1.0, 0.005, lower_bound=True)   # "at least 1 Mbit/s": no news
    assert ctl.estimator.samples[-1] == pytest.approx(10.0 * PROBE_GAIN)
    for _ in range(200):                                  # idle link: the estimate climbs
        ctl.on_result(1, 125_000, 1.0, 0.005, lower_bound=True)
    assert ctl.estimator.mbps > 12.0
    ctl.on_result(1, 125_000, 0.5, 0.005)                 # a queued request: 2 Mbit/s, at once
    assert ctl.bits(1) == ctl.bit_controllers[1].choose(2.0, None, ctl.compute_s(1), ctl.headroom)


# ---- ArrivalSampler: a real link's replies as bandwidth samples (exact when the link was
# busy, a lower bound otherwise)
def sampler():
    return ArrivalSampler()


def reply(st, req, nbytes, arrived):
    return st.sample(req, ReplyStats(0.001, float(nbytes), 0.0, arrived))


def test_a_request_sent_while_the_one_before_was_in_the_link_measures_the_rate():
    st = sampler()
    # a 1 Mbit/s link, 1 ms away, clocks 100 s apart: a small request alone (its delay is the
    # least: the baseline), then two 1250-byte requests sent together
    st.sent_at.update({5: 9.0, 0: 10.0, 1: 10.0001})
    assert reply(st, 5, 12, 109.0011).wire_s == 0.0       # nothing to compare with yet
    reply(st, 0, 1250, 110.011)                           # 1 ms + 10 ms on the wire
    second = reply(st, 1, 1250, 110.021)                  # waited behind it: 10 ms more
    assert second.wire_s == pytest.approx(0.010) and not second.lower_bound


def test_a_request_after_an_idle_link_is_only_a_lower_bound():
    st = sampler()
    st.sent_at.update({0: 10.0, 1: 10.02, 2: 10.5})
    reply(st, 0, 1250, 110.002)
    second = reply(st, 1, 1250, 110.022)                  # sent after the first had arrived
    # the link moved 1250 bytes within the 20 ms between the sends (and the margin)
    assert second.lower_bound
    assert second.wire_s == pytest.approx(0.02 + QUEUED_MARGIN_S)
    assert reply(st, 2, 1250, 110.502).wire_s == 0.0      # half a second apart: no news


def test_an_in_process_reply_keeps_its_exact_wire_time():
    st = sampler()
    st.sent_at[0] = 1.0
    figures = ReplyStats(0.001, 100.0, 0.02, 0.0)
    assert st.sample(0, figures) == figures
    assert st.sample(7, ReplyStats(0.001, 100.0, 0.02, 5.0)) == ReplyStats(0.001, 100.0, 0.02, 5.0)   # never sent here
    assert st.sample(1, None) is None


def test_a_server_s_ends_count_reaches_the_end_by_name():
    st = sampler()
    st.sent_at[0] = 1.0
    got = st.sample(0, ReplyStats(0.001, 100.0, 0.02, 0.0, ends=8.0))   # in-process arrival: nothing to tell
    assert (got.cloud_s, got.request_bytes, got.wire_s, got.ends, got.lower_bound) == (0.001, 100.0, 0.02, 8.0, False)


def test_reply_stats_travel_in_one_entry_and_an_older_cloud_s_shorter_one_reads_back():
    from coach_fx.runtime.wire import Entry, decode, encode
    figures = ReplyStats(0.004, 1234.0, 0.003, 17.5, 4.0)
    _, _, _, entries = decode(encode(3, [Entry.of_value(1.0), figures.entry()]))
    assert ReplyStats.of(entries) == figures
    assert ReplyStats.of([Entry.stats([0.004, 1234.0, 0.003])]) == ReplyStats(0.004, 1234.0, 0.003)
    assert ReplyStats.of([Entry.of_value(1.0)]) is None


def test_a_shared_cloud_pushes_the_controller_to_plans_with_less_cloud_work():
    cloudy = CutProfile(Sizes((1_000,)), 8, t_end=0.002, t_cloud=0.010)     # the band's plan
    endy = CutProfile(Sizes((1_000,)), 8, t_end=0.030, t_cloud=0.001)
    ctl = OnlineController({0: cloudy, 1: endy}, Bands((), (0,), start=0))
    for _ in range(3):
        ctl.on_result(0, 125_000, 0.01, 0.010)                 # one end: the cloud has room
    assert ctl.current == 0 and ctl.compute_s(0) == pytest.approx(0.010)
    for _ in range(3):
        ctl.on_result(0, 125_000, 0.01, 0.010, ends=8)         # eight share it: 80 ms per round
    assert ctl.current == 1 and ctl.switches == 1
    for _ in range(3):
        ctl.on_result(1, 125_000, 0.01, 0.001, ends=1)         # alone again: back to the band's plan
    assert ctl.current == 0 and ctl.switches == 2
