import dataclasses
import math

import pytest
import torch
from torch import nn

from coach_fx._compat import tree_flatten
from coach_fx.compiled import prepare
from coach_fx.passes.partition import partition
from coach_fx.runtime.codec import entries_to_payload, quantized_entry
from coach_fx.runtime.controller import CutProfile
from coach_fx.runtime.link import InProcessLink
from coach_fx.runtime.online import CacheSetup, OnlinePolicy, Variant
from coach_fx.runtime.pipeline import CloudWorker, EndWorker
from coach_fx.runtime.wire import FLAG_CACHE_HIT, QUANT, WireError, decode
from coach_fx.settings import Settings


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(1, 1, 8, 8)
    gm, inputs, dag = prepare(model, (x,), Settings(costs="analytic", progress=False))
    return model, gm, dag, x


def variant(gm, dag, end_nodes, pid, min_bits=4, compute_s=0.01, cache=None):
    end, cloud, boundary = partition(gm, end_nodes, {})
    numel = sum(math.prod(c.shape) for c in boundary.crossings)
    prof = CutProfile(numel, 0, len(boundary.crossings), min_bits, compute_s)
    v = Variant(pid, end, boundary, prof, tuple(None for _ in boundary.crossings), min_bits, cache=cache)
    return v, cloud, boundary


def upto(dag, name):
    return tuple(v for v in dag.nodes if v in dag.ancestors([name]))


def test_bits_on_the_wire_follow_the_bandwidth(split):
    model, gm, dag, x = split
    v, cloud, boundary = variant(gm, dag, upto(dag, "relu"), 0, min_bits=3, compute_s=0.01)
    policy = OnlinePolicy([v])
    bits = []
    for i, mbps in enumerate([100.0] * 8 + [0.05] * 8 + [100.0] * 8):
        prep = policy.prepare(i, (x,))
        req, plan, flags, entries = decode(prep.msg)
        assert plan == 0 and req == i
        bits.append(entries[0].bits if entries[0].kind == QUANT else 32)
        n = len(prep.msg)
        policy.on_result(i, model(x), [0.001, float(n), n * 8 / (mbps * 1e6)], False)
        # the cloud decodes what was sent at any bits into the float crossing it expects
        out = cloud(*entries_to_payload(boundary, entries, accept_quantized=True))
        assert torch.allclose(out, model(x), atol=0.5)
    assert bits[0] == 3                         # no estimate yet: the safe minimum
    assert bits[7] == 32                        # fast link: the tensor goes as it is
    assert bits[8 + 5] == 3                     # fell within the estimator's window
    assert bits[16 + 5] == 32                   # and rose again after recovery
    assert min(bits) >= 3


def test_quantized_entry_only_where_the_plan_allows_it(split):
    model, gm, dag, x = split
    v, cloud, boundary = variant(gm, dag, upto(dag, "relu"), 0)
    val = v.end_module(x)[0]
    e = quantized_entry(val, 5)
    with pytest.raises(WireError, match="sends it as is"):
        entries_to_payload(boundary, [e])
    bad = quantized_entry(val[:, :2].contiguous(), 5)
    with pytest.raises(WireError, match="shape"):
        entries_to_payload(boundary, [bad], accept_quantized=True)


def cache_setup(grid=2):
    return CacheSetup(sim_threshold=0.9, margin=0.0, hit_rate=0.5, bits_by_similarity=[(0.5, 2)], grid=grid)


def test_a_hit_answers_on_the_end_and_sends_nothing(split):
    model, gm, dag, x = split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    policy = OnlinePolicy([v], audit_rate=0.0)
    first = policy.prepare(0, (x,))
    assert not first.answered and first.msg is not None   # nothing confirmed yet
    policy.on_result(0, model(x), [], False)                 # the cloud's answer teaches it
    again = policy.prepare(1, (x,))
    assert again.answered and again.msg is None
    assert torch.equal(again.answer, model(x))
    assert policy.hits == 1
    # a frame unlike it misses; its similarity band lowers the bits below the minimum
    other = policy.prepare(2, (-x,))
    assert not other.answered
    assert decode(other.msg)[3][0].bits in (2, 4)


def test_a_context_cache_answers_for_the_stream_s_latest_class_only(split):
    model, gm, dag, x = split
    setup = dataclasses.replace(cache_setup(), context=True)
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=setup)
    policy = OnlinePolicy([v], audit_rate=0.0)
    y = torch.zeros(1, 3)
    y[0, int(model(x).argmax())] = 1.0
    other = torch.roll(y, 1, dims=1)
    policy.prepare(0, (x,))
    policy.on_result(0, y, [], False)                   # x's class learned; the stream is on it
    assert policy.prepare(1, (x,)).answered
    # a later request (one not looked up, say) was answered with another class: the stream
    # has moved on, and x's features no longer answer on the end ...
    policy.on_result(2, other, [], False)
    assert not policy.prepare(3, (x,)).answered
    # ... until an answer for a later request says the stream is back on x's class; a late
    # answer for an earlier request does not change that
    policy.on_result(3, y, [], False)
    policy.on_result(1, other, [], False)
    assert policy.prepare(4, (x,)).answered


