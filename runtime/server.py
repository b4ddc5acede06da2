"""The cloud as a server that many ends share: each end its own session, none able to hold up,
crash, starve or stop another, and requests for one plan from all ends run through its cloud
half as one batch.

* Connections are accepted on one thread and each proves its token (inside TLS when the
  listener has it) on a thread of its own, within ``ServerConfig.handshake_s`` in all: a
  silent or trickling connection costs a thread for a few seconds, never the accept loop.
  Beyond ``max_handshakes`` pending handshakes (``max_handshakes_per_peer`` from one
  address), ``max_ends`` sessions or ``max_per_peer`` connections from one address, a
  connection is told the server is busy (``ServerBusy`` at its end) and closed at once
  (counted in ``turned_away``); so is one that completes its handshake when the ends filled
  meanwhile, and every connection while the server drains. When every end's place is taken,
  a new end takes that of the session idle longest (nothing sent for ``evict_idle_s``, no
  reply owed); a session silent for ``idle_s`` is ended anyway. Counters by address hold
  only addresses with a connection.
* An authenticated end gets a session: a reader thread (its requests, at most
  ``session_inflight`` unanswered, each no longer than the largest legal request of the
  plans served) and a writer thread (its replies, in order).
* One compute thread takes the sessions' requests round robin (:class:`FairQueue`: one
  request of each end with work in turn, so a greedy end gets the share of any other, not
  the batch), up to ``Batching.max_batch`` at a time, holding the first at most
  ``Batching.max_wait_s`` for more, and submits those for one plan as one batch to its
  engine (``runtime.compute.Compute``: ``CloudWorker`` in this process, or ``RayCompute``'s
  replicas), keeping up to the engine's ``parallelism`` batches out (while an end that sends
  now and then shares the server, batches are kept to ``Batching.shared_latency``); a reply thread hands
  their replies to the sessions in submission order. A bad frame, or a request whose result
  is not finite, is that request's error reply (its neighbours in the batch are answered from
  the same run); a close request ends that end's session, not the server.
* The halves are warmed up in :meth:`CloudServer.start`: a plan that cannot run fails there,
  with the error, before any end is taken. Should the compute thread ever fail, the server
  stops (``fatal`` says why) instead of taking ends it cannot answer.
* :meth:`CloudServer.drain` (``coach serve`` on SIGTERM) stops taking ends and requests,
  answers every request already read, then closes the sessions, within its deadline.

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
from collections import Counter, deque
from dataclasses import dataclass
from typing import Union

from coach_fx.runtime.cloud import Arrival, CloudPlan, CloudWorker, error_reply_to
from coach_fx.runtime.codec import max_request_bytes
from coach_fx.runtime.compute import Compute, Replies
from coach_fx.runtime.config import ServerConfig, StreamConfig
from coach_fx.runtime.emulation import fast_handoff
from coach_fx.runtime.links.base import LinkError, ThrottledLog
from coach_fx.runtime.links.tcp import AuthError, ServerBusy, TcpEndpoint, TcpServer
from coach_fx.runtime.wire import CLOSE_ID, FLAG_CONTROL, WireError, encode, peek_header

log = logging.getLogger("coach_fx.runtime")

#: How often waiting threads look whether they were asked to stop (seconds).
POLL_S = 0.2
#: An end that sent a request with none unanswered counts as one that sends now and then
#: (``FairQueue.light``) for this long.
LIGHT_S = 1.0


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
#: one request as the compute thread takes it: its session, its bytes (or the session's end)
#: and how it arrived
Item = tuple["_Session", Union[bytes, _Eof], Arrival]
#: a batch as submitted: its items, and per group of them their indices and how to get their
#: replies (None: a session's end, no request)
Submitted = tuple[list, list[tuple[list[int], Union[Replies, None]]]]


class _Session:
    """One end's connection: requests read (bounded), replies queued for its writer."""

    def __init__(self, ep: TcpEndpoint, peer: str, host: str, inflight: int) -> None:
        self.ep, self.peer, self.host = ep, peer, host
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.room = threading.Semaphore(inflight)   # requests read and not yet answered
        #: read and not yet taken into a batch (``FairQueue``)
        self.pending: deque[tuple[bytes | _Eof, Arrival]] = deque()
        self.owed = 0                       # requests read and not yet answered
        self.heard = time.monotonic()       # when its last request arrived (or it started)
        self.busy_at = -1e9                 # when it last sent with a request unanswered
        self.served = 0
        self.evicted = False                # its place went to a new end: its reader stops
        self.closed = threading.Event()     # its writer is done: nothing more is read or sent


