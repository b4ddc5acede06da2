import types

import pytest

import coach_fx.runtime.timing as timing
from coach_fx.runtime.timing import busy_since, run_times


class FakeTime(types.SimpleNamespace):
    """Wall and process-CPU clocks the test moves by hand (no sleeping, no real clock)."""

    def __init__(self):
        super().__init__(wall=0.0, cpu=0.0)

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu


def test_busy_time_is_the_smaller_of_wall_and_cpu(monkeypatch):
    """A loaded host stretches the wall time of our compute, not its CPU time; an op spread
    over threads uses more CPU than wall time; a wait uses no CPU."""
    t = FakeTime()
    monkeypatch.setattr(timing, "time", t)
    start = timing.clock()
    t.wall, t.cpu = 2.0, 1.0            # computed 1 s while another process took the core
    assert busy_since(start) == 1.0
    start = timing.clock()
    t.wall, t.cpu = 2.5, 2.0            # 0.5 s of wall on two threads
    assert busy_since(start) == 0.5
    start = timing.clock()
    t.wall = 3.5                        # waited 1 s
    assert busy_since(start) == 0.0


def test_run_times_gives_one_busy_time_per_run(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(timing, "time", t)

    def work():
        t.wall += 0.3
        t.cpu += 0.2
    assert run_times(work, repeat=3, warmup=1) == pytest.approx([0.2, 0.2, 0.2])
