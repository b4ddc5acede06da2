import pytest

from coach_fx.cli import main


def test_plan_prints_table(capsys):
    pytest.importorskip("torchvision")
    assert main(["plan", "--model", "torchvision:resnet18", "--uplink-mbps", "10",
                 "--slowdown", "8", "--costs", "analytic"]) == 0
    out = capsys.readouterr().out
    assert "plan: coach" in out and "T_link" in out and "period" in out


def test_plan_all_strategies(capsys):
    pytest.importorskip("torchvision")
    assert main(["plan", "--model", "mobilenet_v2", "--strategy", "all", "--costs", "analytic"]) == 0
    out = capsys.readouterr().out
    for s in ("coach", "neurosurgeon", "dads+int8", "qdmp", "end-only", "cloud-only"):
        assert s in out


def test_demo_runs_and_checks_against_eager(capsys):
    pytest.importorskip("torchvision")
    assert main(["demo", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "relative L2 error vs eager" in out and "neurosurgeon" in out


def test_bad_model_spec():
    with pytest.raises(SystemExit):
        main(["plan", "--model", "torchvision:not_a_model"])
