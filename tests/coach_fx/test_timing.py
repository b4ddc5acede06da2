import time

from coach_fx.timing import busy_since, clock, run_times


def test_busy_time_counts_compute_not_waiting():
    """A loaded host stretches the wall time of our compute, not its CPU time: busy time is
    the smaller of the two, so a wait (no CPU used) counts for almost nothing."""
    t0 = clock()
    time.sleep(0.2)
    assert busy_since(t0) < 0.1
    t0 = clock()
    sum(i * i for i in range(200_000))
    assert busy_since(t0) > 0
    assert len(run_times(lambda: sum(range(1000)), repeat=3)) == 3
