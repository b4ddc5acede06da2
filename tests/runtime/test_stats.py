"""Ledger: a stream's per-request records; one that hands its results on holds a bounded
number of them however long it runs."""

from coach_fx.runtime import stats
from coach_fx.runtime.stats import PENDING, Ledger


def test_a_ledger_that_hands_results_on_folds_old_records(monkeypatch):
    monkeypatch.setattr(stats, "LEDGER_WINDOW", 1024)
    led = Ledger(keep=False)
    stuck = led.add(0.0)                            # request 0 stays pending a while
    for i in range(1, 6000):
        assert led.add(float(i)) == i
        led.settle(i, "out", i + 0.5)
    assert led.folded == 0 and len(led.results) == 6000      # the pending one holds them all
    led.settle(stuck, "late", 6000.0)
    for i in range(6000, 12000):
        led.add(float(i))
        led.settle(i, "out", i + 0.5)
    assert len(led) == 12000 and led.folded + len(led.settled()) == 12000
    assert len(led.results) < 3 * 1024 and led.base == led.folded      # bounded
    assert all(r is None for r in led.results)                         # no outputs kept
    assert led.pending_ids() == [] and not led.pending(5) and not led.pending(11999)


def test_a_ledger_that_keeps_results_keeps_every_record():
    led = Ledger()
    for i in range(3):
        led.add(float(i))
    led.settle(1, "one", 2.0)
    assert led.results == [PENDING, "one", PENDING] and led.pending_ids() == [0, 2]
    assert led.settled() == [(2.0, 1.0)] and led.folded == 0
