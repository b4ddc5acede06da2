"""The cloud as a server that many ends share: each end its own session, none able to hold up,
crash or stop another, and requests for one plan from all ends run through its cloud half as
one batch.

* Connections are accepted on one thread and each proves its token (inside TLS when the
  listener has it) on a thread of its own, within ``ServerConfig.handshake_s`` in all: a
  silent or trickling connection costs a thread for a few seconds, never the accept loop.
  Beyond ``max_handshakes`` pending handshakes, ``max_ends`` sessions or ``max_per_peer``
  connections from one address, a connection is told the server is busy (``ServerBusy`` at
  its end) and closed at once (counted in ``turned_away``).
* An authenticated end gets a session: a reader thread (its requests, at most
  ``session_inflight`` unanswered, each no longer than the largest legal request of the
  plans served) and a writer thread (its replies, in order).
* One compute thread takes the requests of all sessions, up to ``Batching.max_batch`` at
  a time, holding the first at most ``Batching.max_wait_s`` for more, and submits those for
  one plan as one batch to its engine (``runtime.compute.Compute``: ``CloudWorker`` in this
  process, or ``RayCompute``'s replicas), keeping up to the engine's ``parallelism``
  batches out; a reply thread hands their replies to the sessions in submission order. A bad
  frame is that request's error reply; a close request ends that end's session, not the server.
* :meth:`CloudServer.drain` (``coach serve`` on SIGTERM) stops taking ends and requests,
  answers every request already read, then closes the sessions.

Example::

    >>> listener = TcpServer("127.0.0.1", 0, token=secret)                            # doctest: +SKIP
    >>> server = CloudServer({0: (cm.cloud_module, cm.boundary)}, listener).start()  # doctest: +SKIP
    >>> ...; server.drain()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Union

from coach_fx.runtime.cloud import Arrival, CloudPlan, CloudWorker, error_reply_to
from coach_fx.runtime.codec import max_request_bytes
from coach_fx.runtime.compute import Compute, Replies
from coach_fx.runtime.config import ServerConfig, StreamConfig
from coach_fx.runtime.emulation import fast_handoff
from coach_fx.runtime.links.base import LinkError, ThrottledLog
from coach_fx.runtime.links.tcp import AuthError, TcpEndpoint, TcpServer
from coach_fx.runtime.wire import CLOSE_ID, FLAG_CONTROL, WireError, encode, peek_header

log = logging.getLogger("coach_fx.runtime")

#: How often waiting threads look whether they were asked to stop (seconds).
POLL_S = 0.2


@dataclass
class ServerStats:
    """What a server has done so far (a snapshot)."""

    sessions: int = 0        # ends authenticated and served (ended or not)
    active: int = 0          # sessions running now
    ended: int = 0           # sessions over (closed by their end, its end gone, or drained)
    served: int = 0          # replies sent (answers, and error replies to bad requests)
    rejected: int = 0        # frames that did not decode (each answered with its error)
    refused: int = 0         # connections that failed the handshake
    turned_away: int = 0     # connections closed at once: too many ends, handshakes or per peer
    batches: int = 0         # runs of a cloud half (one per batch): served / batches = mean batch

    @property
    def mean_batch(self) -> float:
        return self.served / self.batches if self.batches else 0.0


class _Eof:
    """Queued behind a session's last request: its writer stops once the replies before it are out."""


_EOF = _Eof()
Reply = Union[bytes, bytearray, None, _Eof]   # None: the session's close request
#: a batch as submitted: its items, and per group of them their indices and how to get their
#: replies (None: a session's end, no request)
Submitted = tuple[list, list[tuple[list[int], Union[Replies, None]]]]


class _Session:
    """One end's connection: requests read (bounded), replies queued for its writer."""

    def __init__(self, ep: TcpEndpoint, peer: str, inflight: int) -> None:
        self.ep, self.peer = ep, peer
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.room = threading.Semaphore(inflight)   # requests read and not yet answered
        self.served = 0
        self.closed = threading.Event()   # its writer is done: nothing more is read or sent


