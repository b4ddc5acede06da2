import dataclasses
import math

import pytest

from coach_fx.runtime.wire import ReplyStats
import torch

from coach_fx.passes._compat import tree_flatten
from coach_fx.passes.partition import partition
from coach_fx.runtime.codec import entries_to_payload, quantized_entry
from coach_fx.runtime.cloud import CloudWorker
from coach_fx.runtime.config import Bands, CacheConfig, ControlConfig, PolicyConfig, StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.links import InProcessLink, VirtualClock
from coach_fx.runtime.plans import CacheSetup, CrossingBits, CutProfile, EndHalf, EndTimes, FinishOnEnd, Sizes, Variant
from coach_fx.runtime.policy import OnlinePolicy, bottleneck_with_cache
from coach_fx.runtime.wire import FLAG_CACHE_HIT, QUANT, WireError, decode


def variant(gm, dag, end_nodes, pid, min_bits=4, compute_s=0.01, cache=None):
    end, cloud, boundary = partition(gm, end_nodes, {})
    numel = sum(math.prod(c.shape) for c in boundary.crossings)
    prof = CutProfile(Sizes((numel,), n_tensors=len(boundary.crossings)), min_bits, compute_s, 0.0)
    v = Variant(pid, EndHalf(end), boundary, prof, CrossingBits(tuple(None for _ in boundary.crossings), min_bits),
                cache=cache)
    return v, cloud, boundary


def online_policy(variants, edges_mbps=(), band_plans=None, *, start=0, adaptive=True,
                  switching=True, cache=True, similarity_bits=True, finish_on_end=False, audit_rate=0.1,
                  hold=5, seed=0, end_slowdown=1.0):
    """The policy with the settings a test names (the rest at their defaults)."""
    return OnlinePolicy(variants, Bands(tuple(edges_mbps), tuple(band_plans) if band_plans else None, start),
                        PolicyConfig(ControlConfig(adaptive, switching, hold),
                                     CacheConfig(cache, similarity_bits, audit_rate=audit_rate, seed=seed),
                                     finish_on_end, end_slowdown))


def upto(dag, name):
    return tuple(v for v in dag.nodes if v in dag.ancestors([name]))


def test_bits_on_the_wire_follow_the_bandwidth(tiny_split):
    model, gm, dag, x = tiny_split
    v, cloud, boundary = variant(gm, dag, upto(dag, "relu"), 0, min_bits=3, compute_s=0.01)
    policy = online_policy([v])
    bits = []
    for i, mbps in enumerate([100.0] * 8 + [0.05] * 8 + [100.0] * 8):
        prep = policy.prepare(i, (x,))
        req, plan, flags, entries = decode(prep.msg)
        assert plan == 0 and req == i
        bits.append(entries[0].bits if entries[0].kind == QUANT else 32)
        n = len(prep.msg)
        policy.on_result(i, model(x), ReplyStats(0.001, float(n), n * 8 / (mbps * 1e6)), False)
        # the cloud decodes what was sent at any bits into the float crossing it expects
        out = cloud(*entries_to_payload(boundary, entries, accept_quantized=True))
        assert torch.allclose(out, model(x), atol=0.5)
    assert bits[0] == 3                         # no estimate yet: the safe minimum
    assert bits[7] == 32                        # fast link: the tensor goes as it is
    assert bits[8 + 5] == 3                     # fell within the estimator's window
    assert bits[16 + 5] == 32                   # and rose again after recovery
    assert min(bits) >= 3


def test_quantized_entry_only_where_the_plan_allows_it(tiny_split):
    model, gm, dag, x = tiny_split
    v, cloud, boundary = variant(gm, dag, upto(dag, "relu"), 0)
    val = v.end.module(x)[0]
    e = quantized_entry(val, 5)
    with pytest.raises(WireError, match="sends it as is"):
        entries_to_payload(boundary, [e])
    bad = quantized_entry(val[:, :2].contiguous(), 5)
    with pytest.raises(WireError, match="shape"):
        entries_to_payload(boundary, [bad], accept_quantized=True)


def cache_setup(grid=2):
    return CacheSetup(sim_threshold=0.9, margin=0.0, hit_rate=0.5, bits_by_similarity=[(0.5, 2)], grid=grid)


