"""compile_online end to end: plans per band sharing weights, calibrated cache, four modes."""

import pytest
import torch

from coach_fx.zoo.digits import digits_splits, load_digits_model
from coach_fx.online import MODES, band_rates, compile_online
from coach_fx.zoo.streams import locality_stream
from coach_fx.runtime.links import InProcessLink, VirtualClock
from coach_fx.settings import Device, Network
from coach_fx.runtime.traces import Trace


@pytest.fixture(scope="module")
def online(online_digits):
    return online_digits


def test_plans_per_band_share_the_model_weights(online):
    model, om, _, _ = online
    assert len(om.plans) >= 2 and om.offline in om.plans
    edges, band_plans = om.bands[True].edges_mbps, om.bands[True].plans
    assert len(band_plans) == len(edges) + 1 and set(band_plans) <= set(om.plans)
    weights = {p.data_ptr() for p in model.parameters()}
    for v in om.variants.values():
        for p in v.end.module.parameters():
            assert p.data_ptr() in weights       # the model's own tensors, not copies
    for cloud, _ in om.cloud.values():
        for p in cloud.parameters():
            assert p.data_ptr() in weights
    assert "fixed plan" in om.report()


def test_a_cache_inside_the_end_half_computes_what_the_end_half_does(online):
    model, om, xt, _ = online
    probed = [v for v in om.variants.values() if v.end.lookup_split is not None]
    for v in probed:
        head, tail = v.end.lookup_split
        assert v.cache.at in [n.name for n in head.graph.nodes]
        with torch.no_grad():
            for got, want in zip(tail(*head(xt[:4])), v.end.module(xt[:4])):
                assert torch.equal(got, want)
    # the digits model's early features tell classes apart about as well as the cut's, for far
    # less end work: some plan looks up before its cut
    assert probed, om.report()


def test_modes_on_a_stream_with_locality(online):
    model, om, xt, yt = online
    idx = locality_stream(yt, 150, 10.0, seed=3)
    frames = [xt[i:i + 1] for i in idx]
    with torch.no_grad():
        ref = model(xt[idx]).argmax(1)
    results = {}
    for mode in ("fixed", "full"):
        # a slow link: the cache pays (with a fast one the policy skips lookups while the end
        # device is the bottleneck)
        outs, stats, policy = om.stream(frames, mode=mode, link=InProcessLink(0.2, None, clock=VirtualClock()))
        pred = torch.cat([o.reshape(1, -1) for o in outs]).argmax(1)
        results[mode] = (pred, stats, policy)
        assert stats.n == 150 and len(outs) == 150
    pred, stats, policy = results["fixed"]
    assert policy.hits == 0 and stats.outcomes.answered_on_end == 0
    assert (pred == ref).float().mean() >= 0.97
    pred, stats, policy = results["full"]
    assert policy.hits > 30 and stats.outcomes.answered_on_end == policy.hits, (policy.summary(), om.report())
    assert (pred == ref).float().mean() >= 0.97       # hits and fewer bits keep the answers
    assert stats.bytes_sent < results["fixed"][1].bytes_sent


def test_bad_calls_say_what_is_wrong(online):
    model, om, xt, _ = online
    with pytest.raises(ValueError, match="calibration"):
        compile_online(model, (xt[:1],), costs="analytic")
    with pytest.raises(ValueError, match="mode"):
        om.policy("fastest")
    with pytest.raises(Exception, match="expected shape"):
        om.stream([torch.randn(1, 1, 8, 8)])
    assert set(MODES) == {"fixed", "adaptive", "cache", "full"}


def test_band_rates_and_faster_traces(tmp_path):
    p = tmp_path / "t.log"
    p.write_text("".join(f"{i}\t{r}\n" for i, r in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])))
    tr = Trace.load(p)
    rates = band_rates(Network(tr.mean_mbps, trace=tr))
    assert rates == sorted(rates) and rates[0] <= 2 and rates[-1] >= 9
    assert band_rates(Network(4.0)) == [1.0, 2.0, 4.0, 8.0, 16.0]
    fast = tr.faster(10)
    assert fast.duration == pytest.approx(tr.duration / 10)
    assert fast.rate_at(0.25) == tr.rate_at(2.5)


