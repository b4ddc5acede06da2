import numpy as np
import torch

from coach_fx.runtime.cache import SemanticCache, locality_stream, pooled_features


def unit(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=0)


def test_never_answers_for_an_unseen_class():
    cache = SemanticCache(sim_threshold=0.5, margin=0.0)
    assert not cache.lookup(unit(1, 0, 0)).hit
    cache.confirm(unit(1, 0, 0), label=3)
    for _ in range(50):
        r = cache.lookup(torch.nn.functional.normalize(torch.randn(3), dim=0))
        assert r.label in (None, 3)
    assert cache.lookup(unit(1, 0.05, 0)).label == 3


def test_margin_blocks_ambiguous_hits():
    cache = SemanticCache(sim_threshold=0.5, margin=0.2)
    cache.confirm(unit(1, 0, 0), 0)
    cache.confirm(unit(0, 1, 0), 1)
    assert not cache.lookup(unit(1, 1, 0)).hit        # equally close to both
    assert cache.lookup(unit(1, 0.1, 0)).label == 0


def test_audit_corrects_a_wrong_center():
    cache = SemanticCache(sim_threshold=0.9, margin=0.0, audit_rate=1.0)
    cache.confirm(unit(0, 1, 0), label=7)             # poisoned: class 2's features under 7
    r = cache.lookup(unit(0, 1, 0.05))
    assert r.hit and r.label == 7 and r.audit
    assert cache.audit(unit(0, 1, 0.05), cached=7, cloud=2) is False
    assert 7 not in cache.centers and cache.corrections == 1
    assert cache.lookup(unit(0, 1, 0)).label == 2


def test_capacity_keeps_recent_and_frequent_classes():
    cache = SemanticCache(capacity=2, sim_threshold=0.9, margin=0.0)
    for _ in range(5):
        cache.confirm(unit(1, 0, 0), 0)               # frequent
    cache.confirm(unit(0, 1, 0), 1)
    cache.confirm(unit(0, 0, 1), 2)                   # evicts the rarer class 1
    assert set(cache.centers) == {0, 2} and cache.evictions == 1


def test_pooled_features_and_calibration():
    f = pooled_features([torch.randn(1, 4, 5, 5), torch.randn(1, 3)])
    assert f.shape == (7,) and abs(float(np.linalg.norm(f)) - 1) < 1e-5
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    labels = torch.arange(5).repeat(40)
    feats = torch.nn.functional.normalize(protos[labels] + 0.3 * torch.randn(200, 16, generator=g), dim=1)
    streams = [locality_stream(labels[h::2], 400, 10.0, seed=h) for h in (0, 1)]
    streams = [[2 * i + h for i in s] for h, s in zip((0, 1), streams)]
    st, mg, rate = SemanticCache.calibrate_on_stream(feats, labels, streams, budget=0.01, capacity=3)
    assert 0 < rate <= 1 and st >= 0.7
    cache = SemanticCache(st, mg, capacity=3, audit_rate=0.0)
    hits, wrong = cache.replay(feats, labels, streams[0])
    assert wrong + 1 <= 0.01 * len(streams[0]) and hits > 0
