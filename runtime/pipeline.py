"""The three-stage pipeline: end compute -> uplink -> cloud compute (+ result back).

The end worker computes frame k+1 while frame k is on the wire and frame k-1 is in the cloud:
a compute thread, a sender thread and a receiver thread joined by bounded queues (a full queue
stops the stage before it: backpressure, bounded memory). Results are matched to requests by
id and returned in order. Each stage's busy time is recorded, so latency, throughput and the
bubble ratio are measured, not just predicted.

A slow end device is emulated on this host: the end worker runs the real computation, then
waits until ``slowdown ×`` the time it took has passed (the cloud likewise, with its own
slowdown).

Example::

    >>> link = InProcessLink.for_network(Network(20))
    >>> cloud = CloudWorker(cm.cloud_module, cm.boundary, link.cloud); cloud.start()   # doctest: +SKIP
    >>> outs, stats = EndWorker(cm.end_module, cm.boundary, link.end, out_spec).run(frames)  # doctest: +SKIP
    >>> print(stats.table())                                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tabulate import tabulate

from coach_fx._compat import tree_flatten, tree_unflatten
from coach_fx.passes.partition import Boundary
from coach_fx.runtime.codec import (entries_to_output, entries_to_payload, output_to_entries,
                                    payload_to_entries, stats_of)
from coach_fx.runtime.link import Endpoint, LinkError, LinkTimeout
from coach_fx.runtime.wire import (FLAG_CONTROL, FLAG_ERROR, FLAG_RESULT, Entry, WireError, decode,
                                   encode)

CLOSE_ID = (1 << 64) - 1
log = logging.getLogger("coach_fx.runtime")


class RemoteError(RuntimeError):
    """The cloud failed to compute a request; the message says why."""


@dataclass
class Prepared:
    """What the end side does with one frame: the message to send (None: nothing is sent) and,
    for a frame answered on the end device (a semantic-cache hit), the answer; a message sent
    with an answer is an audit copy whose reply only checks the answer."""

    msg: bytes | bytearray | None
    answer: Any = None
    answered: bool = False
    #: this work's time on this host measured alone (the emulated device takes slowdown x it)
    reference_s: float | None = None


class StaticPolicy:
    """One plan, its bits fixed at compile time: run the end half, encode what it returns."""

    def __init__(self, end_module: Callable[..., Any], boundary: Boundary, plan_id: int = 0) -> None:
        self.end_module, self.boundary, self.plan_id = end_module, boundary, plan_id

    def prepare(self, i: int, x: tuple) -> Prepared:
        return Prepared(encode(i, payload_to_entries(self.boundary, self.end_module(*x)), 0,
                               self.plan_id))

    def on_result(self, i: int, out: Any, stats: Sequence[float], audit: bool) -> None:
        """A result came back (``audit``: for a frame already answered on the end)."""


@dataclass
class Stats:
    """Measured figures of one stream."""

    n: int
    latencies: list[float]
    wall_s: float
    throughput: float
    end_busy_s: float
    link_busy_s: float
    cloud_busy_s: float
    bytes_sent: int
    predicted: dict = field(default_factory=dict)
    local: int = 0        # requests run on the end device after a fault (fallback="local")
    failed: int = 0       # requests given a RequestFailed result (fallback="error")
    dropped: int = 0      # late or repeated replies dropped (already settled)
    reconnects: int = 0
    answered_on_end: int = 0   # answered by the end device's policy (semantic-cache hits)
    #: requests the policy finished on the end device because the link was backlogged or
    #: stalled (``OnlinePolicy(local=True)``)
    finished_on_end: int = 0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    @property
    def stage_means(self) -> tuple[float, float, float]:
        n = max(self.n, 1)
        return self.end_busy_s / n, self.link_busy_s / n, self.cloud_busy_s / n

    @property
    def utilization(self) -> tuple[float, float, float]:
        w = max(self.wall_s, 1e-12)
        return self.end_busy_s / w, self.link_busy_s / w, self.cloud_busy_s / w

    @property
    def period(self) -> float:
        return 1.0 / self.throughput if self.throughput > 0 else float("inf")

    @property
    def bubble_ratio(self) -> float:
        """1 - (mean stage times) / (3 × measured period): the idle share of the pipeline."""
        e, l_, c = self.stage_means
        return max(0.0, 1.0 - (e + l_ + c) / (3 * self.period)) if self.throughput > 0 else 0.0

    def table(self) -> str:
        e, l_, c = self.stage_means
        ue, ul, uc = self.utilization
        p = self.predicted
        def pr(key: str, scale: float = 1e3) -> Any:
            return p[key] * scale if key in p else "-"
        rows = [["requests", self.n, "-"],
                ["latency p50 ms", self.pct(0.5) * 1e3, pr("latency")],
                ["latency p95 ms", self.pct(0.95) * 1e3, "-"],
                ["throughput /s", self.throughput, pr("throughput", 1)],
                ["period ms", self.period * 1e3, pr("period")],
                ["end stage ms (util)", f"{e*1e3:.2f} ({ue:.0%})", pr("t_end")],
                ["uplink ms (util)", f"{l_*1e3:.2f} ({ul:.0%})", pr("t_link")],
                ["cloud stage ms (util)", f"{c*1e3:.2f} ({uc:.0%})", pr("t_cloud")],
                ["bubble ratio", self.bubble_ratio, pr("bubble_ratio", 1)],
                ["KB sent / request", self.bytes_sent / max(self.n, 1) / 1e3, pr("bytes_sent", 1e-3)]]
        def fmt(v: Any) -> Any:
            return f"{v:.3f}" if isinstance(v, float) else v
        rows = [[name, fmt(v), fmt(p_)] for name, v, p_ in rows]
        return tabulate(rows, headers=["measured", "value", "predicted"], disable_numparse=True)


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


def _emulate(start: float, slowdown: float, reference_s: float | None = None) -> float:
    """Wait so that the work begun at ``start`` seems to run ``slowdown`` times slower.

    With ``reference_s`` (the work's time measured alone, before the stream) the target is
    ``slowdown × reference_s``: then a stage that shares this host's cores with the other
    stage is not charged that interference ``slowdown`` times over; work that still takes
    longer than the target is not cut short.
    """
    took = time.perf_counter() - start
    if slowdown > 1.0:
        target = start + max(took, (reference_s if reference_s is not None else took) * slowdown)
        while (left := target - time.perf_counter()) > 0:
            time.sleep(left)
    return time.perf_counter() - start


class CloudWorker:
    """Receives payloads, runs the cloud half, sends results back (a thread or a process)."""

    def __init__(self, cloud_module: Callable[..., Any], boundary: Boundary, endpoint: Endpoint,
                 slowdown: float = 1.0, plans: dict[int, tuple[Callable[..., Any], Boundary]] | None = None,
                 idle_timeout: float | None = None, adaptive: bool = False,
                 max_batch: int = 1) -> None:
        self.plans = plans or {0: (cloud_module, boundary)}
        #: requests that have arrived together run as one batch, up to this many (1: never);
        #: only on an endpoint that tells what has arrived (``ready()``, the in-process link)
        self.max_batch = max(1, max_batch)
        #: accept float crossings quantized with bits chosen per request (online control)
        self.adaptive = adaptive
        self.endpoint = endpoint
        self.slowdown = slowdown
        self.idle_timeout = idle_timeout
        self.busy_s = 0.0
        self.served = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def handle(self, msg: bytes, t_recv: float | None = None) -> bytes | None:
        """One request message -> its result message (None for a close request); ``t_recv``:
        its time on the wire (default: the endpoint's last)."""
        if t_recv is None:
            t_recv = getattr(self.endpoint, "last_wire_s", 0.0)
        req, plan_id, flags, entries = decode(msg)
        if flags & FLAG_CONTROL and req == CLOSE_ID:
            return None
        t0 = time.perf_counter()
        try:
            if plan_id not in self.plans:
                raise WireError(f"unknown plan id {plan_id}")
            module, boundary = self.plans[plan_id]
            payload = entries_to_payload(boundary, entries, self.adaptive)
            with torch.no_grad():
                out = module(*payload)
            out_entries, _ = output_to_entries(out)
        except Exception as e:  # noqa: BLE001 - reported to the end side, the worker goes on
            text = f"{type(e).__name__}: {e}".encode()[:4096]
            return encode(req, [Entry.raw(torch.frombuffer(bytearray(text), dtype=torch.uint8))],
                          FLAG_RESULT | FLAG_ERROR, plan_id)
        took = _emulate(t0, self.slowdown)
        self.busy_s += took
        self.served += 1
        stats = Entry.stats([took, float(len(msg)), float(t_recv)])
        return encode(req, [*out_entries, stats], FLAG_RESULT, plan_id)

    def serve(self) -> None:
        """Serve until the end side sends close (or the link goes away)."""
        with fast_handoff():
            self._serve()

    def handle_batch(self, msgs: Sequence[tuple[bytes, float]]) -> list[bytes | None]:
        """Several request messages (each with its time on the wire) -> their replies, in
        order. Requests for one plan run through its cloud half as one batch (one call's
        overhead for all: a server that falls behind catches up); anything else (a close, mixed
        plans, a value that does not batch, an output without the batch dimension, an error)
        is handled message by message, with the same replies as ``handle``."""
        if len(msgs) == 1:
            return [self.handle(*msgs[0])]

        def one_by_one() -> list[bytes | None]:
            return [self.handle(m, t) for m, t in msgs]

        decoded = [decode(m) for m, _ in msgs]
        plan_ids = {d[1] for d in decoded}
        if len(plan_ids) != 1 or any(d[2] & FLAG_CONTROL for d in decoded) or \
                next(iter(plan_ids)) not in self.plans:
            return one_by_one()
        t0 = time.perf_counter()
        try:
            module, boundary = self.plans[decoded[0][1]]
            payloads = [entries_to_payload(boundary, d[3], self.adaptive) for d in decoded]
            if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1
                       for p in payloads for v in p):
                return one_by_one()
            with torch.no_grad():
                out = module(*(torch.cat(vs) for vs in zip(*payloads)))
            leaves, spec = tree_flatten(out)
            n = len(msgs)
            if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n for v in leaves):
                return one_by_one()
        except Exception:  # noqa: BLE001 - each request gets its own reply (or error) below
            return one_by_one()
        took = _emulate(t0, self.slowdown)
        self.busy_s += took
        self.served += n
        replies = []
        for k, ((msg, t_recv), d) in enumerate(zip(msgs, decoded)):
            out_entries, _ = output_to_entries(tree_unflatten([v[k:k + 1] for v in leaves], spec))
            stats = Entry.stats([took / n, float(len(msg)), float(t_recv)])
            replies.append(encode(d[0], [*out_entries, stats], FLAG_RESULT, d[1]))
        return replies

    def _serve(self) -> None:
        ready = getattr(self.endpoint, "ready", None) if self.max_batch > 1 else None
        while True:
            msgs = [(self.endpoint.recv(self.idle_timeout), getattr(self.endpoint, "last_wire_s", 0.0))]
            # what has arrived meanwhile goes in one batch (only what is already there: no
            # request waits for another)
            while ready is not None and len(msgs) < self.max_batch and ready():
                msgs.append((self.endpoint.recv(self.idle_timeout),
                             getattr(self.endpoint, "last_wire_s", 0.0)))
            for reply in self.handle_batch(msgs):
                if reply is None:   # close: acknowledge, so the end's receiver stops cleanly
                    self.endpoint.send(encode(CLOSE_ID, [], FLAG_CONTROL))
                    return
                t0 = time.perf_counter()
                self.endpoint.send(reply)
                self.busy_s += time.perf_counter() - t0

    def serve_forever(self, server: Any, max_sessions: int | None = None) -> None:
        """Serve end after end on an authenticated server (``runtime.tcp.TcpServer``): when an
        end goes away the next one is accepted; an end's close request stops the worker."""
        sessions = 0
        while max_sessions is None or sessions < max_sessions:
            self.endpoint = server.accept()
            sessions += 1
            try:
                self.serve()
                return
            except LinkError as e:   # that end went away: wait for the next
                log.warning("coach cloud: the end at %s went away (%s); waiting for the next",
                            getattr(self.endpoint, "addr", "?"), e)
            finally:
                self.endpoint.close()

    def start(self) -> "CloudWorker":
        def run() -> None:
            try:
                self.serve()
            except BaseException as e:  # noqa: BLE001
                self.error = e
        self._thread = threading.Thread(target=run, name="coach-cloud", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)