def test_a_cache_looking_up_early_uses_that_nodes_own_calibration():
    # regression: a cut's chosen cache (perhaps a probe's) must not stand in for its own
    # calibration when a later cut probes there
    import dataclasses

    from coach_fx.accuracy import AccuracyOracle
    from coach_fx.driver import prepare
    from coach_fx.online.analysis import CutAnalysis
    from coach_fx.settings import OnlineSettings, Settings

    model = load_digits_model(32)
    (_, _), (xc, _), _ = digits_splits(frame=32)
    online = OnlineSettings.of(grid=(4,), capacity=4, calibration_frames=600)
    settings = Settings.from_options({}, costs="analytic", progress=False, accuracy_budget=0.005,
                                     calibration=(xc, None), end=Device("end", 10), online=online)
    gm, inputs, dag = prepare(model, (xc[:1],), settings)
    oracle = AccuracyOracle(gm, dag, settings, inputs)

    def calibration():
        return CutAnalysis(gm, dag, oracle, settings, cache_budget=0.005)

    cal = calibration()
    cuts = {a: tuple(v for v in dag.nodes if v in dag.ancestors([a])) for a in dag.articulation_nodes()}
    probed = 0
    for a in ["stem_1", "stem_2", "stem_3", "add", "relu"]:        # early cuts first
        info = cal.info(cuts[a])
        if info.cache.lookup_split is not None:
            probed += 1
            alone = calibration().info(cuts[info.cache.setup.at], split=False).cache.setup
            assert dataclasses.replace(info.cache.setup, bits_by_similarity=[], at=None) == \
                dataclasses.replace(alone, bits_by_similarity=[])
            assert info.cache.setup.hit_rate >= online.early_lookup_hits * info.cache.own.hit_rate
    assert probed >= 2


def test_replanning_for_another_network_reuses_the_analyses(online):
    """``for_network`` plans as a fresh compile for that network does, from this compile's
    calibrations and times (one memo, shared)."""
    model, om, _, _ = online
    (_, _), (xc, yc), _ = digits_splits(frame=32)
    again = om.for_network(Network(1.0))
    assert again.bands == om.bands and {p: v.cut for p, v in again.plans.items()} == \
        {p: v.cut for p, v in om.plans.items()}
    fast = om.for_network(Network(50.0))
    fresh = compile_online(model, (xc[:1],), network=Network(50.0), end=Device("end", 10),
                           calibration=(xc, yc), accuracy_budget=0.005, bands_mbps=[0.2, 1.0, 50.0],
                           costs="analytic", progress=False, grid=(4,), calibration_frames=600)
    assert fast.bands == fresh.bands
    assert {p: v.cut for p, v in fast.plans.items()} == {p: v.cut for p, v in fresh.plans.items()}
    assert fast.plans[fast.offline].cut != om.plans[om.offline].cut or fast.bands != om.bands
    assert fast.analysis._info is om.analysis._info and fast.analysis._times is om.analysis._times


def test_band_plans_are_priced_on_the_user_s_link_efficiency(online):
    """Every band's plan is priced on the user's network at that band's rate, its efficiency
    (and rtt, downlink) kept: ``Network.at_rate`` is the one way to say the network at rate r."""
    from coach_fx.plan import evaluate
    _, om, _, _ = online
    net = Network(4.0, rtt_ms=10.0, efficiency=0.5)
    om2 = om.for_network(net, bands_mbps=(1.0, 4.0, 16.0))
    checked = 0
    for p in om2.plans.values():
        if not p.cut:
            continue
        at = [evaluate(om2.dag, p.end_nodes, p.bits, n, input_bits=om2.settings.input_width).t_link
              for n in (net, *(net.at_rate(r) for r in (1.0, 4.0, 16.0)))]
        lossless = [evaluate(om2.dag, p.end_nodes, p.bits, Network(r, rtt_ms=10.0),
                             input_bits=om2.settings.input_width).t_link for r in (1.0, 4.0, 16.0)]
        assert any(abs(p.t_link - t) < 1e-9 for t in at), (p.t_link, at)
        assert not any(abs(p.t_link - t) < 1e-9 for t in lossless)
        checked += 1
    assert checked >= 1
    assert net.at_rate(2.0) == Network(2.0, rtt_ms=10.0, efficiency=0.5)
