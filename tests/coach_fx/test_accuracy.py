"""The accuracy oracle and the budget on a trained model (digits)."""

import pytest

import coach_fx
from coach_fx.accuracy import AccuracyOracle
from coach_fx.driver import prepare
from coach_fx.settings import Device, Network, Settings


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from coach_fx.zoo.digits import digits_splits, load_digits_model
    return load_digits_model(), digits_splits()


def test_digits_model_is_trained(digits):
    from coach_fx.zoo.digits import accuracy
    model, (_, calib, test) = digits
    assert accuracy(model, *calib) > 0.95 and accuracy(model, *test) > 0.95
    assert calib[0].shape[0] + test[0].shape[0] < 1797   # disjoint slices of one permutation


# A fast link and an end device close to the cloud: the period is balanced by cutting in the
# middle with few bits, so the budget decides the bits.
@pytest.mark.parametrize("mbps,slowdown", [(50.0, 1.2), (50.0, 1.5), (200.0, 2.0)])
def test_budget_holds_on_the_test_split(digits, mbps, slowdown):
    from coach_fx.zoo.digits import accuracy
    model, (_, (xc, yc), (xt, yt)) = digits
    x = xc[:64]
    cm = coach_fx.compile(model, (x,), network=Network(mbps), end=Device("end", slowdown),
                          calibration=(xc, yc), accuracy_budget=0.005, costs="analytic",
                          progress=False)
    assert cm.oracle.mode == "labels"
    calib_drop = cm.plan.accuracy
    assert calib_drop <= 0.005 + 1e-9
    assert any(b < 32 for x, b in cm.plan.bits.items() if x not in cm.dag.inputs)
    ref, got = [], []
    for i in range(0, len(yt) - 63, 64):   # the compiled model takes batches of the example shape
        ref.append(accuracy(model, xt[i:i + 64], yt[i:i + 64]))
        got.append(accuracy(cm, xt[i:i + 64], yt[i:i + 64]))
    test_drop = sum(ref) / len(ref) - sum(got) / len(got)
    print(f"{mbps} Mbit/s: bits {cm.plan.bits} calib drop {calib_drop:.4f} test drop {test_drop:.4f}")
    assert test_drop <= 0.01


def test_oracle_modes_and_memo(digits):
    model, (_, (xc, yc), _) = digits
    x = xc[:8]
    s = Settings.of(costs="analytic", progress=False, calibration=(xc, yc))
    gm, inputs, dag = prepare(model, (x,), s)
    o = AccuracyOracle(gm, dag, s, inputs)
    end = dag.ancestors(["res1_a_2"]) if "res1_a_2" in dag.index else dag.ancestors([dag.nodes[5]])
    cut = dag.crossing(end)
    assert o.metric(end, {c: 32 for c in cut}) == 0.0 and o.evals == 0
    m2 = o.metric(end, {c: 2 for c in cut})
    o.metric(end, {c: 2 for c in cut})
    assert o.evals == 1                       # memoized by (crossing set, bits)
    assert o.metric(end, {c: 8 for c in cut}) <= max(m2, 0.0) + 0.01
    b = o.min_bits(end)
    assert b in s.bits and o.ok(end, {c: b for c in cut})
    agree = AccuracyOracle(gm, dag, Settings.of(costs="analytic", calibration=xc), inputs)
    assert agree.mode == "agreement"
    l2 = AccuracyOracle(gm, dag, Settings.of(costs="analytic"), inputs)
    assert l2.mode == "l2" and l2.budget == 0.02


def test_a_failing_check_stops_early_and_agrees_with_full_runs(digits):
    """The check stops once the harmful changes exceed what the bound allows (they only grow),
    so every answer is the one a run over the whole calibration set gives."""
    model, (_, (xc, yc), _) = digits
    s = Settings.of(costs="analytic", progress=False, calibration=(xc, yc))
    gm, inputs, dag = prepare(model, (xc[:1],), s)
    lazy, full = AccuracyOracle(gm, dag, s, inputs), AccuracyOracle(gm, dag, s, inputs)
    ends = [dag.ancestors([v]) for v in dag.nodes[2:-2:3]]
    stopped = 0
    for end in ends:
        for b in (2, 3, 4, 8):
            bits = {c: b for c in dag.crossing(end)}
            before = lazy.samples_run
            verdict = lazy.ok(end, bits)
            full.metric(end, bits)                      # the whole set first, then the verdict
            assert verdict == full.ok(end, bits)
            stopped += lazy.samples_run - before < lazy.n
    assert stopped > 0 and lazy.samples_run < full.samples_run


