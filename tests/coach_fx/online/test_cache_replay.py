import numpy as np
import pytest
import torch

from coach_fx.online.cache_calibration import replay
from coach_fx.online.cache_replay import Replays, Stops, replay_many
from coach_fx.runtime.cache import SemanticCache
from coach_fx.zoo.streams import locality_stream


def clusters(seed, classes=6, per=30, dim=12, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat(per)
    return protos[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("lag", [0, 1, 4])
def test_many_caches_at_once_replay_as_each_cache_does(lag):
    """Every (threshold, margin, context, grid, stream) row counts the hits and wrong hits
    that a SemanticCache replayed alone counts (evictions, audits, corrections, context)."""
    f1, labels = clusters(0)
    f2 = f1[:, :5] * 3.0            # a second feature set of another size and scale
    streams = [locality_stream(labels, 300, 6.0, seed=s) for s in (1, 2)]
    sims, margins = (0.5, 0.8, 0.95), (0.0, 0.1)
    r = replay_many([f1, f2], labels, Replays.every(streams, sims, margins, (False, True), grids=2),
                    capacity=3, audit_rate=0.3, lag=lag)
    k = 0
    for g, feats in enumerate((f1, f2)):
        for context in (False, True):
            for mg in margins:
                for st in sims:
                    for stream in streams:
                        cache = SemanticCache(st, mg, 3, 0.3, context=context)
                        assert (int(r.hits[k]), int(r.wrong[k])) == replay(cache, feats, labels, stream, lag)
                        k += 1
    assert r.hits.sum() > 0 and r.wrong.sum() > 0 and not r.failed.any()


def test_a_cache_that_breaks_its_limit_stops_with_the_looser_ones_of_its_group():
    f, labels = clusters(3, noise=1.5)
    stream = locality_stream(labels, 400, 3.0, seed=0)
    rows = [(0, st, 0.0, False, 0) for st in (0.99, 0.6, 0.3)] + [(0, 0.6, 0.0, False, 0)]
    # group 0: three thresholds strictest first; the last row alone in group 1, no limit
    stops = Stops(np.array([5, 5, 5, np.inf]), np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]))
    r = replay_many([f], labels, Replays.of([stream], rows, stops), capacity=4)
    alone = replay(SemanticCache(0.6, 0.0, 4, 0.1), f, labels, stream, 0)
    assert alone[1] + 1 > 5, "the loose threshold must break the limit for this test to mean anything"
    assert list(r.failed) == [False, True, True, False]
    assert (int(r.hits[3]), int(r.wrong[3])) == alone
    assert r.wrong[1] + 1 > 5       # its counts show where it broke
