import numpy as np
import torch

from coach_fx.online.cache_calibration import tune_thresholds, replay
from coach_fx.zoo.streams import locality_stream
from coach_fx.runtime.cache import SemanticCache
from coach_fx.runtime.features import pooled_features


def unit(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=0)


def test_pooled_features_and_calibration():
    f = pooled_features([torch.randn(1, 4, 5, 5), torch.randn(1, 3)])
    assert f.shape == (7,) and abs(float(np.linalg.norm(f)) - 1) < 1e-5
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    labels = torch.arange(5).repeat(40)
    feats = torch.nn.functional.normalize(protos[labels] + 0.3 * torch.randn(200, 16, generator=g), dim=1)
    streams = [locality_stream(labels[h::2], 400, 10.0, seed=h) for h in (0, 1)]
    streams = [[2 * i + h for i in s] for h, s in zip((0, 1), streams)]
    st, mg, rate = tune_thresholds(feats, labels, streams, budget=0.01, capacity=3)
    assert 0 < rate <= 1 and st >= 0.7
    cache = SemanticCache(st, mg, capacity=3, audit_rate=0.0)
    hits, wrong = replay(cache, feats, labels, streams[0])
    assert wrong + 1 <= 0.01 * len(streams[0]) and hits > 0


def test_replay_learns_answers_late():
    feats = torch.stack([unit(1, 0, 0), unit(1, 0.02, 0)])
    labels = torch.tensor([5, 5])
    stream = [0, 1] * 5
    # learning at once: every frame after the first hits; ``lag`` requests late: the first
    # ``lag`` frames miss (their answers are still on the way back)
    for lag in (0, 3):
        cache = SemanticCache(sim_threshold=0.9, margin=0.0, audit_rate=0.0)
        hits, wrong = replay(cache, feats, labels, stream, lag=lag)
        assert (hits, wrong) == (len(stream) - max(lag, 1), 0)


def test_context_calibration_is_at_least_as_safe_on_a_local_stream():
    g = torch.Generator().manual_seed(1)
    protos = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    labels = torch.arange(6).repeat(40)
    feats = torch.nn.functional.normalize(protos[labels] + 0.45 * torch.randn(240, 16, generator=g), dim=1)
    streams = [[2 * i + h for i in locality_stream(labels[h::2], 600, 10.0, seed=h)] for h in (0, 1)]
    for context in (False, True):
        st, mg, rate = tune_thresholds(feats, labels, streams, budget=0.01, capacity=3,
                                           context=context, lag=4)
        for s in streams:
            hits, wrong = replay(SemanticCache(st, mg, 3, 0.1, context=context), feats, labels, s, lag=4)
            assert wrong + 1 <= 0.01 * len(s)
        assert rate > 0
