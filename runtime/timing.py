"""Timing work on this host as it would run alone: the one home of the quiet-timing rule (the
emulated device's time is this × its slowdown, so host noise must not be multiplied).

Example::

    >>> t = quiet_time(lambda: sum(range(1000)), rounds=2)
    >>> t > 0
    True
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch


def clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds now; ``busy_since`` turns one into busy seconds."""
    return time.perf_counter(), time.process_time()


def busy_since(start: tuple[float, float]) -> float:
    """Seconds of compute since ``start`` (``clock()``) as this host alone would take them: the
    smaller of the wall time and the CPU time this process used. Other processes' load
    stretches the wall time of our compute, not its CPU time (a loaded host made a plan
    measured on it flip to cloud-only); an op spread over threads uses more CPU than wall
    time, so on an idle host the wall time stands. Only for compute: a wait uses no CPU."""
    wall, cpu = clock()
    return min(wall - start[0], cpu - start[1])


def run_times(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Busy seconds (``busy_since``) of each of ``repeat`` runs of ``fn`` after ``warmup``
    untimed runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        ts.append(busy_since(t0))
    return ts


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """The median of ``run_times``."""
    return statistics.median(run_times(fn, repeat, warmup))


def quiet_times(fns: Sequence[Callable[[], Any]], repeat: int = 12, warmup: int = 10,
                 rounds: int = 10, pause_s: float = 0.01) -> list[float]:
    """The time of each of ``fns`` alone on this host: per function the lowest of ``rounds``
    lower quartiles of ``repeat`` runs each, with the garbage collector held off (as ``timeit``
    does). On a shared machine runs carry other processes' load, sometimes for a whole round;
    the emulated device's time is this × its slowdown, so that noise would be multiplied too,
    and would decide between plans. The functions take their rounds in turn, with a pause
    between rounds, so that a burst of load longer than a round cannot hit all of one's
    rounds, and paths compared with each other (a hit, a miss, no cache) see the same host.
    A host slowed down for longer than all the rounds (seconds, seen here) is caught by a fixed
    yardstick workload timed before and after each round: each round's times are scaled by
    how much slower than its best the yardstick ran then (the faster of its two timings, so
    that a burst on the yardstick alone does not make the round look fast)."""
    quart = [[] for _ in fns]
    speed = []
    was = gc.isenabled()
    gc.disable()

    def lower_quartile(fn: Callable[[], Any], n: int, skip: int) -> float:
        return statistics.quantiles(run_times(fn, n, skip), n=4)[0]

    try:
        for r in range(rounds):
            before = lower_quartile(host_speed_work, repeat, warmup if r == 0 else 0)
            for k, fn in enumerate(fns):
                quart[k].append(lower_quartile(fn, repeat, warmup if r == 0 else 0))
            speed.append(min(before, lower_quartile(host_speed_work, repeat, 0)))
            time.sleep(pause_s)
    finally:
        if was:
            gc.enable()
    fastest = min(speed)
    return [min(q * fastest / s for q, s in zip(qs, speed)) for qs in quart]


_REF = (torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3), np.random.default_rng(0).random(256))


def host_speed_work() -> None:
    """A fixed request-sized mix of what the measured paths do (a small convolution, numpy on
    a short vector, interpreter work), to tell how fast the host runs at the moment."""
    with torch.no_grad():
        torch.nn.functional.conv2d(_REF[0], _REF[1], padding=1)
    float(_REF[2] @ _REF[2])
    sum(range(100))


def quiet_time(fn: Callable[[], Any], **kw: Any) -> float:
    """``quiet_times`` of one function."""
    return quiet_times([fn], **kw)[0]


__all__ = ["busy_since", "clock", "median_time", "quiet_time", "quiet_times", "host_speed_work", "run_times"]