def test_a_hit_answers_on_the_end_and_sends_nothing(tiny_split):
    model, gm, dag, x = tiny_split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    policy = online_policy([v], audit_rate=0.0)
    first = policy.prepare(0, (x,))
    assert not first.answered and first.msg is not None   # nothing confirmed yet
    policy.on_result(0, model(x), None, False)                 # the cloud's answer teaches it
    again = policy.prepare(1, (x,))
    assert again.answered and again.msg is None
    assert torch.equal(again.answer, model(x))
    assert policy.hits == 1
    # a frame unlike it misses; its similarity band lowers the bits below the minimum
    other = policy.prepare(2, (-x,))
    assert not other.answered
    assert decode(other.msg)[3][0].bits in (2, 4)


def test_a_context_cache_answers_for_the_stream_s_latest_class_only(tiny_split):
    model, gm, dag, x = tiny_split
    setup = dataclasses.replace(cache_setup(), context=True)
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=setup)
    policy = online_policy([v], audit_rate=0.0)
    y = torch.zeros(1, 3)
    y[0, int(model(x).argmax())] = 1.0
    other = torch.roll(y, 1, dims=1)
    policy.prepare(0, (x,))
    policy.on_result(0, y, None, False)                   # x's class learned; the stream is on it
    assert policy.prepare(1, (x,)).answered
    # a later request (one not looked up, say) was answered with another class: the stream
    # has moved on, and x's features no longer answer on the end ...
    policy.on_result(2, other, None, False)
    assert not policy.prepare(3, (x,)).answered
    # ... until an answer for a later request says the stream is back on x's class; a late
    # answer for an earlier request does not change that
    policy.on_result(3, y, None, False)
    policy.on_result(1, other, None, False)
    assert policy.prepare(4, (x,)).answered


def test_an_answer_on_the_end_only_plan_moves_the_caches_context(tiny_split):
    model, gm, dag, x = tiny_split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=dataclasses.replace(cache_setup(), context=True))
    local, _, boundary = variant(gm, dag, tuple(dag.nodes), 1)
    assert boundary.end_only and local.end_only
    policy = online_policy([v, local], start=1, switching=False)
    prep = policy.prepare(7, (x,))
    assert prep.answered and torch.allclose(prep.answer, model(x))
    assert policy.caches[0].latest == (7, int(model(x).argmax()))


def test_a_hit_is_charged_its_own_end_work_and_lookups_run_while_hits_save_end_time(tiny_split):
    model, gm, dag, x = tiny_split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    # end half 1 ms, lookup +0.2 ms, a hit skips quantize + encode: 0.5 ms in all
    v.times = EndTimes(1e-3, 2e-4, 5e-4)
    policy = online_policy([v], audit_rate=0.0, end_slowdown=10.0)
    miss = policy.prepare(0, (x,))
    assert miss.end_host_s == pytest.approx(1.2e-3)          # end half + lookup + send
    policy.on_result(0, model(x), ReplyStats(0.001, 100.0, 1e-6), False)  # a very fast link: end-bound
    hit = policy.prepare(1, (x,))
    assert hit.answered and hit.msg is None
    assert hit.end_host_s == pytest.approx(5e-4)
    # a calibrated 50 % hit rate: 0.5 x 0.5 + 0.5 x 1.2 = 0.85 ms < 1 ms without lookups, so
    # lookups go on although the end is the bottleneck
    assert policy.end_stage_s(v) < v.times.host_s * 10
    assert policy._cache_pays(v)
    # with hits as dear as misses they would only slow an end-bound stream down: by 20 % they
    # may (a hit answers at once and sends nothing), by 40 % not
    v.times.hit_s = 1.2e-3
    assert policy._cache_pays(v)
    v.times = EndTimes(1e-3, 4e-4, 1.4e-3)
    assert not policy._cache_pays(v)


