"""Links between the end and the cloud: one interface, two implementations.

Each side holds an :class:`Endpoint` with ``send(bytes) -> seconds`` and
``recv(timeout) -> bytes``.

* :class:`InProcessLink`: two FIFO channels (uplink, downlink) inside one process. A message
  occupies its channel for ``bytes / rate`` integrated over a bandwidth trace (or a constant
  rate), then arrives ``latency_s`` later. Real time by default; with a :class:`VirtualClock`
  nothing sleeps and a test replays minutes of trace in milliseconds (single-threaded use).
* :class:`GlooEndpoint`: torch.distributed **gloo** point-to-point between an end process and
  a cloud process over TCP; a message is a fixed header (its length) then a payload buffer
  sized from it, each direction in its own process group. Optional shaping: a token bucket in
  the sender that follows a trace (it paces each message to the trace's rate).

Errors: :class:`LinkTimeout` (nothing arrived in time) and :class:`PeerGone` (the other side
closed or died), both :class:`LinkError`.

Example::

    >>> link = InProcessLink(uplink=Trace.constant(10), latency_s=0.01, clock=VirtualClock())
    >>> link.end.send(b"x" * 125_000); link.cloud.recv()      # 0.1 s on the wire + 10 ms
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Protocol

from coach_fx.traces import Trace


class LinkError(RuntimeError):
    """The link failed."""


class LinkTimeout(LinkError):
    """Nothing arrived within the timeout."""


class PeerGone(LinkError):
    """The other side closed the link or died."""


class Endpoint(Protocol):
    def send(self, msg: bytes) -> float: ...
    def recv(self, timeout: float | None = None) -> bytes: ...
    def close(self) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        dt = t - time.monotonic()
        if dt > 0:
            time.sleep(dt)


class VirtualClock:
    """Time that only moves when someone waits: deterministic, instant (one thread)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


def _trace(rate: Trace | float | None) -> Trace | None:
    if rate is None or isinstance(rate, Trace):
        return rate
    return Trace.constant(float(rate))


class Channel:
    """One direction: a FIFO wire of a given rate, then a fixed latency."""

    def __init__(self, rate: Trace | float | None, latency_s: float = 0.0, clock=None,  # noqa: ANN001
                 maxsize: int = 64) -> None:
        self.trace = _trace(rate)
        self.latency_s = latency_s
        self.clock = clock or RealClock()
        self.q: queue.Queue = queue.Queue(maxsize)
        self.free_at = 0.0
        self.busy_s = 0.0
        self.bytes = 0
        self.messages = 0
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
            self.messages += 1
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
        return getattr(self.inp, "last_wire_s", 0.0)


class InProcessLink:
    """Uplink and downlink channels between two threads; ``.end`` and ``.cloud`` endpoints."""

    def __init__(self, uplink: Trace | float | None = None, downlink: Trace | float | None = None,
                 latency_s: float = 0.0, clock=None, maxsize: int = 64) -> None:  # noqa: ANN001
        self.clock = clock or RealClock()
        self.up = Channel(uplink, latency_s, self.clock, maxsize)
        self.down = Channel(downlink if downlink is not None else None, latency_s, self.clock, maxsize)
        self.end = _InProcessEnd(self.up, self.down)
        self.cloud = _InProcessEnd(self.down, self.up)

    @classmethod
    def for_network(cls, network, clock=None) -> "InProcessLink":  # noqa: ANN001
        """A link with a ``coach_fx.Network``'s rates (its trace for the uplink, if any)."""
        up = network.trace if network.trace is not None else network.uplink_mbps
        return cls(up, network.down_mbps, network.rtt_ms / 2e3, clock)


