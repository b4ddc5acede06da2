"""The in-process link: two FIFO channels (uplink, downlink) between threads of one process.

A message occupies its channel for ``bytes / rate`` integrated over a bandwidth trace (or a
constant rate), then arrives ``latency_s`` later. Real time by default; with a
:class:`~coach_fx.runtime.links.base.VirtualClock` nothing sleeps and a test replays minutes of
trace in milliseconds (single-threaded use).

Example::

    >>> from coach_fx.runtime.links.base import VirtualClock
    >>> link = InProcessLink(uplink=Trace.constant(10), latency_s=0.01, clock=VirtualClock())
    >>> link.end.send(b"x" * 125_000); link.cloud.recv()[:1]      # 0.1 s on the wire + 10 ms
    0.1
    b'x'
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from coach_fx.runtime.links.base import Clock, LinkTimeout, PeerGone, RealClock, as_trace
from coach_fx.runtime.traces import Trace


class Channel:
    """One direction: a FIFO wire of a given rate, then a fixed latency."""

    def __init__(self, rate: Trace | float | None, latency_s: float = 0.0, clock: Clock | None = None,
                 maxsize: int = 64) -> None:
        self.trace = as_trace(rate)
        self.latency_s = latency_s
        self.clock = clock or RealClock()
        self.q: queue.Queue = queue.Queue(maxsize)
        self.free_at = 0.0
        self.busy_s = 0.0
        self.bytes = 0
        self.last_wire_s = 0.0   # of the last message received
        self.closed = False
        self._lock = threading.Lock()
        self.t0 = self.clock.now()   # the trace starts when the link does

    def send(self, msg: bytes) -> float:
        if self.closed:
            raise PeerGone("link closed")
        with self._lock:  # one message on the wire at a time
            start = max(self.clock.now(), self.free_at)
            finish = (self.t0 + self.trace.finish_time(start - self.t0, len(msg))
                      if self.trace else start)
            self.free_at = finish
            self.clock.sleep_until(finish)   # the sender is busy while its bytes are on the wire
            self.busy_s += finish - start
            self.bytes += len(msg)
        self.q.put((finish + self.latency_s, finish - start, msg))
        return finish - start

    def recv(self, timeout: float | None = None) -> bytes:
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise LinkTimeout(f"nothing received within {timeout} s") from None
        if item is None:
            raise PeerGone("the other side closed the link")
        deliver_at, self.last_wire_s, msg = item
        self.clock.sleep_until(deliver_at)
        return msg

    def ready(self) -> bool:
        """Whether a message can be received now without waiting."""
        with self.q.mutex:
            head = self.q.queue[0] if self.q.queue else None
        return head is not None and head[0] <= self.clock.now()

    def close(self) -> None:
        self.closed = True
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass


class _InProcessEnd:
    addr = "in-process"

    def __init__(self, out: Channel, inp: Channel) -> None:
        self.out, self.inp = out, inp

    def send(self, msg: bytes) -> float:
        return self.out.send(msg)

    def recv(self, timeout: float | None = None) -> bytes:
        return self.inp.recv(timeout)

    def ready(self) -> bool:
        """Whether a message has arrived and waits to be received (the cloud batches those)."""
        return self.inp.ready()

    def close(self) -> None:
        self.out.close()

    def abort(self) -> None:
        """After a fault the in-process channels stay usable: what is stalled arrives later
        (and the end drops replies it has already settled)."""

    @property
    def last_wire_s(self) -> float:
        return self.inp.last_wire_s

    @property
    def last_arrival_s(self) -> float:
        """Not needed: the emulated wire time is exact, the sender waits it out itself."""
        return 0.0


class InProcessLink:
    """Uplink and downlink channels between two threads; ``.end`` and ``.cloud`` endpoints."""

    def __init__(self, uplink: Trace | float | None = None, downlink: Trace | float | None = None,
                 latency_s: float = 0.0, clock: Clock | None = None, maxsize: int = 64) -> None:
        self.clock = clock or RealClock()
        self.up = Channel(uplink, latency_s, self.clock, maxsize)
        self.down = Channel(downlink if downlink is not None else None, latency_s, self.clock, maxsize)
        self.end = _InProcessEnd(self.up, self.down)
        self.cloud = _InProcessEnd(self.down, self.up)

    @classmethod
    def for_network(cls, network: Any, clock: Clock | None = None) -> "InProcessLink":
        """A link with a ``coach_fx.Network``'s rates (its trace for the uplink, if any)."""
        up = network.trace if network.trace is not None else network.uplink_mbps
        return cls(up, network.down_mbps, network.rtt_ms / 2e3, clock)