def test_lookups_go_on_while_the_link_is_the_bottleneck_though_they_cost_the_end(tiny_split):
    model, gm, dag, x = tiny_split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    v.times = EndTimes(1e-3, 5e-4, 1.5e-3)       # hits no cheaper than misses: lookups only cost the end
    policy = online_policy([v], audit_rate=0.0, end_slowdown=10.0)
    policy.prepare(0, (x,))
    # a slow link (its message 0.2 s on the wire): answering a share of requests on the end
    # takes that share off it
    policy.on_result(0, model(x), ReplyStats(1e-6, float(v.message_bytes()), 0.2), False)
    link = policy.control.link_seconds(0, v.profile.min_bits, policy.control.estimator.mbps)
    assert link > 2 * policy.end_stage_s(v)
    assert policy._cache_pays(v)
    assert bottleneck_with_cache(15e-3, link, 0.0, 0.5) < max(10e-3, link)
    # the same link but an end 10x slower still: the end is the bottleneck, the lookups only add to it
    policy.end_slowdown = 1000.0
    assert not policy._cache_pays(v)


def test_audited_hit_is_sent_flagged_and_a_wrong_center_corrected(tiny_split):
    model, gm, dag, x = tiny_split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    policy = online_policy([v], audit_rate=1.0)
    policy.prepare(0, (x,))
    wrong = torch.zeros(1, 3)
    wrong[0, (int(model(x).argmax()) + 1) % 3] = 1.0        # a poisoned answer for this frame
    policy.on_result(0, wrong, None, False)
    prep = policy.prepare(1, (x,))
    assert prep.answered and prep.msg is not None
    assert decode(prep.msg)[2] & FLAG_CACHE_HIT
    policy.on_result(1, model(x), None, True)                   # the audit's reply
    assert policy.corrections == 1
    assert int(policy.prepare(2, (x,)).answer.argmax()) == int(model(x).argmax())


def test_pipeline_switches_plans_and_the_cloud_runs_the_matching_half(tiny_split):
    model, gm, dag, x = tiny_split
    v0, c0, b0 = variant(gm, dag, (), 0, min_bits=8)
    v1, c1, b1 = variant(gm, dag, upto(dag, "relu"), 1, min_bits=8)
    # cloud-only above 1 Mbit/s, the deeper cut below; the link runs at 0.2 Mbit/s, so the
    # estimate lands in the lower band and the switcher moves there after `hold` results
    v0.bits = dataclasses.replace(v0.bits, pinned=(8,))
    policy = online_policy([v0, v1], edges_mbps=[1.0], band_plans=[1, 0], start=0, hold=3,
                          cache=False)
    link = InProcessLink(0.2, None, clock=VirtualClock())   # wire times exact, nothing sleeps
    cloud = CloudWorker({0: (c0, b0), 1: (c1, b1)}, link.cloud, adaptive=True).start()
    frames = [torch.randn(1, 1, 8, 8) for _ in range(30)]
    end = EndWorker(link.end, tree_flatten(model(x))[1], policy, StreamConfig(queue_size=1, max_inflight=1))
    try:
        outs, stats = end.run(frames)
    finally:
        end.close()
        cloud.join(2.0)
    assert policy.switches == 1 and policy.current == 1
    assert policy.plans_used[0] >= 3 and policy.plans_used[1] >= 10
    for f, o in zip(frames, outs):
        assert (o - model(f)).abs().max() < 0.1 * model(f).abs().max() + 0.05
    assert stats.n == 30 and stats.outcomes.answered_on_end == 0


def test_pipeline_answers_hits_and_audits_without_losing_requests(tiny_split):
    model, gm, dag, x = tiny_split
    v, c, b = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8, cache=cache_setup())
    policy = online_policy([v], audit_rate=0.5, seed=3)
    link = InProcessLink(50.0, None, clock=VirtualClock())
    cloud = CloudWorker({0: (c, b)}, link.cloud, adaptive=True).start()
    frames = [x] * 40
    end = EndWorker(link.end, tree_flatten(model(x))[1], policy, StreamConfig(queue_size=1, max_inflight=1))
    try:
        outs, stats = end.run(frames, pipelined=False)
    finally:
        end.close()
        cloud.join(2.0)
    assert len(outs) == 40 and stats.outcomes.answered_on_end == policy.hits > 20
    assert all(int(o.argmax()) == int(model(x).argmax()) for o in outs)
    assert policy.audits > 0 and stats.outcomes.dropped == 0


