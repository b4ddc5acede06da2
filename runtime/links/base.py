"""The link contract: the :class:`Endpoint` protocol every link implements, its errors,
clocks (real or virtual), the token bucket that paces a sender to a bandwidth trace, and
a rate-limited log for what peers may trigger at will (refused connections).

Example::

    >>> clock = VirtualClock()
    >>> bucket = TokenBucket(Trace.constant(8), clock)   # 8 Mbit/s = 1 MB/s
    >>> bucket.wait(500_000); bucket.finish()
    0.0
    0.5
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Protocol

from coach_fx.runtime.traces import Trace

#: The largest message a link accepts; the announced length is checked before allocating.
MAX_MESSAGE = 1 << 30


class LinkError(RuntimeError):
    """The link failed."""


class LinkTimeout(LinkError):
    """Nothing arrived within the timeout."""


class PeerGone(LinkError):
    """The other side closed the link or died."""


class Endpoint(Protocol):
    """One side of a link. Every link implements all of it (no optional methods)."""

    #: the peer's address, for messages and logs
    addr: str

    def send(self, msg: bytes) -> float:
        """Send one whole message; returns the seconds the sender was busy with it."""

    def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message (:class:`LinkTimeout` after ``timeout`` s)."""

    def ready(self) -> bool:
        """Whether a message can be received now without waiting (False where unknown)."""

    def abort(self) -> None:
        """After a fault: drop the connection without a goodbye (may do nothing)."""

    def close(self) -> None:
        """Close the sending direction (the peer's ``recv`` raises :class:`PeerGone`)."""

    @property
    def last_wire_s(self) -> float:
        """The wire time of the last message received (first to last byte), 0 if unknown."""

    @property
    def last_arrival_s(self) -> float:
        """When the last message's last byte arrived, on this side's ``time.monotonic`` (0 if
        unknown): from two arrivals and their sends the end tells whether the link was busy
        between them, and then the gap is the second's time on the wire, whatever its size
        (``StreamSession.wire_sample``)."""


class Clock(Protocol):
    """Where links and device emulation read and spend time: :class:`RealClock` or
    :class:`VirtualClock` (tests: nothing sleeps, outcomes are exact)."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class RealClock:
    """This host's time: ``time.perf_counter``, the clock the workers stamp their work with
    (``emulate(start=...)`` takes such a stamp), so the two never mix clocks."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        while (dt := t - time.perf_counter()) > 0:   # a sleep may end early on some systems
            time.sleep(dt)


class VirtualClock:
    """Time that only moves when someone waits: instant, and exact for what one thread does
    (a link's wire times follow its trace to the byte). Several threads may share it (the
    two directions of a link, the workers of a stream): it never runs backwards, and what
    they do in parallel is ordered by their turns, not by the time they would take."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        with self._lock:
            self.t = max(self.t, t)


def as_trace(rate: Trace | float | None) -> Trace | None:
    if rate is None or isinstance(rate, Trace):
        return rate
    return Trace.constant(float(rate))


class TokenBucket:
    """Paces a sender to a trace: a message may leave once the trace has carried its bytes."""

    def __init__(self, trace: Trace, clock: Clock | None = None) -> None:
        self.trace = trace
        self.clock = clock or RealClock()
        self.free_at = 0.0
        self.t0 = self.clock.now()   # the trace starts with the bucket

    def wait(self, nbytes: int) -> float:
        start = max(self.clock.now(), self.free_at)
        self.free_at = self.t0 + self.trace.finish_time(start - self.t0, nbytes)
        return start

    def finish(self) -> float:
        self.clock.sleep_until(self.free_at)
        return self.free_at


class ThrottledLog:
    """Warnings at most ``burst`` per ``window_s``; the rest are counted and summed up in the
    next line let through (a storm of refused connections must not flood the log)."""

    def __init__(self, logger: logging.Logger, prefix: str, burst: int = 5, window_s: float = 10.0) -> None:
        self.logger, self.prefix, self.burst, self.window_s = logger, prefix, burst, window_s
        self._start, self._count, self.suppressed = -math.inf, 0, 0

    def warning(self, text: str) -> None:
        now = time.monotonic()
        if now - self._start >= self.window_s:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more not logged)" if self.suppressed else ""
        self.suppressed = 0
        self.logger.warning("%s %s%s", self.prefix, text, more)
