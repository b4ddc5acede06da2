"""Device emulation: a stage that runs ``slowdown ×`` slower than this host, on a clock.

The work runs for real; then the stage waits until ``slowdown ×`` its time has passed. The
clock is injectable (``coach_fx.runtime.links.base``): a real one for streams, a virtual one
for tests that must not depend on how fast the host is.

Example::

    >>> from coach_fx.runtime.links.base import VirtualClock
    >>> clock = VirtualClock()
    >>> emulate(clock.now(), 4.0, end_host_s=0.01, clock=clock)
    0.04
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from coach_fx.runtime.links.base import Clock, RealClock

_REAL = RealClock()


#: GIL switch interval during a stream. The pipeline hands each request from thread to thread
#: (compute -> sender -> cloud -> receiver); with Python's default of 5 ms a thread woken by
#: such a handoff can wait that long for the GIL, which cost ~10 % per request here.
SWITCH_INTERVAL_S = 0.00005


@contextmanager
def fast_handoff() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def emulate(start: float, slowdown: float, end_host_s: float | None = None,
            clock: Clock = _REAL) -> float:
    """Wait so that the work begun at ``start`` seems to run ``slowdown`` times slower.

    With ``end_host_s`` (the work's time measured alone, before the stream) the target is
    ``slowdown × end_host_s``: then a stage that shares this host's cores with the other
    stage is not charged that interference ``slowdown`` times over; work that still takes
    longer than the target is not cut short.
    """
    took = clock.now() - start
    if slowdown > 1.0:
        target = start + max(took, (end_host_s if end_host_s is not None else took) * slowdown)
        clock.sleep_until(target)
    return clock.now() - start


__all__ = ["SWITCH_INTERVAL_S", "emulate", "fast_handoff"]