def test_an_answer_on_the_end_only_plan_moves_the_caches_context(split):
    model, gm, dag, x = split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=dataclasses.replace(cache_setup(), context=True))
    local, _, boundary = variant(gm, dag, tuple(dag.nodes), 1)
    assert boundary.end_only
    local = dataclasses.replace(local, end_only=True)
    policy = OnlinePolicy([v, local], start=1, switching=False)
    prep = policy.prepare(7, (x,))
    assert prep.answered and torch.allclose(prep.answer, model(x))
    assert policy.caches[0].latest == (7, int(model(x).argmax()))


def test_a_hit_is_charged_its_own_end_work_and_lookups_run_while_hits_save_end_time(split):
    model, gm, dag, x = split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    # end half 1 ms, lookup +0.2 ms, a hit skips quantize + encode: 0.5 ms in all
    v.reference_s, v.lookup_s, v.hit_s = 1e-3, 2e-4, 5e-4
    policy = OnlinePolicy([v], audit_rate=0.0, end_slowdown=10.0)
    miss = policy.prepare(0, (x,))
    assert miss.reference_s == pytest.approx(1.2e-3)          # end half + lookup + send
    policy.on_result(0, model(x), [0.001, 100.0, 1e-6], False)  # a very fast link: end-bound
    hit = policy.prepare(1, (x,))
    assert hit.answered and hit.msg is None
    assert hit.reference_s == pytest.approx(5e-4)
    # a calibrated 50 % hit rate: 0.5 x 0.5 + 0.5 x 1.2 = 0.85 ms < 1 ms without lookups, so
    # lookups go on although the end is the bottleneck
    assert policy.end_stage_s(v) < v.reference_s * 10
    assert policy._cache_pays(v)
    # with hits as dear as misses they would only slow an end-bound stream down
    v.hit_s = 1.2e-3
    assert not policy._cache_pays(v)


def test_audited_hit_is_sent_flagged_and_a_wrong_center_corrected(split):
    model, gm, dag, x = split
    v, _, _ = variant(gm, dag, upto(dag, "relu"), 0, cache=cache_setup())
    policy = OnlinePolicy([v], audit_rate=1.0)
    policy.prepare(0, (x,))
    wrong = torch.zeros(1, 3)
    wrong[0, (int(model(x).argmax()) + 1) % 3] = 1.0        # a poisoned answer for this frame
    policy.on_result(0, wrong, [], False)
    prep = policy.prepare(1, (x,))
    assert prep.answered and prep.msg is not None
    assert decode(prep.msg)[2] & FLAG_CACHE_HIT
    policy.on_result(1, model(x), [], True)                   # the audit's reply
    assert policy.corrections == 1
    assert int(policy.prepare(2, (x,)).answer.argmax()) == int(model(x).argmax())


def test_pipeline_switches_plans_and_the_cloud_runs_the_matching_half(split):
    model, gm, dag, x = split
    v0, c0, b0 = variant(gm, dag, (), 0, min_bits=8)
    v1, c1, b1 = variant(gm, dag, upto(dag, "relu"), 1, min_bits=8)
    # cloud-only above 1 Mbit/s, the deeper cut below; the link runs at 0.2 Mbit/s, so the
    # estimate lands in the lower band and the switcher moves there after `hold` results
    v0.fixed_bits = (8,)
    policy = OnlinePolicy([v0, v1], edges_mbps=[1.0], band_plans=[1, 0], start=0, hold=3,
                          cache=False)
    link = InProcessLink(0.2, None)
    cloud = CloudWorker(None, None, link.cloud, plans={0: (c0, b0), 1: (c1, b1)}, adaptive=True).start()
    frames = [torch.randn(1, 1, 8, 8) for _ in range(30)]
    end = EndWorker(None, None, link.end, tree_flatten(model(x))[1], policy=policy, queue_size=1, max_inflight=1)
    try:
        outs, stats = end.run(frames)
    finally:
        end.close()
        cloud.join(2.0)
    assert policy.switches == 1 and policy.current == 1
    assert policy.plans_used[0] >= 3 and policy.plans_used[1] >= 10
    for f, o in zip(frames, outs):
        assert (o - model(f)).abs().max() < 0.1 * model(f).abs().max() + 0.05
    assert stats.n == 30 and stats.answered_on_end == 0


def test_pipeline_answers_hits_and_audits_without_losing_requests(split):
    model, gm, dag, x = split
    v, c, b = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8, cache=cache_setup())
    policy = OnlinePolicy([v], audit_rate=0.5, seed=3)
    link = InProcessLink(50.0, None)
    cloud = CloudWorker(None, None, link.cloud, plans={0: (c, b)}, adaptive=True).start()
    frames = [x] * 40
    end = EndWorker(None, None, link.end, tree_flatten(model(x))[1], policy=policy, queue_size=1, max_inflight=1)
    try:
        outs, stats = end.run(frames, pipelined=False)
    finally:
        end.close()
        cloud.join(2.0)
    assert len(outs) == 40 and stats.answered_on_end == policy.hits > 20
    assert all(int(o.argmax()) == int(model(x).argmax()) for o in outs)
    assert policy.audits > 0 and stats.dropped == 0