class TokenBucket:
    """Paces a sender to a trace: a message may leave once the trace has carried its bytes."""

    def __init__(self, trace: Trace, clock=None) -> None:  # noqa: ANN001
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class GlooEndpoint:
    """One side of a gloo link: rank 0 is the cloud (it hosts the TCP store), rank 1 the end."""

    MAX_MESSAGE = 1 << 30

    def __init__(self, role: str, host: str, port: int, timeout_s: float = 30.0,
                 shape: Trace | None = None) -> None:
        import torch
        import torch.distributed as dist

        if role not in ("end", "cloud"):
            raise ValueError(f"role must be 'end' or 'cloud', got {role!r}")
        self.torch, self.dist = torch, dist
        self.role = role
        self.peer_name = "cloud" if role == "end" else "end"
        self.addr = f"{host}:{port}"
        self.rank = 0 if role == "cloud" else 1
        self.peer = 1 - self.rank
        self.timeout_s = timeout_s
        self.bucket = TokenBucket(shape) if shape is not None else None
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=2, timeout=timedelta(seconds=timeout_s))
            # one group per direction, so a sender and a receiver thread never share one
            self._up = dist.new_group([0, 1], backend="gloo")
            self._down = dist.new_group([0, 1], backend="gloo")
        except Exception as e:  # noqa: BLE001
            raise PeerGone(f"could not connect the {role} side to {host}:{port} within "
                           f"{timeout_s} s: {e}") from None
        self.out_group = self._up if role == "end" else self._down
        self.in_group = self._down if role == "end" else self._up
        self.busy_s = 0.0
        self.bytes = 0
        self._pending = None

    def send(self, msg: bytes) -> float:
        torch, dist = self.torch, self.dist
        t0 = time.monotonic()
        start = self.bucket.wait(len(msg)) if self.bucket else t0
        head = torch.tensor([len(msg)], dtype=torch.int64)
        body = torch.frombuffer(bytearray(msg), dtype=torch.uint8) if msg else torch.empty(0, dtype=torch.uint8)
        if self.bucket:
            RealClock().sleep_until(start)
        try:
            dist.send(head, dst=self.peer, group=self.out_group)
            if len(msg):
                dist.send(body, dst=self.peer, group=self.out_group)
        except Exception as e:  # noqa: BLE001
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone (while sending): "
                           f"{_first_line(e)}") from None
        end = self.bucket.finish() if self.bucket else time.monotonic()
        self.busy_s += end - start
        self.bytes += len(msg)
        return end - start

    def _wait(self, work, timeout: float | None, what: str) -> None:  # noqa: ANN001
        try:
            work.wait(timedelta(seconds=timeout if timeout is not None else self.timeout_s))
        except Exception as e:  # noqa: BLE001
            text = str(e).lower()
            if "timed out" in text or "timeout" in text:
                raise LinkTimeout(f"no {what} from the {self.peer_name} side ({self.addr}) within "
                                  f"{timeout if timeout is not None else self.timeout_s} s") from None
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone (waiting for a {what}): "
                           f"{_first_line(e)}") from None

    def recv(self, timeout: float | None = None) -> bytes:
        torch, dist = self.torch, self.dist
        # a receive that timed out stays posted in gloo: wait on that same one next time, or the
        # next message would land in an abandoned buffer
        if self._pending is None:
            head = torch.empty(1, dtype=torch.int64)
            self._pending = (dist.irecv(head, src=self.peer, group=self.in_group), head)
        work, head = self._pending
        self._wait(work, timeout, "message header")
        self._pending = None
        n = int(head.item())
        if not 0 <= n <= self.MAX_MESSAGE:   # checked before allocating
            raise LinkError(f"peer announced a message of {n} bytes (limit {self.MAX_MESSAGE})")
        body = torch.empty(n, dtype=torch.uint8)
        if n:
            self._wait(dist.irecv(body, src=self.peer, group=self.in_group), timeout, "message body")
        return body.numpy().tobytes()

    def abort(self) -> None:
        """After a fault: leave the process group alone (tearing it down from a worker thread
        with a receive posted would abort the process)."""

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - closing twice or after a failure is fine
            pass
