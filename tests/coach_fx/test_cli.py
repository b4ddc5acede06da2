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
    assert "costs: every fx node timed on this host" in out      # it says what it measured
    # the baseline it compares with keeps the accuracy budget (JPEG's does not, on noise)
    best = out.split("vs best baseline ")[1].split()[0]
    row = next(line for line in out.splitlines() if line.startswith(best + " "))
    assert "over budget" not in row


def test_bad_model_spec():
    with pytest.raises(SystemExit):
        main(["plan", "--model", "torchvision:not_a_model"])


def test_serve_refuses_a_gloo_host_it_cannot_keep(capsys):
    """gloo's store listens on every interface: --host 127.0.0.1 would be a false promise."""
    with pytest.raises(SystemExit):
        main(["serve", "plan_dir", "--link", "gloo", "--host", "127.0.0.1"])
    assert "listens on every interface" in capsys.readouterr().err


def test_plan_save_signs_with_the_token_file(tmp_path, capsys):
    import json
    from coach_fx.deploy import ArtifactError, open_plan
    token = tmp_path / "token"
    token.write_text("a-token-of-at-least-16-bytes\n")
    d = tmp_path / "plan"
    assert main(["plan", "--model", "digits", "--costs", "analytic", "--save", str(d),
                 "--token-file", str(token)]) == 0
    assert "hmac_sha256" in json.loads((d / "manifest.json").read_text())
    open_plan(d, "end", key="a-token-of-at-least-16-bytes")
    with pytest.raises(ArtifactError):
        open_plan(d, "end", key="another-token-of-16-bytes")


def test_serve_with_ray_names_what_is_wrong(capsys):
    with pytest.raises(SystemExit, match="gloo"):
        main(["serve", "plan_dir", "--link", "gloo", "--host", "0.0.0.0", "--engine", "ray"])
    with pytest.raises(SystemExit, match="MIN:MAX"):
        main(["serve", "plan_dir", "--engine", "ray", "--autoscale", "4"])
    with pytest.raises(SystemExit, match="min <= max"):
        main(["serve", "plan_dir", "--engine", "ray", "--autoscale", "4:2"])
