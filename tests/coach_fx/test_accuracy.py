"""The accuracy oracle and the budget on a trained model (digits)."""

import pytest

import coach_fx
from coach_fx.accuracy import AccuracyOracle
from coach_fx.compiled import prepare
from coach_fx.settings import Device, Network, Settings


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from coach_fx.digits import digits_splits, load_digits_model
    return load_digits_model(), digits_splits()


def test_digits_model_is_trained(digits):
    from coach_fx.digits import accuracy
    model, (_, calib, test) = digits
    assert accuracy(model, *calib) > 0.95 and accuracy(model, *test) > 0.95
    assert calib[0].shape[0] + test[0].shape[0] < 1797   # disjoint slices of one permutation


# A fast link and an end device close to the cloud: the period is balanced by cutting in the
# middle with few bits, so the budget decides the bits.
@pytest.mark.parametrize("mbps,slowdown", [(20.0, 1.0), (50.0, 1.5), (200.0, 2.0)])
def test_budget_holds_on_the_test_split(digits, mbps, slowdown):
    from coach_fx.digits import accuracy
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
    s = Settings(costs="analytic", progress=False, calibration=(xc, yc))
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
    agree = AccuracyOracle(gm, dag, Settings(costs="analytic", calibration=xc), inputs)
    assert agree.mode == "agreement"
    l2 = AccuracyOracle(gm, dag, Settings(costs="analytic"), inputs)
    assert l2.mode == "l2" and l2.budget == 0.02