class RequestFailed(RuntimeError):
    """Stands in a stream's results for a request that could not be served (fallback="error")."""

    def __init__(self, request_id: int, reason: str) -> None:
        super().__init__(f"request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason


class EndWorker:
    """Runs the end half over a stream and collects the results in order.

    Faults: when the link or the cloud fails (an error, or no result for ``timeout_s`` while
    requests are in flight), ``fallback=None`` raises; ``"local"`` runs the affected and the
    following requests on the end device with ``local_module`` (the whole model);
    ``"error"`` gives them a :class:`RequestFailed` result. Meanwhile ``reconnect`` (a callable
    returning a fresh endpoint) is retried every ``retry_s`` and the stream goes back to the
    cloud once it succeeds. Every request gets exactly one result, in order: a late reply for
    a request already settled is dropped, not delivered twice. At most ``max_inflight``
    requests wait for the cloud at once, so memory stays bounded however long the stream.
    """

    def __init__(self, end_module: Callable[..., Any], boundary: Boundary, endpoint: Endpoint | None,
                 out_spec: Any, slowdown: float = 1.0, queue_size: int = 2,
                 timeout_s: float = 30.0, plan_id: int = 0, calibrate: bool = True,
                 reference_s: float | None = None, fallback: str | None = None,
                 local_module: Callable[..., Any] | None = None,
                 reconnect: Callable[[], Endpoint] | None = None, retry_s: float = 0.5,
                 max_inflight: int = 8, policy: Any = None) -> None:
        if fallback not in (None, "local", "error"):
            raise ValueError(f"fallback must be None, 'local' or 'error', got {fallback!r}")
        if fallback == "local" and local_module is None:
            raise ValueError("fallback='local' needs local_module (the whole model on the end device)")
        self.end_module, self.boundary, self.endpoint = end_module, boundary, endpoint
        self.out_spec = out_spec
        self.slowdown = slowdown
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.plan_id = plan_id
        self.calibrate = calibrate
        #: the end half's time on this host; the emulated device takes ``slowdown ×`` this
        #: (measured before the stream when not given)
        self.reference_s = reference_s
        self.fallback, self.local_module = fallback, local_module
        self.reconnect, self.retry_s = reconnect, retry_s
        self.max_inflight = max(1, max_inflight)
        self.events: list[str] = []
        #: per frame, what to send (``prepare``) and what to learn from results (``on_result``):
        #: :class:`StaticPolicy` for one compiled plan, ``runtime.online.OnlinePolicy`` for the
        #: bandwidth controller, plan switching and the semantic cache
        self.policy = policy if policy is not None else StaticPolicy(end_module, boundary, plan_id)

    # ------------------------------------------------------------------ the stream
    def run(self, inputs: Iterable[Sequence[Any]], pipelined: bool = True,
            predicted: dict | None = None) -> tuple[list[Any], Stats]:
        st = _StreamState(self)
        it = iter(inputs)
        first = next(it, None)
        if first is None:
            return [], Stats(0, [], 0.0, 0.0, 0.0, 0.0, 0.0, 0, predicted or {})
        first = tuple(first) if isinstance(first, (tuple, list)) else (first,)
        if self.calibrate and self.reference_s is None and self.slowdown > 1.0 and \
                isinstance(self.policy, StaticPolicy):
            self.reference_s = self._reference(first)
        if self.endpoint is not None:
            st.start_link(self.endpoint)
        t_begin = time.perf_counter()

        def frames() -> Iterable[tuple]:
            yield first
            for x in it:
                yield tuple(x) if isinstance(x, (tuple, list)) else (x,)

        try:
            with torch.no_grad(), fast_handoff():
                for i, x in enumerate(frames()):
                    st.settle_failed()
                    st.started.append(time.perf_counter())
                    st.done.append(0.0)
                    st.results.append(_PENDING)
                    if not st.up:
                        st.try_reconnect()
                    if st.up and st.send(i, x):
                        if not pipelined:
                            st.wait_until(lambda: st.results[i] is not _PENDING or not st.up)
                    else:
                        st.settle(i, x, "the cloud is unavailable")
                st.finish()
        finally:
            st.stop_link()
        wall = (max(st.done) - t_begin) if st.done else 0.0
        lat = [d - s for d, s in zip(st.done, st.started)]
        # a socket's send returns once the kernel has the bytes: the uplink's busy time is the
        # wire time the cloud saw, when that is longer (in-process both are the emulated time)
        link_busy = max(st.busy["link"], st.busy["wire"])
        stats = Stats(len(st.results), lat, wall, steady_throughput(st.done, wall), st.busy["end"],
                      link_busy, st.busy["cloud"], st.busy["bytes"], predicted or {},
                      st.local, st.failed, st.dropped, st.reconnects, st.answered, st.finished_on_end)
        return st.results, stats

    def _reference(self, x: tuple) -> float:
        """The end half's own time on this host (median of 9 runs after 10 warm-up runs: in a
        fresh process the first runs of an exported module are several times slower)."""
        ts = []
        with torch.no_grad():
            for k in range(19):
                t0 = time.perf_counter()
                encode(0, payload_to_entries(self.boundary, self.end_module(*x)), 0, self.plan_id)
                if k >= 10:
                    ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def close(self, timeout: float = 5.0) -> None:
        """Tell the cloud worker to stop serving and wait for its acknowledgement."""
        if self.endpoint is None:
            return
        try:
            self.endpoint.send(encode(CLOSE_ID, [], FLAG_CONTROL, self.plan_id))
        except LinkError as e:   # the link is down already: nothing to close
            self.events.append(f"close: {e}")
            return
        receiver = getattr(self, "_receiver_thread", None)
        if receiver is not None:
            receiver.join(timeout)


class _Pending:
    def __repr__(self) -> str:
        return "<pending>"


_PENDING = _Pending()


class _StreamState:
    """The shared state of one stream: what is in flight, what is settled, the link's epoch."""

    def __init__(self, w: EndWorker) -> None:
        self.w = w
        self.results: list[Any] = []
        self.started: list[float] = []
        self.done: list[float] = []
        self.inflight: dict[int, tuple] = {}
        self.to_settle: list[tuple[int, str]] = []
        self.cv = threading.Condition()
        self.up = False
        self.epoch = 0
        self.error: BaseException | None = None
        #: "link": time the sender spent handing messages to the endpoint (the emulated wire
        #: time in-process; over TCP only until the kernel has the bytes); "wire": the wire time
        #: the cloud reported per request (first to last byte as it received them)
        self.busy = {"end": 0.0, "link": 0.0, "wire": 0.0, "cloud": 0.0, "bytes": 0}
        self.local = self.failed = self.dropped = self.reconnects = self.answered = 0
        self.finished_on_end = 0
        #: when the link last showed progress: a result came back, or the first request went
        #: in flight after none was
        self.last_progress = time.perf_counter()
        self.audits: set[int] = set()   # answered on the end, a copy sent to check the answer
        self.last_try = 0.0
        self.stopped_epoch = -1
        self.threads: list[threading.Thread] = []
        self.send_q: queue.Queue = queue.Queue(w.queue_size)

    # -------------------------------------------------------------- link lifecycle
    def start_link(self, endpoint: Endpoint) -> None:
        self.w.endpoint = endpoint
        with self.cv:
            self.epoch += 1
            self.up = True
            epoch = self.epoch
        self.send_q = queue.Queue(self.w.queue_size)
        self.threads = [threading.Thread(target=self._sender, args=(epoch, endpoint, self.send_q),
                                         daemon=True, name="coach-send"),
                        threading.Thread(target=self._receiver, args=(epoch, endpoint),
                                         daemon=True, name="coach-recv")]
        for t in self.threads:
            t.start()
        self.w._receiver_thread = self.threads[1]

    def stop_link(self) -> None:
        with self.cv:
            self.stopped_epoch = self.epoch if self.up else -1
            self.up = False
            self.epoch += 1
            self.cv.notify_all()
        try:
            self.send_q.put_nowait(None)
        except queue.Full:
            pass

    def link_failed(self, epoch: int, e: BaseException) -> None:
        with self.cv:
            if epoch != self.epoch or not self.up:
                return
            if self.w.fallback is None:
                self.error = e
            self.up = False
            self.w.events.append(f"link down: {e}")
            for i in sorted(self.inflight):
                self.to_settle.append((i, str(e)))
            self.cv.notify_all()
        ep = self.w.endpoint
        if ep is not None:
            try:
                getattr(ep, "abort", ep.close)()
            except Exception:  # noqa: BLE001
                pass

    def try_reconnect(self) -> None:
        if self.error is not None:
            raise self.error
        if self.w.reconnect is None or time.perf_counter() - self.last_try < self.w.retry_s:
            return
        self.last_try = time.perf_counter()
        try:
            endpoint = self.w.reconnect()
        except Exception as e:  # noqa: BLE001 - still down; try again later
            self.w.events.append(f"reconnect failed: {e}")
            return
        if self.epoch > 0:   # not the first connection of a stream that began without one
            self.reconnects += 1
        self.w.events.append("reconnected" if self.epoch > 0 else "connected")
        self.start_link(endpoint)

    # -------------------------------------------------------------- per request
    def send(self, i: int, x: tuple) -> bool:
        """Compute the end half and queue the message; False if the link is down."""
        w = self.w
        # a policy that may answer on the end prepares first, so that its answers go on while
        # the link is stalled; what it sends then waits for room in flight
        wait_first = isinstance(w.policy, StaticPolicy)
        if wait_first:
            self.wait_until(lambda: len(self.inflight) < w.max_inflight or not self.up)
        if not self.up:
            return False
        t0 = time.perf_counter()
        prep = w.policy.prepare(i, x)
        ref = prep.reference_s if prep.reference_s is not None else w.reference_s
        self.busy["end"] += _emulate(t0, w.slowdown, ref)
        if prep.answered:
            with self.cv:
                self.results[i] = prep.answer
                self.done[i] = time.perf_counter()
                self.answered += 1
                if prep.msg is not None:
                    self.audits.add(i)
                self.cv.notify_all()
            if prep.msg is None:
                return True
        msg = prep.msg
        if not wait_first and self._room_or_finished(i, prep.answered):
            return True
        with self.cv:
            if not self.up:
                self.audits.discard(i)
                return prep.answered
            if not prep.answered:
                if not self.inflight:
                    self.last_progress = time.perf_counter()
                self.inflight[i] = x
            epoch, q = self.epoch, self.send_q
        while True:
            try:
                q.put((epoch, msg), timeout=0.05)
                return True
            except queue.Full:
                if epoch != self.epoch or not self.up:
                    return True   # the failure handler has taken the request over

    def _room_or_finished(self, i: int, audit: bool) -> bool:
        """Wait for room in flight for request ``i``, or let the policy finish it on the end
        device meanwhile (``policy.local_wait_s`` says when that pays: the link backlogged or
        stalled). True: it was finished there (an audit copy: checked there), nothing to send."""
        w = self.w
        local_wait = getattr(w.policy, "local_wait_s", None)
        finish = False
        with self.cv:
            # the send queue counts as the link's backlog too: with it full, ``send`` would
            # block on it below however few requests the in-flight limit sees
            while (len(self.inflight) >= w.max_inflight or
                   (local_wait is not None and self.send_q.full())) and self.up:
                if self.error is not None:
                    raise self.error
                if self.to_settle:
                    break
                left = math.inf if local_wait is None else \
                    local_wait(i, len(self.inflight), time.perf_counter() - self.last_progress)
                if left <= 0:
                    finish = True
                    break
                self.cv.wait(min(0.05, left))
        self.settle_failed()
        if not finish:
            return False
        t0 = time.perf_counter()
        prep = w.policy.finish_locally(i)
        self.busy["end"] += _emulate(t0, w.slowdown, prep.reference_s)
        with self.cv:
            if audit:
                self.audits.discard(i)
            else:
                self.results[i] = prep.answer
                self.done[i] = time.perf_counter()
                self.finished_on_end += 1
            self.cv.notify_all()
        return True

    def settle(self, i: int, x: tuple | None, reason: str) -> None:
        """Give request ``i`` its result without the cloud (or fail the stream)."""
        w = self.w
        if self.error is not None:
            raise self.error
        if w.fallback is None:
            raise LinkError(f"request {i}: {reason}")
        if w.fallback == "local":
            t0 = time.perf_counter()
            out = w.local_module(*x)
            self.busy["end"] += _emulate(t0, w.slowdown)
            self.local += 1
        else:
            out = RequestFailed(i, reason)
            self.failed += 1
        with self.cv:
            if self.results[i] is _PENDING:
                self.results[i] = out
                self.done[i] = time.perf_counter()
            self.cv.notify_all()

    def settle_failed(self) -> None:
        with self.cv:
            todo, self.to_settle = self.to_settle, []
            frames = {i: self.inflight.pop(i, None) for i, _ in todo}
        if self.error is not None:
            raise self.error
        for i, reason in todo:
            if self.results[i] is _PENDING:
                self.settle(i, frames[i], reason)

    def wait_until(self, cond: Callable[[], bool]) -> None:
        with self.cv:
            while not cond():
                if self.error is not None:
                    raise self.error
                if self.to_settle:
                    break
                self.cv.wait(0.05)
        self.settle_failed()

    def finish(self) -> None:
        """Wait for every request to be settled, reconnecting or falling back as needed."""
        while True:
            self.settle_failed()
            with self.cv:
                pending = [i for i, r in enumerate(self.results) if r is _PENDING]
                if not pending:
                    return
                if self.up:
                    self.cv.wait(0.05)
                    continue
                queued = {i for i, _ in self.to_settle}
                self.to_settle += [(i, "the cloud is unavailable") for i in pending if i not in queued]

    # -------------------------------------------------------------- threads
    def _sender(self, epoch: int, endpoint: Endpoint, q: queue.Queue) -> None:
        try:
            while True:
                item = q.get()
                if item is None or item[0] != self.epoch:
                    return
                if q.maxsize and q.qsize() == q.maxsize - 1:
                    with self.cv:      # room in the queue: an end waiting for it may go on
                        self.cv.notify_all()
                self.busy["link"] += endpoint.send(item[1])
                self.busy["bytes"] += len(item[1])
        except BaseException as e:  # noqa: BLE001
            self.link_failed(epoch, e)

    def _receiver(self, epoch: int, endpoint: Endpoint) -> None:
        w = self.w
        last = time.perf_counter()
        try:
            # runs past the stream's end, until the cloud acknowledges close or the link fails
            while epoch == self.epoch or self.stopped_epoch == epoch:
                try:
                    msg = endpoint.recv(min(0.25, w.timeout_s))
                except LinkTimeout:
                    with self.cv:
                        busy = bool(self.inflight)
                    if busy and time.perf_counter() - last > w.timeout_s:
                        raise LinkError(f"no result from the cloud for {w.timeout_s} s with "
                                        f"{len(self.inflight)} request(s) in flight: it stalled") from None
                    if not busy:
                        last = time.perf_counter()
                    continue
                last = self.last_progress = time.perf_counter()
                req, _, flags, entries = decode(msg)
                if flags & FLAG_CONTROL:
                    return      # the cloud acknowledged close
                if flags & FLAG_ERROR:
                    text = bytes(entries[0].value().tolist()).decode(errors="replace")
                    raise RemoteError(f"the cloud failed on request {req}: {text}")
                out = entries_to_output(entries, w.out_spec)
                st = stats_of(entries)
                with self.cv:
                    audit = req in self.audits
                    if audit:
                        self.audits.discard(req)
                        self.busy["cloud"] += st[0] if st else 0.0
                    elif req not in self.inflight or self.results[req] is not _PENDING:
                        self.dropped += 1     # late or repeated: already settled
                        continue
                    else:
                        del self.inflight[req]
                        self.busy["cloud"] += st[0] if st else 0.0
                        self.busy["wire"] += st[2] if len(st) > 2 else 0.0
                        self.results[req] = out
                        self.done[req] = time.perf_counter()
                        self.cv.notify_all()
                w.policy.on_result(req, out, st, audit)
        except RemoteError as e:
            with self.cv:
                self.error = e
                self.cv.notify_all()
        except BaseException as e:  # noqa: BLE001
            self.link_failed(epoch, e)


def run_session(end: EndWorker, cloud: CloudWorker, frames: Iterable[Sequence[Any]],
                **run: Any) -> tuple[list[Any], Stats]:
    """Run ``frames`` through ``end`` against a started in-process ``cloud``, then close the
    session (the cloud worker stops), whatever happened."""
    try:
        return end.run(frames, **run)
    finally:
        try:
            end.close()
        except Exception:  # noqa: BLE001 - the link may already be down
            pass
        cloud.join(1.0)


def steady_throughput(done: Sequence[float], wall: float) -> float:
    """Requests per second once the pipeline is full: the first few completions (warm-up and
    pipeline fill) are left out."""
    ts = sorted(done)
    skip = min(5, len(ts) // 5)
    ts = ts[skip:]
    if len(ts) > 1 and ts[-1] > ts[0]:
        return (len(ts) - 1) / (ts[-1] - ts[0])
    return len(done) / wall if wall > 0 else 0.0


def run_local(end_module: Callable[..., Any], inputs: Iterable[Sequence[Any]],
              slowdown: float = 1.0, reference_s: float | None = None) -> tuple[list[Any], Stats]:
    """An end-only plan: every frame computed on the end device, nothing sent
    (``reference_s``: the model's time on this host measured alone, see ``_emulate``)."""
    outs, lat = [], []
    t_begin = time.perf_counter()
    busy = 0.0
    done = []
    with torch.no_grad():
        for x in inputs:
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            t0 = time.perf_counter()
            outs.append(end_module(*x))
            took = _emulate(t0, slowdown, reference_s)
            busy += took
            lat.append(took)
            done.append(time.perf_counter())
    n = len(outs)
    wall = (done[-1] - t_begin) if n else 0.0
    thr = steady_throughput(done, wall)
    return outs, Stats(n, lat, wall, thr, busy, 0.0, 0.0, 0)