def test_a_request_is_finished_on_the_end_when_the_link_is_backlogged_or_stalled(tiny_split):
    model, gm, dag, x = tiny_split
    v, cloud, _ = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8)
    v.finish_on_end = FinishOnEnd(cloud, 1e-3)            # the rest of the model: 1 ms here
    policy = online_policy([v], finish_on_end=True, end_slowdown=10.0, cache=False)   # 10 ms there
    prep = policy.prepare(0, (x,))
    nbytes = len(prep.msg)
    # no estimate yet: only a silence as long as the local work says the link stalled
    assert policy.finish_on_end_wait_s(0, 8, 0.004) == pytest.approx(0.006)
    assert policy.finish_on_end_wait_s(0, 8, 0.011) == 0.0
    assert policy.finish_on_end_wait_s(1, 8, 1.0) == math.inf        # not the request waiting
    # a link that carries one message per 1 ms: 7 ahead hold 7 ms < 10 ms, wait for it
    policy.on_result(0, model(x), ReplyStats(0.001, float(nbytes), 1e-3), False)
    prep = policy.prepare(1, (x,))
    assert policy.finish_on_end_wait_s(1, 8, 0.0) == pytest.approx(0.010)
    # one per 5 ms: 35 ms of link time ahead, the end would idle: finish it there now
    for k in range(5):
        policy.on_result(1, model(x), ReplyStats(0.001, float(nbytes), 5e-3), False)
    assert policy.finish_on_end_wait_s(1, 8, 0.0) == 0.0
    bits_before = sum(policy.bits_used.values())
    done = policy.finish_on_end(1)
    assert done.answered and done.msg is None and done.end_host_s == 1e-3
    assert torch.allclose(done.answer, model(x), atol=1e-6)    # unquantized: the model's answer
    assert policy.finished_on_end == 1 and sum(policy.bits_used.values()) == bits_before - 1
    # without ``finish_on_end`` a request always waits for the link
    assert online_policy([v], cache=False).finish_on_end_wait_s(1, 8, 10.0) == math.inf


def test_a_cache_looking_up_inside_the_end_half_skips_the_rest_on_a_hit(tiny_split):
    from coach_fx.passes.split import split_at
    model, gm, dag, x = tiny_split
    setup = CacheSetup(sim_threshold=0.9, margin=0.0, hit_rate=0.5, grid=2, at="relu")
    v, cloud, boundary = variant(gm, dag, upto(dag, "body_1"), 0, cache=setup)
    head, tail = split_at(v.end.module, "relu")
    tails = []
    v.end = EndHalf(v.end.module, (head, lambda *a: tails.append(1) or tail(*a)))
    plain, _, _ = variant(gm, dag, upto(dag, "body_1"), 0)
    policy, reference = online_policy([v], audit_rate=0.0), online_policy([plain], cache=False)
    miss = policy.prepare(0, (x,))
    # a miss runs the rest of the end half and sends what the end half would have sent
    assert not miss.answered and tails == [1]
    assert miss.msg == reference.prepare(0, (x,)).msg
    policy.on_result(0, model(x), None, False)
    hit = policy.prepare(1, (x,))
    assert hit.answered and hit.msg is None and tails == [1]    # the rest never ran
    assert torch.equal(hit.answer, model(x))
    # the cache's centers are the probe's features (16 values: 4 channels x 2 x 2 cells)
    assert policy.caches[0].centers[int(model(x).argmax())].total.shape == (16,)


def test_a_coded_plan_sends_coded_codes_and_learns_their_size(tiny_split):
    model, gm, dag, x = tiny_split
    v, cloud, boundary = variant(gm, dag, upto(dag, "relu"), 0, min_bits=4)
    v.profile = dataclasses.replace(v.profile, sizes=dataclasses.replace(v.profile.sizes, codec="deflate",
                                                                         coded_share=((4, 0.5),)))
    policy = online_policy([v], cache=False)
    prep = policy.prepare(0, (torch.zeros_like(x),))   # a blank frame: codes that deflate well
    _, _, _, entries = decode(prep.msg)
    assert entries[0].kind == QUANT and entries[0].codec_name == "deflate"
    out = cloud(*entries_to_payload(boundary, entries, accept_quantized=True))
    assert torch.allclose(out, model(torch.zeros_like(x)), atol=0.5)
    policy.on_result(0, model(x), ReplyStats(0.001, float(len(prep.msg)), 0.01), False)
    policy.prepare(1, (torch.zeros_like(x),))         # with an estimate: the controller picks bits
    learned = policy.control.bit_controllers[0].size_factor
    assert learned and all(f < 1.0 for f in learned.values())   # smaller than the 50 % expected