class FairQueue:
    """The sessions' requests for the compute thread, taken round robin: each session with
    requests waiting gives one, in turn, until the batch is full, so every end with work gets
    an equal share of each batch (an end that asks for less gets all it asks for), and within
    a session its requests stay in order. As in fq_codel, a session whose first request waits
    after it had none joins a round of its own that goes first: an end that sends now and then
    is not queued behind those that always have work; after one request it waits its turn with
    them."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._new: deque[_Session] = deque()    # sessions that had nothing waiting
        self._old: deque[_Session] = deque()    # sessions served and still waiting
        self._light: dict[_Session, float] = {}  # sessions that sent with nothing owed, and when

    def put(self, s: _Session, msg: bytes | _Eof, arrival: Arrival) -> None:
        with self._cv:
            if not s.pending:
                self._new.append(s)
            s.pending.append((msg, arrival))
            if not isinstance(msg, _Eof):
                now = time.monotonic()
                if s.owed == 0:   # nothing unanswered when it sent: maybe an end that sends now and then
                    self._light[s] = now
                else:             # one that keeps requests in flight is none
                    s.busy_at = now
                s.owed += 1
                s.heard = now
            self._cv.notify()

    def light(self, now: float) -> bool:
        """Whether an end that sends now and then shares the server: one that sent within the
        last ``LIGHT_S`` with nothing unanswered, and never more than one request at a time in
        that while. Then batches are kept short for its sake."""
        with self._cv:
            for s, at in list(self._light.items()):
                if now - at > LIGHT_S or s.closed.is_set():
                    del self._light[s]
            return any(now - s.busy_at > LIGHT_S for s in self._light)

    def answered(self, s: _Session) -> None:
        """One of ``s``'s requests has its reply out."""
        with self._cv:
            s.owed -= 1

    def idle_for(self, s: _Session, now: float) -> float:
        """How long ``s`` has had nothing waiting or owed (0: it has)."""
        with self._cv:
            return 0.0 if s.pending or s.owed > 0 else now - s.heard

    def take(self, most: int, wait_s: float, stop: threading.Event) -> list[Item]:
        """Up to ``most`` requests, round robin over the sessions: at least one (waiting for it
        until ``stop`` is set: then none), and what else comes within ``wait_s`` of the first."""
        batch: list[Item] = []
        with self._cv:
            while not (self._new or self._old):
                if stop.is_set():
                    return batch
                self._cv.wait(POLL_S)
            deadline = time.monotonic() + wait_s
            while len(batch) < most:
                if not (self._new or self._old):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                    continue
                s = (self._new or self._old).popleft()
                msg, arrival = s.pending.popleft()
                batch.append((s, msg, arrival))
                if s.pending:
                    self._old.append(s)
        return batch


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
        self.shared_batch = self.config.batching.max_batch
        #: why the server stopped by itself (its compute thread failed), else None
        self.fatal: BaseException | None = None
        self._lock = threading.Lock()
        self._handshakes = 0
        self._handshaking: Counter[str] = Counter()   # by address: connections in their handshake
        self._per_peer: Counter[str] = Counter()      # by address: connections handshaking or served
        self._sessions: set[_Session] = set()
        self._requests = FairQueue()
        # submitted batches, in order, for the reply thread (bounded: the engine's parallelism)
        self._submitted: queue.Queue[Submitted] = queue.Queue(maxsize=max(1, self.engine.parallelism))
        self._stop = threading.Event()       # no new ends
        self._draining = threading.Event()   # no new requests either
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log = ThrottledLog(log, f"coach cloud {listener.host}:{listener.port}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "CloudServer":
        """Warm the halves up (a plan that cannot run raises here, before any end is taken),
        then take ends."""
        warm_up(self.engine)
        #: the largest batch while several ends have sessions (``Batching.shared_latency``)
        self.shared_batch = min(self.config.batching.max_batch, self.engine.shared_batch())
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
            if t is not threading.current_thread():
                t.join(5 * POLL_S + 1)
        self.listener.close()
        self.engine.close()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking ends and requests, answer every request already read, close the
        sessions; whether all were answered within ``timeout`` (default: the stream timeout).
        It returns by then whatever the sessions do."""
        self._stop.set()
        self._draining.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.timeout_s)
        while self._snapshot_sessions() and time.monotonic() < deadline and self.fatal is None:
            time.sleep(POLL_S / 4)
        clean = not self._snapshot_sessions()
        self.stop()
        return clean

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the server is done (stopped, drained, failed, or its ``sessions`` ended)
        within ``timeout``."""
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
        while not self._done.is_set():
            try:
                conn, peer = self.listener.accept_connection(POLL_S)
            except LinkError:   # no connection this poll
                continue
            except OSError:     # the listener was closed
                break
            host = peer.rsplit(":", 1)[0]
            lim = self.limits
            with self._lock:
                why = ("draining" if self._stop.is_set() else
                       "handshakes pending" if self._handshakes >= lim.max_handshakes else
                       f"handshakes from {host}" if self._handshaking[host] >= lim.max_handshakes_per_peer else
                       "ends served" if self.stats.active >= lim.max_ends and not self._evictable() else
                       f"connections from {host}" if self._per_peer[host] >= lim.max_per_peer
                       else None)
                if why is None:
                    self._handshakes += 1
                    self._handshaking[host] += 1
                    self._per_peer[host] += 1
                else:
                    self.stats.turned_away += 1
            if why is not None:
                self.listener.turn_away(conn)
                self._log.warning(f"turned away {peer}: {why}" if why == "draining"
                                  else f"turned away {peer}: the most {why}")
                continue
            threading.Thread(target=self._admit, args=(conn, peer, host), name="coach-handshake",
                             daemon=True).start()

    def _evictable(self, now: float | None = None) -> "_Session | None":
        """The session idle longest, if idle for ``evict_idle_s`` (call with the lock held)."""
        now = time.monotonic() if now is None else now
        idle = [(self._requests.idle_for(s, now), s) for s in self._sessions if not s.evicted]
        if not idle:
            return None
        longest, s = max(idle, key=lambda t: t[0])
        return s if longest >= self.limits.evict_idle_s else None

    def _admit(self, conn, peer: str, host: str) -> None:  # noqa: ANN001 - a socket
        victim: list[_Session] = []

        def place() -> bool:
            """Whether the end gets a session (a place reserved now, under the lock): its
            verdict is sent before the session starts, so it can always be read as one."""
            with self._lock:
                if self._stop.is_set():
                    return False
                if self.stats.active >= self.limits.max_ends:
                    old = self._evictable()
                    if old is None:
                        return False
                    old.evicted = True            # its reader stops; its place is the new end's
                    self.stats.active -= 1
                    victim.append(old)
                self.stats.active += 1
                self.stats.sessions += 1
                return True

        try:
            ep = self.listener.handshake(conn, peer, self.limits.handshake_s, admit=place)
        except (AuthError, ServerBusy) as e:
            with self._lock:
                self._handshakes -= 1
                _release(self._handshaking, host)
                _release(self._per_peer, host)
                if isinstance(e, ServerBusy):
                    self.stats.turned_away += 1
            return
        ep.max_message = self.max_message
        session = _Session(ep, peer, host, self.limits.session_inflight)
        with self._lock:
            self._handshakes -= 1
            _release(self._handshaking, host)
            self._sessions.add(session)
        for old in victim:
            log.info("coach cloud: the end at %s idle for %.0f s gives its place to %s", old.peer,
                     self._requests.idle_for(old, time.monotonic()), peer)
        threading.Thread(target=self._read, args=(session,), name=f"coach-read-{peer}",
                         daemon=True).start()
        threading.Thread(target=self._write, args=(session,), name=f"coach-write-{peer}",
                         daemon=True).start()

    # ------------------------------------------------------------------ sessions
    def _read(self, s: _Session) -> None:
        """A session's requests into the compute queue, at most ``session_inflight`` unanswered."""
        idle_since = time.monotonic()
        try:
            while not self._draining.is_set() and not s.closed.is_set() and not s.evicted:
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
                self._requests.put(s, msg, Arrival.of(s.ep, max(1, self.stats.active)))
                if _is_close(msg):
                    return   # the close travels the queue behind its requests; nothing follows
        except LinkError as e:
            log.warning("coach cloud: the end at %s went away (%s)", s.peer, e)
        self._requests.put(s, _EOF, Arrival())

    def _write(self, s: _Session) -> None:
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
                self._requests.answered(s)
                s.room.release()
        except LinkError as e:
            log.warning("coach cloud: cannot answer the end at %s (%s)", s.peer, e)
        finally:
            s.closed.set()
            s.ep.close()
            with self._lock:
                self._sessions.discard(s)
                _release(self._per_peer, s.host)
                if not s.evicted:   # an evicted session's place was handed on already
                    self.stats.active -= 1
                self.stats.ended += 1
                self.stats.served += s.served
                if self.max_total is not None and self.stats.ended >= self.max_total:
                    self._stop.set()
                    self._done.set()

    # ------------------------------------------------------------------ compute
    def _compute_loop(self) -> None:
        try:
            with fast_handoff():
                while not self._done.is_set():
                    shared = self.stats.active > 1 and self._requests.light(time.monotonic())
                    most = self.shared_batch if shared else self.config.batching.max_batch
                    batch = self._requests.take(most, self.config.batching.max_wait_s, self._done)
                    if not batch:
                        continue
                    submitted = self._submit(batch)
                    while not self._done.is_set():   # backpressure: the engine's parallelism out at most
                        try:
                            self._submitted.put(submitted, timeout=POLL_S)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # noqa: BLE001 - a server that cannot compute must not take ends
            self.fatal = e
            log.critical("coach cloud: the compute thread failed (%s: %s); the server stops", type(e).__name__, e)
            self._stop.set()
            self._done.set()

    def _submit(self, batch: list[Item]) -> Submitted:
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
    def _deliver(batch: list[Item],
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


def warm_up(engine: Compute) -> None:
    """Warm ``engine``'s halves up (``Compute.warm_up``: a no-op once done), or raise a
    ``RuntimeError`` saying that the plan cannot run and why. ``coach_fx.serve`` calls it
    before it binds the port, so that no end dials a server still warming up."""
    try:
        engine.warm_up()
    except Exception as e:
        raise RuntimeError(f"the cloud halves cannot run: warming them up failed with "
                           f"{type(e).__name__}: {e}") from e


def _release(counter: Counter, key: str) -> None:
    """One fewer for ``key``; an address with none is dropped (the counters hold only
    addresses with a connection, however many have come and gone)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


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


__all__ = ["CloudServer", "FairQueue", "ServerStats", "warm_up"]