class CloudServer:
    """Serves ``plans`` (plan id -> cloud half and boundary) to every end that authenticates
    on ``listener``, each in its own session, batching requests across ends."""

    def __init__(self, plans: dict[int, CloudPlan], listener: TcpServer,
                 config: StreamConfig = StreamConfig(), server: ServerConfig = ServerConfig(),
                 *, adaptive: bool = False, sessions: int | None = None, compute: Compute | None = None) -> None:
        if not plans:
            raise ValueError("a server needs at least one plan to serve")
        self.listener, self.config, self.limits = listener, config, server
        self.max_total = sessions
        #: where the batches run (default: a ``CloudWorker`` on this process's compute thread)
        self.engine: Compute = compute if compute is not None else CloudWorker(plans, None, config, adaptive=adaptive)
        #: the longest request any plan takes: a longer length prefix ends its session unread
        self.max_message = max(max_request_bytes(h.boundary) for h in self.engine.plans.values())
        self.stats = ServerStats()
        self._lock = threading.Lock()
        self._handshakes = 0
        self._per_peer: Counter[str] = Counter()
        self._sessions: set[_Session] = set()
        self._requests: queue.Queue[tuple[_Session, bytes | _Eof, Arrival]] = queue.Queue()
        # submitted batches, in order, for the reply thread (bounded: the engine's parallelism)
        self._submitted: queue.Queue[Submitted] = queue.Queue(maxsize=max(1, self.engine.parallelism))
        self._stop = threading.Event()       # no new ends
        self._draining = threading.Event()   # no new requests either
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log = ThrottledLog(log, f"coach cloud {listener.host}:{listener.port}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "CloudServer":
        for target, name in ((self._accept_loop, "coach-accept"), (self._compute_loop, "coach-compute"),
                             (self._reply_loop, "coach-reply")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop at once: no new ends; running sessions are closed (their ends see the link
        go and fall back, reconnect or fail, as they are configured); the listener is closed."""
        self._stop.set()
        self._draining.set()
        for s in self._snapshot_sessions():
            s.ep.close()
            s.replies.put(_EOF)   # its writer stops even with requests unanswered
        self._done.set()
        for t in self._threads:
            t.join(5 * POLL_S + 1)
        self.listener.close()
        self.engine.close()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking ends and requests, answer every request already read, close the
        sessions; whether all were answered within ``timeout`` (default: the stream timeout)."""
        self._stop.set()
        self._draining.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.timeout_s)
        while self._snapshot_sessions() and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
        clean = not self._snapshot_sessions()
        self.stop()
        return clean

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the server is done (stopped, drained, or its ``sessions`` ended) within ``timeout``."""
        return self._done.wait(timeout)

    def __enter__(self) -> "CloudServer":
        return self.start() if not self._threads else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def batching(self) -> bool:
        """Whether requests of several ends can run as one batch (every plan has a batched
        cloud half and ``max_batch`` > 1)."""
        return self.config.batching.max_batch > 1 and all(h.batched is not None for h in self.engine.plans.values())

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.host, self.listener.port

    def _snapshot_sessions(self) -> list[_Session]:
        with self._lock:
            return list(self._sessions)

    # ------------------------------------------------------------------ accepting
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept_connection(POLL_S)
            except LinkError:   # no connection this poll
                continue
            except OSError:     # the listener was closed
                break
            host = peer.rsplit(":", 1)[0]
            with self._lock:
                why = ("handshakes pending" if self._handshakes >= self.limits.max_handshakes else
                       "ends served" if self.stats.active >= self.limits.max_ends else
                       f"connections from {host}" if self._per_peer[host] >= self.limits.max_per_peer
                       else None)
                if why is None:
                    self._handshakes += 1
                    self._per_peer[host] += 1
                else:
                    self.stats.turned_away += 1
            if why is not None:
                self.listener.turn_away(conn)
                self._log.warning(f"turned away {peer}: the most {why}")
                continue
            threading.Thread(target=self._admit, args=(conn, peer, host), name="coach-handshake",
                             daemon=True).start()

    def _admit(self, conn, peer: str, host: str) -> None:  # noqa: ANN001 - a socket
        try:
            ep = self.listener.handshake(conn, peer, self.limits.handshake_s)
        except AuthError:
            with self._lock:
                self._handshakes -= 1
                self._per_peer[host] -= 1
            return
        ep.max_message = self.max_message
        session = _Session(ep, peer, self.limits.session_inflight)
        with self._lock:
            self._handshakes -= 1
            full = self.stats.active >= self.limits.max_ends or self._stop.is_set()
            if full:
                self.stats.turned_away += 1
                self._per_peer[host] -= 1
            else:
                self.stats.sessions += 1
                self.stats.active += 1
                self._sessions.add(session)
        if full:   # the ends filled up (or the server stopped) during its handshake
            self.listener.turn_away(ep.sock)
            return
        threading.Thread(target=self._read, args=(session,), name=f"coach-read-{peer}",
                         daemon=True).start()
        threading.Thread(target=self._write, args=(session, host), name=f"coach-write-{peer}",
                         daemon=True).start()

    # ------------------------------------------------------------------ sessions
    def _read(self, s: _Session) -> None:
        """A session's requests into the compute queue, at most ``session_inflight`` unanswered."""
        idle_since = time.monotonic()
        try:
            while not self._draining.is_set() and not s.closed.is_set():
                if not s.ep.poll(POLL_S):
                    if time.monotonic() - idle_since > self.limits.idle_s:
                        log.info("coach cloud: the end at %s sent nothing for %.0f s; ending its session",
                                 s.peer, self.limits.idle_s)
                        break
                    continue
                msg = s.ep.recv(None)
                idle_since = time.monotonic()
                while not s.room.acquire(timeout=POLL_S):   # backpressure: the end waits
                    if s.closed.is_set():
                        return
                self._requests.put((s, msg, Arrival.of(s.ep, max(1, self.stats.active))))
                if _is_close(msg):
                    return   # the close travels the queue behind its requests; nothing follows
        except LinkError as e:
            log.warning("coach cloud: the end at %s went away (%s)", s.peer, e)
        self._requests.put((s, _EOF, Arrival()))

    def _write(self, s: _Session, host: str) -> None:
        """A session's replies to its end, in order; the session ends after its close or EOF."""
        try:
            while True:
                reply = s.replies.get()
                if isinstance(reply, _Eof):
                    break
                if reply is None:   # close: acknowledge, so the end's receiver stops cleanly
                    s.ep.send(encode(CLOSE_ID, [], FLAG_CONTROL))
                    log.info("coach cloud: the end at %s closed its session (%d requests)", s.peer, s.served)
                    break
                s.ep.send(reply)
                s.served += 1
                s.room.release()
        except LinkError as e:
            log.warning("coach cloud: cannot answer the end at %s (%s)", s.peer, e)
        finally:
            s.closed.set()
            s.ep.close()
            with self._lock:
                self._sessions.discard(s)
                self._per_peer[host] -= 1
                self.stats.active -= 1
                self.stats.ended += 1
                self.stats.served += s.served
                if self.max_total is not None and self.stats.ended >= self.max_total:
                    self._stop.set()
                    self._done.set()

    # ------------------------------------------------------------------ compute
    def _compute_loop(self) -> None:
        self.engine.warm_up()   # requests queue meanwhile
        with fast_handoff():
            while not self._done.is_set():
                try:
                    first = self._requests.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                batch = [first]
                deadline = time.monotonic() + self.config.batching.max_wait_s
                while len(batch) < self.config.batching.max_batch:
                    try:
                        left = deadline - time.monotonic()
                        batch.append(self._requests.get(timeout=left) if left > 0
                                     else self._requests.get_nowait())
                    except queue.Empty:
                        break
                submitted = self._submit(batch)
                while not self._done.is_set():   # backpressure: the engine's parallelism out at most
                    try:
                        self._submitted.put(submitted, timeout=POLL_S)
                        break
                    except queue.Full:
                        continue

    def _submit(self, batch: list[tuple[_Session, bytes | _Eof, Arrival]]) -> Submitted:
        """Submit one batch to the engine: requests grouped by plan (in arrival order), every
        other item alone."""
        groups: dict[object, list[int]] = {}
        for i, (_, msg, _) in enumerate(batch):
            key: object = i
            if not isinstance(msg, _Eof):
                try:
                    _, plan_id, flags, _ = peek_header(msg)
                    if not flags & FLAG_CONTROL:
                        key = ("plan", plan_id)
                except WireError:
                    pass
            groups.setdefault(key, []).append(i)
        submitted: list[tuple[list[int], Replies | None]] = []
        for idx in groups.values():
            if isinstance(batch[idx[0]][1], _Eof):
                submitted.append((idx, None))
                continue
            try:
                submitted.append((idx, self.engine.submit([(batch[i][1], batch[i][2]) for i in idx])))
            except Exception as e:  # noqa: BLE001 - never the server's end; the requests get errors
                submitted.append((idx, _failed([batch[i][1] for i in idx], e)))
        return batch, submitted

    @staticmethod
    def _deliver(batch: list[tuple[_Session, bytes | _Eof, Arrival]],
                 submitted: list[tuple[list[int], Replies | None]]) -> None:
        """A submitted batch's replies to its sessions' writers, each in its requests' order."""
        replies: list[Reply] = [None] * len(batch)
        for idx, get in submitted:
            if get is None:
                replies[idx[0]] = _EOF
                continue
            try:
                out = get()
            except Exception as e:  # noqa: BLE001 - engines answer errors themselves; this failed outside them
                out = _failed([batch[i][1] for i in idx], e)()
            for i, r in zip(idx, out):
                replies[i] = r
        for (s, _, _), r in zip(batch, replies):
            s.replies.put(r)

    def _reply_loop(self) -> None:
        """The submitted batches' replies, in submission order (ends get theirs in order
        whichever replica computed them)."""
        while not self._done.is_set():
            try:
                self._deliver(*self._submitted.get(timeout=POLL_S))
            except queue.Empty:
                continue

    def snapshot(self) -> ServerStats:
        """The stats now, running sessions' replies included."""
        with self._lock:
            st = ServerStats(**vars(self.stats))
            st.served += sum(s.served for s in self._sessions)
        # counted where they happen (the listener, the compute thread's worker)
        st.refused, st.rejected, st.batches = self.listener.refused, self.engine.rejected, self.engine.calls
        return st


def _failed(msgs: list[bytes], e: Exception) -> Replies:
    """Every request of a batch answered with ``e`` (each end's fallback takes it from there)."""
    log.error("coach cloud: a batch failed outside its requests: %s: %s", type(e).__name__, e)
    replies: list[bytes | None] = [error_reply_to(m, e) for m in msgs]
    return lambda: replies


def _is_close(msg: bytes) -> bool:
    try:
        req, _, flags, _ = peek_header(msg)
    except WireError:
        return False
    return bool(flags & FLAG_CONTROL) and req == CLOSE_ID


__all__ = ["CloudServer", "ServerStats"]
