"""Device profiles: times measured on the real device (``coach profile``) price the plan."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.cli import main
from coach_fx.device_profile import FORMAT, device_times, read_profile
from coach_fx.settings import Device


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10)).eval()


def _profile(tmp_path, name: str, rates: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"format": FORMAT, "device": name, "op_rates_s_per_flop": rates}))
    return str(path)


def test_a_profile_where_the_end_is_fast_on_convolutions_moves_the_cut(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    cloud = Device.from_profile(_profile(tmp_path, "gpu", {"Conv2d": 1e-12, "Linear": 1e-12}))
    plans = {}
    for name, rates in {"convs_fast": {"Conv2d": 1e-12, "Linear": 1e-6},
                        "all_slow": {"Conv2d": 1e-6, "Linear": 1e-6}}.items():
        end = Device.from_profile(_profile(tmp_path, name, rates))
        cm = coach_fx.compile(_net(), (x,), end=end, cloud=cloud, network=coach_fx.Network(1.0),
                              costs="analytic", bits=(8, 32), progress=False)
        plans[name] = cm.plan
        # the plan's end time is the profile's: FLOPs at the op's rate, not this host's
        conv_flops = cm.dag.info["_0"].flops
        assert cm.dag.info["_0"].t_end == pytest.approx(conv_flops * rates["Conv2d"])
    ends = {k: set(p.end_nodes) for k, p in plans.items()}
    assert {"_0", "_2"} <= ends["convs_fast"] and "_8" not in ends["convs_fast"]
    assert "_0" not in ends["all_slow"]          # the frame goes to the cloud instead


def test_node_times_win_over_op_rates_and_unpriced_nodes_use_the_slowdown(tmp_path):
    dev = Device("pi", 3.0, {"a": 0.5}, {"Conv2d": 2.0})
    ops = {"a": ("Conv2d", 10.0), "b": ("Conv2d", 10.0), "c": ("relu", 10.0)}
    assert device_times({"a": 1.0, "b": 1.0, "c": 1.0}, dev, ops) == {"a": 0.5, "b": 20.0, "c": 3.0}


def test_coach_profile_writes_a_file_that_plans_read(tmp_path, capsys):
    out = tmp_path / "here.json"
    assert main(["profile", "--model", "digits", "--out", str(out), "--repeat", "1"]) == 0
    dev = read_profile(out)
    assert dev.node_costs and dev.op_rates and all(v >= 0 for v in dev.node_costs.values())
    assert dev.quant_costs and 8 in dev.quant_costs and all(q > 0 and d > 0 for q, d in dev.quant_costs.values())
    assert main(["plan", "--model", "digits", "--costs", "analytic", "--end-profile", str(out),
                 "--budget", "0.05"]) == 0
    assert "coach" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("{}", "format"),
    (json.dumps({"format": FORMAT, "node_times_s": {"a": -1}}), "non-negative"),
    (json.dumps({"format": FORMAT, "op_rates_s_per_flop": [1]}), "must be an object"),
    (json.dumps({"format": FORMAT, "quant_s_per_elem": {"40": [1e-9, 1e-9]}}), "width 1-31"),
    (json.dumps({"format": FORMAT, "quant_s_per_elem": {"8": [1e-9]}}), "quantize, dequantize"),
    ("not json", "not JSON"),
])
def test_a_bad_profile_is_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Device.from_profile(str(path))


def test_a_csv_profile_gives_node_times(tmp_path):
    path = tmp_path / "pi.csv"
    path.write_text("node,seconds\nconv1,0.25\nfc,0.5\n")
    dev = Device.from_profile(str(path))
    assert dev.name == "pi" and dict(dev.node_costs) == {"conv1": 0.25, "fc": 0.5}
    with pytest.raises(FileNotFoundError):
        Device.from_profile(str(tmp_path / "missing.json"))


def test_a_profiles_quantization_costs_price_its_crossings(tmp_path):
    """The end pays its own quantize+pack per element, the cloud its own unpack+dequantize; a
    width the profile leaves out costs this host's figure x the slowdown."""
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "pi.json"
    path.write_text(json.dumps({"format": FORMAT, "device": "pi", "quant_s_per_elem": {"8": [3e-7, 5e-7]}}))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"format": FORMAT, "device": "gpu", "quant_s_per_elem": {"8": [7e-9, 2e-9]}}))
    cm = coach_fx.compile(_net(), (x,), end=Device.from_profile(str(path)), cloud=Device.from_profile(str(gpu)),
                          network=coach_fx.Network(1.0), costs="analytic", bits=(4, 8, 32), progress=False)
    assert cm.dag.quant_cost(8) == (3e-7, 2e-9)
    from coach_fx.profile import ANALYTIC_QUANT_S_PER_ELEM
    assert cm.dag.quant_cost(4) == (ANALYTIC_QUANT_S_PER_ELEM, ANALYTIC_QUANT_S_PER_ELEM)   # slowdown 1