def test_confidence_bound_values():
    from coach_fx.accuracy import flip_bound, samples_needed
    assert samples_needed(0.005, 0.9) == 460 and samples_needed(0.05, 0.9) == 45
    assert flip_bound(0, 460, 0.9) <= 0.005 < flip_bound(0, 459, 0.9)
    assert flip_bound(1, 1000, 0.9) > 1 / 1000          # a bound, not the rate seen
    assert flip_bound(5, 5, 0.9) == 1.0


def test_tiny_calibration_is_refused_with_the_samples_needed(digits):
    from coach_fx.accuracy import CalibrationTooSmall
    model, (_, (xc, yc), _) = digits
    with pytest.raises(CalibrationTooSmall, match="needs at least 460 calibration samples.*got 40"):
        coach_fx.compile(model, (xc[:1],), network=Network(50), end=Device("end", 2),
                         calibration=(xc[:40], yc[:40]), costs="analytic", progress=False)
    # a looser budget needs fewer samples; no statistical claim (None) takes any size
    cm = coach_fx.compile(model, (xc[:1],), network=Network(50), end=Device("end", 2),
                          calibration=(xc[:60], yc[:60]), accuracy_budget=0.05, costs="analytic",
                          progress=False)
    assert cm.oracle.n == 60 and "90% confidence" in cm.plan.note
    coach_fx.compile(model, (xc[:1],), network=Network(50), end=Device("end", 2), costs="analytic",
                     calibration=(xc[:40], yc[:40]), accuracy_confidence=None, progress=False)


def test_without_calibration_several_inputs_are_checked(digits):
    model, (_, (xc, _), _) = digits
    s = Settings.of(costs="analytic", progress=False)
    gm, inputs, dag = prepare(model, (xc[:2],), s)
    o = AccuracyOracle(gm, dag, s, inputs)
    assert o.mode == "l2" and o.n == 16                  # the example batch and 7 drawn like it
    assert "not an accuracy claim" in o.describe()


def test_digits_budget_holds_on_unseen_data_for_18_plans(digits):
    """Every plan over 2 models x 3 end devices x 3 uplinks keeps the default budget (0.5 pt)
    on the test split, which no plan saw."""
    import dataclasses

    from coach_fx.driver import plan_model
    from coach_fx.profile import build_dag
    from coach_fx.zoo.digits import digits_splits, load_digits_model
    drops, lossy = [], 0
    for frame in (8, 32):
        model = load_digits_model(frame)
        _, (xc, yc), (xt, yt) = digits_splits(frame=frame)
        base = Settings.of(costs="analytic", progress=False, calibration=(xc, yc))
        gm, inputs, _ = prepare(model, (xc[:1],), base)
        oracle = test = None
        for slowdown in (1.0, 2.0, 4.0):
            s = dataclasses.replace(base, end=Device("end", slowdown))
            dag = build_dag(gm, inputs, s)
            if oracle is None:
                oracle = AccuracyOracle(gm, dag, s, inputs)
                test = AccuracyOracle(gm, dag, s.replace(calibration=(xt, yt),
                                                                   accuracy_confidence=None), inputs)
            for mbps in (5.0, 50.0, 200.0):
                p, _ = plan_model(gm, inputs, dag, dataclasses.replace(s, network=Network(mbps)), oracle=oracle)
                drops.append(test.metric(p.end_nodes, p.bits, p.codecs))
                lossy += bool(p.codecs) or any(b < 32 for b in p.bits.values())
    print("test-split drops (pt):", [round(d * 100, 2) for d in drops], "lossy plans:", lossy)
    assert len(drops) == 18 and lossy >= 9
    assert max(drops) <= 0.005 + 1e-9
