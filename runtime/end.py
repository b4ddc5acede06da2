"""The end worker: runs a stream through the end half, the link and the cloud, and collects
the results in order.

The end worker computes frame k+1 while frame k is on the wire and frame k-1 is in the cloud:
a compute thread, a sender thread and a receiver thread joined by bounded queues (a full queue
stops the stage before it: backpressure, bounded memory). Results are matched to requests by
id and returned in order. Each stage's busy time is recorded, so latency, throughput and the
bubble ratio are measured, not just predicted. A slow end device is emulated on this host
(``runtime.emulation``).

Example::

    >>> link = InProcessLink.for_network(Network(20))                                    # doctest: +SKIP
    >>> cloud = CloudWorker({0: (cm.cloud_module, cm.boundary)}, link.cloud).start()      # doctest: +SKIP
    >>> end = EndWorker(link.end, cm.out_spec, StaticPolicy(cm.end_module, cm.boundary))  # doctest: +SKIP
    >>> outs, stats = run_session(end, cloud, frames); print(stats.table())              # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from coach_fx.runtime.cloud import CloudWorker
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.emulation import emulate, fast_handoff
from coach_fx.runtime.links.base import Endpoint, LinkError
from coach_fx.runtime.policy import Policy
from coach_fx.runtime.session import RemoteError, RequestFailed, StreamSession
from coach_fx.runtime.stats import StageBusy, Stats, steady_throughput
from coach_fx.runtime.wire import CLOSE_ID, FLAG_CONTROL, encode


class EndWorker:
    """Runs the end half over a stream and collects the results in order.

    Faults: when the link or the cloud fails (an error, or no result for
    ``config.timeout_s`` while requests are in flight), ``config.fallback=None`` raises;
    ``"local"`` runs the affected and the following requests on the end device with
    ``whole_model`` (the whole model); ``"error"`` gives them a :class:`RequestFailed`
    result. Meanwhile ``reconnect`` (a callable returning a fresh endpoint) is retried every
    ``config.retry_s`` and the stream goes back to the cloud once it succeeds. Every request
    gets exactly one result, in order: a late reply for a request already settled is dropped,
    not delivered twice. At most ``config.max_inflight`` requests wait for the cloud at once,
    so memory stays bounded however long the stream. ``deliver(i, result)``, where given, is
    called with each result as it is settled (under the session's lock: it must not block); the
    stream then keeps no outputs and only the latest records (``runtime.stats.Ledger``: ``run``
    returns None in the places it holds), so that a stream of any length runs in bounded memory.
    """

    def __init__(self, endpoint: Endpoint | None, out_spec: Any, policy: Policy,
                 config: StreamConfig = StreamConfig(), *,
                 whole_model: Callable[..., Any] | None = None,
                 reconnect: Callable[[], Endpoint] | None = None,
                 deliver: Callable[[int, Any], None] | None = None) -> None:
        if config.fallback == "local" and whole_model is None:
            raise ValueError("fallback='local' needs whole_model (the whole model on the end device)")
        self.endpoint, self.out_spec, self.config = endpoint, out_spec, config
        self.whole_model, self.reconnect, self.deliver = whole_model, reconnect, deliver
        self.events: list[str] = []
        #: per frame, what to send (``prepare``) and what to learn from results (``on_result``):
        #: ``StaticPolicy`` for one compiled plan, ``OnlinePolicy`` for the bandwidth
        #: controller, plan switching and the semantic cache
        self.policy = policy
        self.receiver_thread: threading.Thread | None = None
        self.session: StreamSession | None = None   # the stream under way (or the last one)
        self._t_begin = 0.0
        self._predicted: dict = {}

    # ------------------------------------------------------------------ the stream
    def run(self, inputs: Iterable[Sequence[Any]], pipelined: bool = True,
            predicted: dict | None = None) -> tuple[list[Any], Stats]:
        st = self.session = StreamSession(self)
        self._predicted = predicted or {}
        it = iter(inputs)
        first = next(it, None)
        if first is None:
            return [], Stats(0, [], 0.0, 0.0, StageBusy(), 0, predicted or {})
        first = tuple(first) if isinstance(first, (tuple, list)) else (first,)
        self.policy.warm_up(first, self.config.end_slowdown)
        if self.endpoint is not None:
            st.start_link(self.endpoint)
        self._t_begin = time.perf_counter()

        def frames() -> Iterable[tuple]:
            yield first
            for x in it:
                yield tuple(x) if isinstance(x, (tuple, list)) else (x,)

        try:
            with torch.no_grad(), fast_handoff():
                for i, x in enumerate(frames()):
                    st.settle_failed()
                    st.ledger.add(time.perf_counter())
                    if not st.up:
                        st.try_reconnect()
                    if st.up and st.send(i, x):
                        if not pipelined:
                            st.wait_until(lambda: not st.ledger.pending(i) or not st.up)
                    else:
                        st.settle(i, x, "the cloud is unavailable")
                st.finish()
        finally:
            st.stop_link()
        return st.ledger.results, self.stats()

    def stats(self) -> Stats:
        """The figures of the stream under way (its settled requests) or of the last one."""
        st = self.session
        if st is None:
            return Stats(0, [], 0.0, 0.0, StageBusy(), 0, dict(self._predicted))
        with st.cv:
            pairs, folded = st.ledger.settled(), st.ledger.folded
        done = [d for d, _ in pairs]
        wall = (max(done) - self._t_begin) if done else 0.0
        # a socket's send returns once the kernel has the bytes: the uplink's busy time is the
        # wire time the cloud saw, when that is longer (in-process both are the emulated time)
        link_busy = max(st.busy.link, st.busy.wire)
        return Stats(folded + len(pairs), [d - s for d, s in pairs], wall, steady_throughput(done, wall),
                     StageBusy(st.busy.end, link_busy, st.busy.cloud), st.busy.sent_bytes,
                     dict(self._predicted), st.outcomes)

    def close(self, timeout: float = 5.0) -> None:
        """Tell the cloud worker to stop serving and wait for its acknowledgement."""
        if self.endpoint is None:
            return
        try:
            self.endpoint.send(encode(CLOSE_ID, [], FLAG_CONTROL))
        except LinkError as e:   # the link is down already: nothing to close
            self.events.append(f"close: {e}")
            return
        if self.receiver_thread is not None:
            self.receiver_thread.join(timeout)


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


def run_end_only(end_module: Callable[..., Any], inputs: Iterable[Sequence[Any]],
                 slowdown: float = 1.0, end_host_s: float | None = None) -> tuple[list[Any], Stats]:
    """An end-only plan: every frame computed on the end device, nothing sent
    (``end_host_s``: the model's time on this host measured alone, see ``emulate``)."""
    outs, lat = [], []
    t_begin = time.perf_counter()
    busy = 0.0
    done = []
    with torch.no_grad():
        for x in inputs:
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            t0 = time.perf_counter()
            outs.append(end_module(*x))
            took = emulate(t0, slowdown, end_host_s)
            busy += took
            lat.append(took)
            done.append(time.perf_counter())
    n = len(outs)
    wall = (done[-1] - t_begin) if n else 0.0
    thr = steady_throughput(done, wall)
    return outs, Stats(n, lat, wall, thr, StageBusy(end_s=busy), 0)


__all__ = ["EndWorker", "RemoteError", "RequestFailed", "run_end_only", "run_session"]