def test_a_request_is_finished_on_the_end_when_the_link_is_backlogged_or_stalled(split):
    model, gm, dag, x = split
    v, cloud, _ = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8)
    v.local_module, v.local_s = cloud, 1e-3            # the rest of the model: 1 ms here
    policy = OnlinePolicy([v], local=True, end_slowdown=10.0, cache=False)   # 10 ms there
    prep = policy.prepare(0, (x,))
    nbytes = len(prep.msg)
    # no estimate yet: only a silence as long as the local work says the link stalled
    assert policy.local_wait_s(0, 8, 0.004) == pytest.approx(0.006)
    assert policy.local_wait_s(0, 8, 0.011) == 0.0
    assert policy.local_wait_s(1, 8, 1.0) == math.inf        # not the request waiting
    # a link that carries one message per 1 ms: 7 ahead hold 7 ms < 10 ms, wait for it
    policy.on_result(0, model(x), [0.001, float(nbytes), 1e-3], False)
    prep = policy.prepare(1, (x,))
    assert policy.local_wait_s(1, 8, 0.0) == pytest.approx(0.010)
    # one per 5 ms: 35 ms of link time ahead, the end would idle: finish it there now
    for k in range(5):
        policy.on_result(1, model(x), [0.001, float(nbytes), 5e-3], False)
    assert policy.local_wait_s(1, 8, 0.0) == 0.0
    bits_before = sum(policy.bits_used.values())
    done = policy.finish_locally(1)
    assert done.answered and done.msg is None and done.reference_s == 1e-3
    assert torch.allclose(done.answer, model(x), atol=1e-6)    # unquantized: the model's answer
    assert policy.finished_locally == 1 and sum(policy.bits_used.values()) == bits_before - 1
    # without ``local`` a request always waits for the link
    assert OnlinePolicy([v], cache=False).local_wait_s(1, 8, 10.0) == math.inf


def test_pipeline_finishes_requests_on_the_end_through_an_outage(split):
    from coach_fx.traces import Trace
    model, gm, dag, x = split
    v, c, b = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8)
    v.local_module, v.local_s = c, 1e-4
    # 20 Mbit/s for 20 ms, then an outage of 0.6 s, then 20 Mbit/s again
    trace = Trace((0.0, 0.02, 0.62), (20.0, 0.0, 20.0), 10.0)
    out_spec = tree_flatten(model(x))[1]
    frames = [torch.randn(1, 1, 8, 8) for _ in range(300)]

    def run(local):
        policy = OnlinePolicy([v], local=local, cache=False, end_slowdown=10.0)
        link = InProcessLink(trace, None)
        cloud = CloudWorker(None, None, link.cloud, plans={0: (c, b)}, adaptive=True).start()
        end = EndWorker(None, None, link.end, out_spec, policy=policy, queue_size=1, max_inflight=2)
        try:
            outs, stats = end.run(frames)
        finally:
            end.close()
            cloud.join(2.0)
        return outs, stats, policy

    outs, stats, policy = run(True)
    assert stats.n == 300 and stats.dropped == 0
    # the outage lasts 0.6 s; a request takes well under 10 ms here: most went on, on the end
    assert stats.finished_on_end == policy.finished_locally > 100
    assert sum(policy.bits_used.values()) + stats.finished_on_end == 300
    for f, o in zip(frames, outs):
        assert (o - model(f)).abs().max() < 0.1 * model(f).abs().max() + 0.05
    # without it every request waits for the link
    outs2, waited, p2 = run(False)
    assert waited.finished_on_end == 0 and p2.finished_locally == 0
    assert sum(p2.bits_used.values()) == 300 and len(outs2) == 300


def test_a_cache_looking_up_inside_the_end_half_skips_the_rest_on_a_hit(split):
    from coach_fx.passes.split import split_at
    model, gm, dag, x = split
    setup = CacheSetup(sim_threshold=0.9, margin=0.0, hit_rate=0.5, grid=2, at="relu")
    v, cloud, boundary = variant(gm, dag, upto(dag, "body_1"), 0, cache=setup)
    head, tail = split_at(v.end_module, "relu")
    tails = []
    v.probe = (head, lambda *a: tails.append(1) or tail(*a))
    plain, _, _ = variant(gm, dag, upto(dag, "body_1"), 0)
    policy, reference = OnlinePolicy([v], audit_rate=0.0), OnlinePolicy([plain], cache=False)
    miss = policy.prepare(0, (x,))
    # a miss runs the rest of the end half and sends what the end half would have sent
    assert not miss.answered and tails == [1]
    assert miss.msg == reference.prepare(0, (x,)).msg
    policy.on_result(0, model(x), [], False)
    hit = policy.prepare(1, (x,))
    assert hit.answered and hit.msg is None and tails == [1]    # the rest never ran
    assert torch.equal(hit.answer, model(x))
    # the cache's centers are the probe's features (16 values: 4 channels x 2 x 2 cells)
    assert policy.caches[0].centers[int(model(x).argmax())].total.shape == (16,)
