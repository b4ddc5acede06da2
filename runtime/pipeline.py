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

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from tabulate import tabulate

from coach_fx.passes.partition import Boundary
from coach_fx.runtime.codec import (entries_to_output, entries_to_payload, output_to_entries,
                                    payload_to_entries, stats_of)
from coach_fx.runtime.link import Endpoint, LinkError
from coach_fx.runtime.wire import (FLAG_CONTROL, FLAG_ERROR, FLAG_RESULT, Entry, WireError, decode,
                                   encode)

CLOSE_ID = (1 << 64) - 1


class RemoteError(RuntimeError):
    """The cloud failed to compute a request; the message says why."""


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
        return tabulate(rows, headers=["measured", "value", "predicted"], floatfmt=".3f")


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
                 idle_timeout: float | None = None) -> None:
        self.plans = plans or {0: (cloud_module, boundary)}
        self.endpoint = endpoint
        self.slowdown = slowdown
        self.idle_timeout = idle_timeout
        self.busy_s = 0.0
        self.served = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def handle(self, msg: bytes) -> bytes | None:
        """One request message -> its result message (None for a close request)."""
        t_recv = getattr(self.endpoint, "last_wire_s", 0.0)
        req, plan_id, flags, entries = decode(msg)
        if flags & FLAG_CONTROL and req == CLOSE_ID:
            return None
        t0 = time.perf_counter()
        try:
            if plan_id not in self.plans:
                raise WireError(f"unknown plan id {plan_id}")
            module, boundary = self.plans[plan_id]
            payload = entries_to_payload(boundary, entries)
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
        while True:
            msg = self.endpoint.recv(self.idle_timeout)
            reply = self.handle(msg)
            if reply is None:
                return
            t0 = time.perf_counter()
            self.endpoint.send(reply)
            self.busy_s += time.perf_counter() - t0

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


class EndWorker:
    """Runs the end half over a stream and collects the results in order."""

    def __init__(self, end_module: Callable[..., Any], boundary: Boundary, endpoint: Endpoint,
                 out_spec: Any, slowdown: float = 1.0, queue_size: int = 2,
                 timeout_s: float = 30.0, plan_id: int = 0, calibrate: bool = True) -> None:
        self.end_module, self.boundary, self.endpoint = end_module, boundary, endpoint
        self.calibrate = calibrate
        self.reference_s: float | None = None
        self.out_spec = out_spec
        self.slowdown = slowdown
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.plan_id = plan_id

    def run(self, inputs: Iterable[Sequence[Any]], pipelined: bool = True,
            predicted: dict | None = None) -> tuple[list[Any], Stats]:
        frames = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in inputs]
        n = len(frames)
        outputs: list[Any] = [None] * n
        started = [0.0] * n
        done = [0.0] * n
        send_q: queue.Queue = queue.Queue(self.queue_size)
        errors: list[BaseException] = []
        busy = {"end": 0.0, "link": 0.0, "cloud": 0.0, "bytes": 0}
        got_result = threading.Semaphore(0)
        stop = threading.Event()

        def fail(e: BaseException) -> None:
            errors.append(e)
            stop.set()

        def sender() -> None:
            try:
                while True:
                    item = send_q.get()
                    if item is None or stop.is_set():
                        return
                    busy["link"] += self.endpoint.send(item)
                    busy["bytes"] += len(item)
            except BaseException as e:  # noqa: BLE001
                fail(e)

        def receiver() -> None:
            try:
                for _ in range(n):
                    if stop.is_set():
                        return
                    msg = self.endpoint.recv(self.timeout_s)
                    req, _, flags, entries = decode(msg)
                    if not 0 <= req < n or done[req]:
                        raise WireError(f"result for unknown or repeated request {req}")
                    if flags & FLAG_ERROR:
                        text = bytes(entries[0].value().tolist()).decode(errors="replace")
                        raise RemoteError(f"the cloud failed on request {req}: {text}")
                    st = stats_of(entries)
                    busy["cloud"] += st[0] if st else 0.0
                    outputs[req] = entries_to_output(entries, self.out_spec)
                    done[req] = time.perf_counter()
                    got_result.release()
            except BaseException as e:  # noqa: BLE001
                fail(e)

        threads = [threading.Thread(target=sender, daemon=True, name="coach-send"),
                   threading.Thread(target=receiver, daemon=True, name="coach-recv")]
        for t in threads:
            t.start()
        if self.calibrate and frames and self.slowdown > 1.0:
            self.reference_s = self._reference(frames[0])
        t_begin = time.perf_counter()
        try:
            with torch.no_grad():
                for i, x in enumerate(frames):
                    if stop.is_set():
                        break
                    t0 = started[i] = time.perf_counter()
                    payload = self.end_module(*x)
                    msg = encode(i, payload_to_entries(self.boundary, payload), 0, self.plan_id)
                    busy["end"] += _emulate(t0, self.slowdown, self.reference_s)
                    while not stop.is_set():
                        try:
                            send_q.put(msg, timeout=0.1)   # blocks while the link is behind
                            break
                        except queue.Full:
                            continue
                    if not pipelined:
                        self._wait_one(got_result, stop)
            if not stop.is_set():
                send_q.put(None)
            deadline = time.perf_counter() + self.timeout_s
            threads[1].join(max(0.0, deadline - time.perf_counter()))
            if threads[1].is_alive() and not errors:
                errors.append(LinkError(f"results did not arrive within {self.timeout_s} s"))
        finally:
            stop.set()
            try:
                send_q.put_nowait(None)
            except queue.Full:
                pass
        if errors:
            raise errors[0]
        wall = max(done) - t_begin if n else 0.0
        thr = steady_throughput(done, wall)
        lat = [d - s for d, s in zip(done, started)]
        stats = Stats(n, lat, wall, thr, busy["end"], busy["link"], busy["cloud"], busy["bytes"],
                      predicted or {})
        return outputs, stats

    def _reference(self, x: tuple) -> float:
        """The end half's own time on this host (median of 9 runs after 3 warm-up runs)."""
        ts = []
        with torch.no_grad():
            for k in range(12):
                t0 = time.perf_counter()
                encode(0, payload_to_entries(self.boundary, self.end_module(*x)), 0, self.plan_id)
                if k >= 3:
                    ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def _wait_one(self, sem: threading.Semaphore, stop: threading.Event) -> None:
        deadline = time.perf_counter() + self.timeout_s
        while not sem.acquire(timeout=0.05):
            if stop.is_set():
                return
            if time.perf_counter() > deadline:
                raise LinkError(f"no result within {self.timeout_s} s")

    def close(self) -> None:
        """Tell the cloud worker to stop serving."""
        self.endpoint.send(encode(CLOSE_ID, [], FLAG_CONTROL, self.plan_id))


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
              slowdown: float = 1.0) -> tuple[list[Any], Stats]:
    """An end-only plan: every frame computed on the end device, nothing sent."""
    outs, lat = [], []
    t_begin = time.perf_counter()
    busy = 0.0
    done = []
    with torch.no_grad():
        for x in inputs:
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            t0 = time.perf_counter()
            outs.append(end_module(*x))
            took = _emulate(t0, slowdown)
            busy += took
            lat.append(took)
            done.append(time.perf_counter())
    n = len(outs)
    wall = (done[-1] - t_begin) if n else 0.0
    thr = steady_throughput(done, wall)
    return outs, Stats(n, lat, wall, thr, busy, 0.0, 0.0, 0)

