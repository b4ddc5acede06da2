import torch

from coach_fx.runtime.cache import SemanticCache


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


def test_context_answers_only_for_the_latest_known_class():
    cache = SemanticCache(sim_threshold=0.9, margin=0.0, context=True)
    cache.confirm(unit(1, 0, 0), 0, seq=0)
    cache.confirm(unit(0, 1, 0), 1, seq=1)
    assert not cache.lookup(unit(1, 0.05, 0), seq=2).hit   # confident, but the stream is on 1
    r = cache.lookup(unit(0.05, 1, 0), seq=3)
    assert r.hit and r.label == 1
    # a late answer for an earlier request does not move the context back
    cache.confirm(unit(1, 0, 0), 0, seq=2)
    assert cache.latest == (3, 1) and cache.lookup(unit(0.05, 1, 0), seq=4).hit
    cache.note(5, 0)                                        # the stream moved on to class 0
    assert cache.lookup(unit(1, 0.05, 0), seq=6).label == 0
    # without the context the same cache state answers for either class
    plain = SemanticCache(sim_threshold=0.9, margin=0.0)
    plain.centers = cache.centers
    assert plain.lookup(unit(0.05, 1, 0)).label == 1 and plain.lookup(unit(1, 0.05, 0)).label == 0
