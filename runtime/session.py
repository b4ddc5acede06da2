"""One stream's shared state on the end side (:class:`StreamSession`): requests in flight
and settled, the link's epoch, the sender and receiver threads, faults and reconnects. The end
worker (``runtime.end``) drives it; the policy (``runtime.policy``) decides per frame.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from coach_fx.runtime.codec import entries_to_output
from coach_fx.runtime.controller import ArrivalSampler
from coach_fx.runtime.emulation import emulate
from coach_fx.runtime.links.base import Endpoint, LinkError, LinkTimeout
from coach_fx.runtime.wire import FLAG_CONTROL, FLAG_ERROR, ReplyStats, decode
from coach_fx.runtime.stats import PENDING, Ledger, Outcomes

if TYPE_CHECKING:
    from coach_fx.runtime.end import EndWorker


class RemoteError(RuntimeError):
    """The cloud failed to compute a request; the message says why."""


class RequestFailed(RuntimeError):
    """Stands in a stream's results for a request that could not be served (fallback="error")."""

    def __init__(self, request_id: int, reason: str) -> None:
        super().__init__(f"request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason


#: How often the receiver looks whether the cloud has stalled (no result for
#: ``StreamConfig.timeout_s`` with requests in flight); it also wakes at the stall's deadline.
STALL_POLL_S = 0.05


@dataclass
class Busy:
    """Each stage's busy time over a stream (seconds) and the bytes sent."""

    end: float = 0.0
    #: time the sender spent handing messages to the endpoint (the emulated wire time
    #: in-process; over TCP only until the kernel has the bytes)
    link: float = 0.0
    #: the wire time the cloud reported per request (first to last byte as it received them)
    wire: float = 0.0
    cloud: float = 0.0
    sent_bytes: int = 0


class StreamSession:
    """The shared state of one stream: what is in flight, what is settled, the link's epoch.

    The end worker's thread computes and sends (``send``); a sender and a receiver thread per
    link epoch move messages; a failed link bumps the epoch, so a late thread of the old one
    changes nothing. Every request is settled exactly once: by its result, on the end device,
    or as failed (``StreamConfig.fallback``)."""

    def __init__(self, w: "EndWorker") -> None:
        self.w = w
        #: each request's result and times (no outputs kept where they are handed on)
        self.ledger = Ledger(keep=w.deliver is None)
        self.inflight: dict[int, tuple] = {}
        self.to_settle: list[tuple[int, str]] = []
        self.cv = threading.Condition()
        self.up = False
        self.epoch = 0
        self.error: BaseException | None = None
        self.busy = Busy()
        self.outcomes = Outcomes()
        #: when the link last showed progress: a result came back, or the first request went
        #: in flight after none was
        self.last_progress = time.perf_counter()
        self.audits: set[int] = set()   # answered on the end, a copy sent to check the answer
        self.last_try = 0.0
        self.dialing = False    # a reconnect is under way (``try_reconnect``)
        self.closed = False     # the stream is over: a late dial is dropped
        self.stopped_epoch = -1
        self.threads: list[threading.Thread] = []
        self.send_q: queue.Queue = queue.Queue(w.config.queue_size)
        #: the bandwidth samples of the replies, from their sends and arrivals (per link epoch)
        self.sampler = ArrivalSampler()

    # -------------------------------------------------------------- link lifecycle
    def start_link(self, endpoint: Endpoint) -> None:
        send_q: queue.Queue = queue.Queue(self.w.config.queue_size)
        with self.cv:   # the new queue with the new epoch: a request never lands in an old one
            if self.closed:          # a dial that finished after the stream did
                endpoint.close()
                return
            self.w.endpoint = endpoint
            self.send_q = send_q
            self.sampler = ArrivalSampler()
            self.epoch += 1
            self.up = True
            epoch = self.epoch
            self.cv.notify_all()
        self.threads = [threading.Thread(target=self._sender, args=(epoch, endpoint, self.send_q),
                                         daemon=True, name="coach-send"),
                        threading.Thread(target=self._receiver, args=(epoch, endpoint),
                                         daemon=True, name="coach-recv")]
        for t in self.threads:
            t.start()
        self.w.receiver_thread = self.threads[1]

    def stop_link(self) -> None:
        with self.cv:
            self.closed = True
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
            if self.w.config.fallback is None:
                self.error = e
            self.up = False
            self.w.events.append(f"link down: {e}")
            for i in sorted(self.inflight):
                self.to_settle.append((i, str(e)))
            self.cv.notify_all()
        ep = self.w.endpoint
        if ep is not None:
            try:
                ep.abort()
            except Exception:  # noqa: BLE001
                pass

    def try_reconnect(self) -> None:
        """Dial the cloud again, at most every ``retry_s``, on a thread of its own: the stream
        goes on meanwhile (its requests settled by the fallback), however long a dial takes."""
        if self.error is not None:
            raise self.error
        if self.w.reconnect is None or time.perf_counter() - self.last_try < self.w.config.retry_s:
            return
        with self.cv:
            if self.dialing or self.closed:
                return
            self.dialing = True
        self.last_try = time.perf_counter()
        threading.Thread(target=self._dial, daemon=True, name="coach-dial").start()

    def _dial(self) -> None:
        try:
            endpoint = self.w.reconnect()
        except Exception as e:  # noqa: BLE001 - still down; try again later
            self.w.events.append(f"reconnect failed: {e}")
            endpoint = None
        with self.cv:
            self.dialing = False
            self.last_try = time.perf_counter()
            if endpoint is None or self.closed or self.up:
                stale = endpoint
                endpoint = None
            else:
                stale = None
                if self.epoch > 0:   # not the first connection of a stream that began without one
                    self.outcomes.reconnects += 1
                self.w.events.append("reconnected" if self.epoch > 0 else "connected")
        if stale is not None:
            stale.close()
        if endpoint is not None:
            self.start_link(endpoint)

    # -------------------------------------------------------------- per request
    def send(self, i: int, x: tuple) -> bool:
        """Compute the end half and queue the message; False if the link is down."""
        w = self.w
        # a policy that may answer on the end prepares first, so that its answers go on while
        # the link is stalled; what it sends then waits for room in flight
        wait_first = not w.policy.answers_on_end
        if wait_first:
            self.wait_until(lambda: len(self.inflight) < w.config.max_inflight or not self.up)
        if not self.up:
            return False
        t0 = time.perf_counter()
        prep = w.policy.prepare(i, x)
        self.busy.end += emulate(t0, w.config.end_slowdown, prep.end_host_s)
        if prep.answered:
            with self.cv:
                self._set_result(i, prep.answer)
                self.outcomes.answered_on_end += 1
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
                q.put((epoch, msg, i), timeout=0.05)
                return True
            except queue.Full:
                if epoch != self.epoch or not self.up:
                    return True   # the failure handler has taken the request over

    def _room_or_finished(self, i: int, audit: bool) -> bool:
        """Wait for room in flight for request ``i``, or let the policy finish it on the end
        device meanwhile (``policy.finish_on_end_wait_s`` says when that pays: the link backlogged or
        stalled). True: it was finished there (an audit copy: checked there), nothing to send."""
        w = self.w
        local_wait = w.policy.finish_on_end_wait_s
        finish = False
        with self.cv:
            # the send queue counts as the link's backlog too: with it full, ``send`` would
            # block on it below however few requests the in-flight limit sees
            while (len(self.inflight) >= w.config.max_inflight or self.send_q.full()) and self.up:
                if self.error is not None:
                    raise self.error
                if self.to_settle:
                    break
                left = local_wait(i, len(self.inflight), time.perf_counter() - self.last_progress)
                if left <= 0:
                    finish = True
                    break
                self.cv.wait(min(0.05, left))
        self.settle_failed()
        if not finish:
            return False
        t0 = time.perf_counter()
        prep = w.policy.finish_on_end(i)
        self.busy.end += emulate(t0, w.config.end_slowdown, prep.end_host_s)
        with self.cv:
            if audit:
                self.audits.discard(i)
            else:
                self._set_result(i, prep.answer)
                self.outcomes.finished_on_end += 1
            self.cv.notify_all()
        return True

    def settle(self, i: int, x: tuple | None, reason: str) -> None:
        """Give request ``i`` its result without the cloud (or fail the stream)."""
        w = self.w
        if self.error is not None:
            raise self.error
        if w.config.fallback is None:
            raise LinkError(f"request {i}: {reason}")
        if w.config.fallback == "local":
            t0 = time.perf_counter()
            out = w.whole_model(*x)
            self.busy.end += emulate(t0, w.config.end_slowdown)
            self.outcomes.fell_back += 1
        else:
            out = RequestFailed(i, reason)
            self.outcomes.failed += 1
        with self.cv:
            if self.ledger.pending(i):
                self._set_result(i, out)
            self.cv.notify_all()

    def _set_result(self, i: int, out: Any) -> None:
        """Request ``i``'s one result (under ``cv``); handed on at once where the worker
        delivers results as they come (``EndWorker(deliver=...)``)."""
        self.ledger.settle(i, out, time.perf_counter())
        self.cv.notify_all()
        if self.w.deliver is not None:
            self.w.deliver(i, out)

    def settle_failed(self) -> None:
        with self.cv:
            todo, self.to_settle = self.to_settle, []
            frames = {i: self.inflight.pop(i, None) for i, _ in todo}
        if self.error is not None:
            raise self.error
        for i, reason in todo:
            if self.ledger.pending(i):
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
                pending = self.ledger.pending_ids()
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
                self.sampler.sent(item[2], time.perf_counter())
                self.busy.link += endpoint.send(item[1])
                self.busy.sent_bytes += len(item[1])
        except BaseException as e:  # noqa: BLE001
            self.link_failed(epoch, e)

    def _receiver(self, epoch: int, endpoint: Endpoint) -> None:
        w = self.w
        last = time.perf_counter()
        try:
            # runs past the stream's end, until the cloud acknowledges close or the link fails
            while epoch == self.epoch or self.stopped_epoch == epoch:
                try:   # wake at the stall's deadline, not a poll after it
                    left = w.config.timeout_s - (time.perf_counter() - last)
                    msg = endpoint.recv(max(0.001, min(STALL_POLL_S, left)))
                except LinkTimeout:
                    with self.cv:
                        busy = bool(self.inflight)
                    if busy and time.perf_counter() - last >= w.config.timeout_s:
                        raise LinkError(f"no result from the cloud for {w.config.timeout_s} s with "
                                        f"{len(self.inflight)} request(s) in flight: it stalled") from None
                    if not busy:
                        last = time.perf_counter()
                    continue
                last = self.last_progress = time.perf_counter()
                req, _, flags, entries = decode(msg)
                if flags & FLAG_CONTROL:
                    return      # the cloud acknowledged close
                if flags & FLAG_ERROR:
                    self.sampler.forget(req)
                    text = bytes(entries[0].value().tolist()).decode(errors="replace")
                    if w.config.fallback is None:
                        raise RemoteError(f"the cloud failed on request {req}: {text}")
                    with self.cv:   # a fallback settles that request alone; the stream goes on
                        if req in self.inflight and self.ledger.pending(req):
                            self.to_settle.append((req, f"the cloud failed on it: {text}"))
                            self.cv.notify_all()
                    continue
                out = entries_to_output(entries, w.out_spec)
                st = self.sampler.sample(req, ReplyStats.of(entries))
                with self.cv:
                    audit = req in self.audits
                    if audit:
                        self.audits.discard(req)
                        self.busy.cloud += st.cloud_s if st else 0.0
                    elif req not in self.inflight or not self.ledger.pending(req):
                        self.outcomes.dropped += 1     # late or repeated: already settled
                        continue
                    else:
                        del self.inflight[req]
                        self.busy.cloud += st.cloud_s if st else 0.0
                        self.busy.wire += st.wire_s if st else 0.0
                        self._set_result(req, out)
                w.policy.on_result(req, out, st, audit)
        except RemoteError as e:
            with self.cv:
                self.error = e
                self.cv.notify_all()
        except BaseException as e:  # noqa: BLE001
            self.link_failed(epoch, e)


__all__ = ["PENDING", "RemoteError", "RequestFailed", "StreamSession"]
