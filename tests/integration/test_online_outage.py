"""Finishing requests on the end device through a real-time outage of the in-process link
(real time: how many requests go on during the outage depends on the host's speed, so the
test asserts outcomes: every request answered once, in order, close to the model's answer)."""

import math

import torch

from coach_fx.passes._compat import tree_flatten
from coach_fx.passes.partition import partition
from coach_fx.runtime.cloud import CloudWorker
from coach_fx.runtime.config import Bands, CacheConfig, ControlConfig, PolicyConfig, StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.links import InProcessLink
from coach_fx.runtime.plans import CrossingBits, CutProfile, EndHalf, FinishOnEnd, Sizes, Variant
from coach_fx.runtime.policy import OnlinePolicy
from coach_fx.runtime.traces import Trace


def variant(gm, dag, end_nodes, pid, min_bits=4, compute_s=0.01):
    end, cloud, boundary = partition(gm, end_nodes, {})
    numel = sum(math.prod(c.shape) for c in boundary.crossings)
    prof = CutProfile(Sizes((numel,), n_tensors=len(boundary.crossings)), min_bits, compute_s, 0.0)
    v = Variant(pid, EndHalf(end), boundary, prof, CrossingBits(tuple(None for _ in boundary.crossings), min_bits))
    return v, cloud, boundary


def online_policy(variants, *, finish_on_end, end_slowdown):
    return OnlinePolicy(variants, Bands(), PolicyConfig(ControlConfig(), CacheConfig(enabled=False),
                                                        finish_on_end, end_slowdown))


def upto(dag, name):
    return tuple(v for v in dag.nodes if v in dag.ancestors([name]))


def test_pipeline_finishes_requests_on_the_end_through_an_outage(tiny_split):
    model, gm, dag, x = tiny_split
    v, c, b = variant(gm, dag, upto(dag, "relu"), 0, min_bits=8)
    v.finish_on_end = FinishOnEnd(c, 1e-4)
    # 20 Mbit/s for 20 ms, then an outage of 0.6 s, then 20 Mbit/s again
    trace = Trace((0.0, 0.02, 0.62), (20.0, 0.0, 20.0), 10.0)
    out_spec = tree_flatten(model(x))[1]
    frames = [torch.randn(1, 1, 8, 8) for _ in range(300)]

    def run(local):
        policy = online_policy([v], finish_on_end=local, end_slowdown=10.0)
        link = InProcessLink(trace, None)
        cloud = CloudWorker({0: (c, b)}, link.cloud, adaptive=True).start()
        end = EndWorker(link.end, out_spec, policy, StreamConfig(queue_size=1, max_inflight=2))
        try:
            outs, stats = end.run(frames)
        finally:
            end.close()
            cloud.join(2.0)
        return outs, stats, policy

    outs, stats, policy = run(True)
    assert stats.n == 300 and stats.outcomes.dropped == 0
    # the outage lasts 0.6 s of real time: requests went on, on the end (how many depends on
    # how fast this host is today, so only that some did)
    assert stats.outcomes.finished_on_end == policy.finished_on_end > 0
    assert sum(policy.bits_used.values()) + stats.outcomes.finished_on_end == 300
    for f, o in zip(frames, outs):
        assert (o - model(f)).abs().max() < 0.1 * model(f).abs().max() + 0.05
    # without it every request waits for the link
    outs2, waited, p2 = run(False)
    assert waited.outcomes.finished_on_end == 0 and p2.finished_on_end == 0
    assert sum(p2.bits_used.values()) == 300 and len(outs2) == 300
