"""Load-aware planning: a cloud that K ends share prices each request's cloud stage at K ×
its batching efficiency, so the best cut moves toward the ends as K grows, and the plan made
for K ends is at least as fast for them as the plan made for one."""

import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.device_profile import device_times
from coach_fx.plan import evaluate
from coach_fx.settings import Device, Network


def chain():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)).eval(), torch.randn(4, 256)


def test_a_shared_cloud_costs_each_request_its_share():
    assert Device("cloud", ends=16, batch_efficiency=0.25).load == 4.0
    assert Device("cloud", ends=1, batch_efficiency=0.25).load == 1.0
    host = {"a": 1.0, "b": 2.0}
    assert device_times(host, Device("cloud", 2.0, ends=8, batch_efficiency=0.5)) == {"a": 8.0, "b": 16.0}
    with pytest.raises(ValueError, match="batch_efficiency"):
        Device("cloud", ends=4, batch_efficiency=1.5)
    with pytest.raises(ValueError, match="ends"):
        Device("cloud", ends=0)


def test_the_cut_moves_to_the_ends_as_they_share_the_cloud_and_wins_for_them():
    m, x = chain()
    net = Network(100)
    plans = {}
    for k in (1, 4, 16, 64):
        cm = coach_fx.compile(m, (x,), network=net, end=Device("end", 4.0),
                              cloud=Device("cloud", 1.0, ends=k), costs="analytic", progress=False)
        plans[k] = cm
        with torch.no_grad():
            assert torch.allclose(cm(x), m(x), atol=5e-2)
    ends_share = [len(plans[k].plan.end_nodes) for k in (1, 4, 16, 64)]
    assert ends_share == sorted(ends_share) and ends_share[-1] > ends_share[0]
    single = plans[1].plan
    for k in (4, 16, 64):
        loaded = plans[k]
        # the one-end plan priced for k ends sharing the cloud: never faster than k's own
        again = evaluate(loaded.dag, single.end_nodes, single.bits, net, input_bits=loaded.settings.input_bits)
        assert loaded.plan.period <= again.period * (1 + 1e-9)
    assert evaluate(plans[64].dag, single.end_nodes, single.bits, net,
                    input_bits=plans[64].settings.input_bits).period > 1.3 * plans[64].plan.period


def test_batch_efficiency_is_measured_within_its_range():
    from coach_fx.profile import measure_batch_efficiency
    eff = measure_batch_efficiency(nn.Linear(32, 32), (torch.randn(1, 32),), 8, repeat=3, rounds=2)
    assert 0 < eff <= 1
    with pytest.raises(ValueError, match="batch"):
        measure_batch_efficiency(nn.Linear(32, 32), (torch.randn(1, 32),), 0)
