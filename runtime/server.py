"""The cloud as a server that many ends share: each end its own session, none able to hold up,
crash or stop another.

* Connections are accepted on one thread and each proves its token on a thread of its own,
  within ``ServerConfig.handshake_s`` in all: a silent or trickling connection costs a thread
  for a few seconds, never the accept loop. Beyond ``max_handshakes`` pending handshakes or
  ``max_ends`` sessions a connection is told the server is busy (``ServerBusy`` at its end)
  and closed at once (counted in ``turned_away``).
* An authenticated end gets a session: a :class:`~coach_fx.runtime.cloud.CloudWorker` on its
  own thread, over the shared cloud halves (read-only: inference). A bad frame is that
  request's error reply; a close request ends that end's session, not the server.
* The server runs until :meth:`CloudServer.stop` (or, with ``sessions=N``, until N sessions
  have ended: tests and one-shot runs).

Example::

    >>> listener = TcpServer("127.0.0.1", 0, token=b"secret")                      # doctest: +SKIP
    >>> server = CloudServer({0: (cm.cloud_module, cm.boundary)}, listener).start()  # doctest: +SKIP
    >>> ...; server.stop()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from coach_fx.runtime.cloud import CloudPlan, CloudWorker
from coach_fx.runtime.config import ServerConfig, StreamConfig
from coach_fx.runtime.links.base import LinkError, LinkTimeout
from coach_fx.runtime.links.tcp import AuthError, TcpEndpoint, TcpServer, ThrottledLog

log = logging.getLogger("coach_fx.runtime")

#: How often the accept loop looks whether it was asked to stop (seconds).
POLL_S = 0.2


@dataclass
class ServerStats:
    """What a server has done so far (a snapshot)."""

    sessions: int = 0        # ends authenticated and served (ended or not)
    active: int = 0          # sessions running now
    ended: int = 0           # sessions over (closed by their end, or their end went away)
    served: int = 0          # requests answered by ended sessions
    rejected: int = 0        # frames that did not decode (each answered with its error)
    refused: int = 0         # connections that failed the handshake
    turned_away: int = 0     # connections closed at once: too many ends or handshakes


class CloudServer:
    """Serves ``plans`` (plan id -> cloud half and boundary) to every end that authenticates
    on ``listener``, each in its own session."""

    def __init__(self, plans: dict[int, CloudPlan], listener: TcpServer,
                 config: StreamConfig = StreamConfig(), server: ServerConfig = ServerConfig(),
                 *, adaptive: bool = False, sessions: int | None = None) -> None:
        self.plans, self.listener, self.config, self.limits = dict(plans), listener, config, server
        self.adaptive = adaptive
        self.max_total = sessions
        self.stats = ServerStats()
        self._lock = threading.Lock()
        self._handshakes = 0
        self._workers: set[CloudWorker] = set()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = ThrottledLog(log, f"coach cloud {listener.host}:{listener.port}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "CloudServer":
        self._thread = threading.Thread(target=self._accept_loop, name="coach-accept", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serve until :meth:`stop` (or until ``sessions`` sessions have ended)."""
        if self._thread is None:
            self.start()
        self._done.wait()

    def stop(self) -> None:
        """Stop taking ends; the sessions running finish what they hold, then close."""
        self._stop.set()
        self._done.set()
        if self._thread is not None:
            self._thread.join(5 * POLL_S + 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the server is done (stopped, or its ``sessions`` have ended) within ``timeout``."""
        return self._done.wait(timeout)

    # ------------------------------------------------------------------ accepting
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept_connection(POLL_S)
            except LinkTimeout:
                continue
            except OSError:   # the listener was closed
                break
            with self._lock:
                room = (self._handshakes < self.limits.max_handshakes
                        and self.stats.active < self.limits.max_ends)
                if room:
                    self._handshakes += 1
                else:
                    self.stats.turned_away += 1
            if not room:
                self.listener.turn_away(conn)
                self._log.warning(f"turned away {peer}: {self.stats.active} ends served, "
                                  f"{self._handshakes} handshakes pending")
                continue
            threading.Thread(target=self._admit, args=(conn, peer), name="coach-handshake",
                             daemon=True).start()

    def _admit(self, conn, peer: str) -> None:  # noqa: ANN001 - a socket
        try:
            ep = self.listener.handshake(conn, peer, self.limits.handshake_s)
        except AuthError:
            with self._lock:
                self._handshakes -= 1
                self.stats.refused = self.listener.refused
            return
        with self._lock:
            self._handshakes -= 1
            full = self.stats.active >= self.limits.max_ends or self._stop.is_set()
            if full:
                self.stats.turned_away += 1
            else:
                self.stats.sessions += 1
                self.stats.active += 1
        if full:   # the ends filled up during its handshake
            self.listener.turn_away(ep.sock)
            return
        threading.Thread(target=self._session, args=(ep,), name=f"coach-session-{peer}",
                         daemon=True).start()

    # ------------------------------------------------------------------ sessions
    def _session(self, ep: TcpEndpoint) -> None:
        worker = CloudWorker(self.plans, ep, self.config, adaptive=self.adaptive)
        with self._lock:
            self._workers.add(worker)
        try:
            worker.serve()
            log.info("coach cloud: the end at %s closed its session (%d requests)", ep.addr, worker.served)
        except LinkError as e:
            log.warning("coach cloud: the end at %s went away (%s)", ep.addr, e)
        except Exception as e:  # noqa: BLE001 - one session's failure never ends the server
            log.error("coach cloud: the session of %s failed: %s: %s", ep.addr, type(e).__name__, e)
        finally:
            ep.close()
            with self._lock:
                self._workers.discard(worker)
                self.stats.active -= 1
                self.stats.ended += 1
                self.stats.served += worker.served
                self.stats.rejected += worker.rejected
                if self.max_total is not None and self.stats.ended >= self.max_total:
                    self._stop.set()
                    self._done.set()

    def snapshot(self) -> ServerStats:
        """The stats now, running sessions' requests included."""
        with self._lock:
            s = ServerStats(**vars(self.stats))
            s.served += sum(w.served for w in self._workers)
            s.rejected += sum(w.rejected for w in self._workers)
            s.refused = self.listener.refused
        return s


__all__ = ["CloudServer", "ServerStats"]
