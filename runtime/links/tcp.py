"""A TCP link with mutual authentication and per-message integrity, for deployments.

Frames: an 8-byte little-endian length, the message (the length checked against a limit
before anything is reserved), then a 16-byte tag. Before any message both sides prove they
hold the shared token, the cloud first, so that an end never answers a challenge from a
server that has proved nothing:

    cloud -> end:   b"COCHAUTH" | version u16 | 32-byte nonce_c
    end   -> cloud: 32-byte nonce_e
    cloud -> end:   HMAC-SHA256(token, b"cloud" | nonce_c | nonce_e)
    end   -> cloud: HMAC-SHA256(token, b"end" | nonce_c | nonce_e)
    cloud -> end:   b"COCHOKAY" (a session), or b"COCHBUSY" (the server filled meanwhile)

A server that cannot take a connection at all sends ``b"COCHBUSY"`` instead of the hello and
closes. With TLS the cloud first sends ``b"COCHTLS3"`` in the clear, or ``b"COCHBUSY"``, and only
then starts TLS: every refusal, before or after authentication, with TLS or without, is eight
bytes the end reads where it expects them and reports as :class:`ServerBusy`, never a length
prefix or a TLS record.

Each direction then keys its tags with HMAC-SHA256(token, direction | nonce_c | nonce_e):
a tag is the first 16 bytes of HMAC-SHA256(key, sequence number | message), so a message
altered, replayed, reordered or dropped on the way is refused (:class:`IntegrityError`), and
a recorded session replays nowhere (fresh nonces). Tokens shorter than ``credentials.MIN_TOKEN_BYTES``
are refused: a recorded handshake lets a short one be guessed offline.

With TLS (``tls=TlsConfig(...)``, ``links.tls``) all of this runs inside the TLS channel:
the cloud's certificate is checked by the end (and, optionally, the end's by the cloud)
before the token is proved; the tags stay (one code path, and the token binds the session).

A peer without the token is refused and logged (``logging`` channel ``coach_fx.runtime``).
The cloud binds to the address it is given (``127.0.0.1`` by default), never to every
interface unless asked to. :class:`TcpServer` listens and authenticates (within a deadline
for the whole handshake); ``runtime.server.CloudServer`` serves many ends on it at once;
:func:`connect` dials (with retries until its timeout).

Example::

    >>> server = TcpServer("127.0.0.1", 0, token=secret)          # doctest: +SKIP
    >>> end = connect("127.0.0.1", server.port, token=secret)      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable

from coach_fx.runtime.links.base import (MAX_MESSAGE, LinkError, LinkTimeout, PeerGone, RealClock,
                                         ThrottledLog, TokenBucket)
from coach_fx.runtime.links.credentials import AuthError, shared_token
from coach_fx.runtime.links.tls import TlsConfig
from coach_fx.runtime.traces import Trace

log = logging.getLogger("coach_fx.runtime")

HELLO = b"COCHAUTH"
#: What a server that takes no more ends sends, in place of ``HELLO`` / ``STARTTLS`` before
#: authentication or of ``ADMITTED`` after it, before closing.
BUSY = b"COCHBUSY"
#: A TLS listener's first bytes, in the clear: TLS follows.
STARTTLS = b"COCHTLS3"
#: The last bytes of a handshake: the end has a session.
ADMITTED = b"COCHOKAY"
#: 3: the cloud's verdict after the proofs, and the clear preamble before TLS
AUTH_VERSION = 3
_LEN = struct.Struct("<Q")
_SEQ = struct.Struct("<Q")
#: Bytes of the integrity tag after each message.
TAG_BYTES = 16
class ServerBusy(LinkError):
    """The cloud serves as many ends (or handshakes) as it takes: try again later."""


class IntegrityError(LinkError):
    """A message's tag does not match: altered, replayed, reordered or dropped on the way."""


def _mac(token: bytes, who: bytes, nonce_c: bytes, nonce_e: bytes) -> bytes:
    return hmac.new(token, who + nonce_c + nonce_e, hashlib.sha256).digest()


def _session_keys(token: bytes, nonce_c: bytes, nonce_e: bytes, side: str) -> tuple[bytes, bytes]:
    """(this side's sending key, its receiving key)."""
    up, down = _mac(token, b"up", nonce_c, nonce_e), _mac(token, b"down", nonce_c, nonce_e)
    return (up, down) if side == "end" else (down, up)


#: A message up to this long goes out with its length and tag in one send (copying it costs
#: less than two more system calls); a longer one is sent as it is.
COALESCE_BYTES = 64 << 10

#: A message's bytes are reserved at most this many at a time: a length prefix alone (up to
#: ``MAX_MESSAGE``) makes this side hold no more than the peer has actually sent.
RECV_CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes; with a ``deadline`` (``time.monotonic``) all of them by then, however
    slowly they trickle in (``socket.timeout`` otherwise)."""
    return _recv_counted(sock, n, deadline)[0]


def _recv_counted(sock: socket.socket, n: int, deadline: float | None = None) -> tuple[bytes, int]:
    """``_recv_exact``, and how many reads it took (1: the bytes were all there at once)."""
    buf = bytearray(min(n, RECV_CHUNK))
    got = reads = 0
    while got < n:
        if got == len(buf):   # the peer has sent all reserved so far: reserve the next chunk
            buf.extend(bytes(min(RECV_CHUNK, n - got)))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            sock.settimeout(left)
        k = sock.recv_into(memoryview(buf)[got:], len(buf) - got)
        if k == 0:
            raise PeerGone("connection closed by the peer")
        got += k
        reads += 1
    return bytes(buf), reads


class TcpEndpoint:
    """One authenticated connection; ``send``/``recv`` whole messages."""

    def __init__(self, sock: socket.socket, peer_name: str, addr: str, timeout_s: float,
                 shape: Trace | None = None, *, keys: tuple[bytes, bytes] | None = None) -> None:
        """``keys``: (sending, receiving) keys of the integrity tags (from the handshake;
        None: untagged frames, for tests of the framing alone)."""
        self.sock, self.peer_name, self.addr = sock, peer_name, addr
        self.timeout_s = timeout_s
        self.keys = keys
        self._sent = self._received = 0   # sequence numbers, one per direction
        self.bucket = TokenBucket(shape) if shape is not None else None
        self.busy_s = 0.0
        self.bytes = 0
        self.last_wire_s = 0.0
        #: when the last message's last byte arrived (``time.monotonic``); see ``Endpoint``
        self.last_arrival_s = 0.0
        #: the longest message this side accepts; a longer length prefix is refused before
        #: anything is reserved (a server sets it from its plans' largest legal request)
        self.max_message = MAX_MESSAGE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, msg: bytes | bytearray) -> float:
        t0 = time.monotonic()
        start = self.bucket.wait(len(msg)) if self.bucket else t0
        if self.bucket:
            RealClock().sleep_until(start)
        try:
            self.sock.settimeout(self.timeout_s)
            tag = self._tag(self.keys[0], self._sent, msg) if self.keys is not None else b""
            if len(msg) <= COALESCE_BYTES:   # one call (one segment) for length, message and tag
                self.sock.sendall(b"".join((_LEN.pack(len(msg)), msg, tag)))
            else:                            # no copy of a large message
                self.sock.sendall(_LEN.pack(len(msg)))
                self.sock.sendall(msg)
                self.sock.sendall(tag)
            if self.keys is not None:
                self._sent += 1
        except socket.timeout:
            raise LinkTimeout(f"the {self.peer_name} side ({self.addr}) took no data for "
                              f"{self.timeout_s} s") from None
        except OSError as e:
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone (while sending): {e}") from None
        end = self.bucket.finish() if self.bucket else time.monotonic()
        self.busy_s += end - start
        self.bytes += len(msg)
        return end - start

    def recv(self, timeout: float | None = None) -> bytes:
        try:
            self.sock.settimeout(timeout if timeout is not None else self.timeout_s)
            n = _LEN.unpack(_recv_exact(self.sock, _LEN.size))[0]
            if n > self.max_message:
                raise LinkError(f"the {self.peer_name} side ({self.addr}) announced a message of "
                                f"{n} bytes; the limit is {self.max_message}")
            self.sock.settimeout(self.timeout_s)
            t0 = time.monotonic()
            msg, reads = _recv_counted(self.sock, n)
            done = time.monotonic()
            # from the first byte after the length to the last: the message's time on the
            # wire as this side saw it (the online controller's bandwidth sample); a message
            # that was all there at once (one segment, or queued here) tells nothing: 0
            self.last_wire_s = done - t0 if reads > 1 else 0.0
            self.last_arrival_s = done
            if self.keys is not None:
                tag = _recv_exact(self.sock, TAG_BYTES)
                if not hmac.compare_digest(tag, self._tag(self.keys[1], self._received, msg)):
                    raise IntegrityError(f"a message from the {self.peer_name} side ({self.addr}) "
                                         "failed its integrity check: altered, replayed or out of order")
                self._received += 1
            return msg
        except socket.timeout:
            raise LinkTimeout(f"nothing from the {self.peer_name} side ({self.addr}) within "
                              f"{timeout if timeout is not None else self.timeout_s} s") from None
        except PeerGone as e:
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone: {e}") from None
        except OSError as e:
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone: {e}") from None

    @staticmethod
    def _tag(key: bytes, seq: int, msg: bytes | bytearray) -> bytes:
        h = hmac.new(key, _SEQ.pack(seq), hashlib.sha256)
        h.update(msg)
        return h.digest()[:TAG_BYTES]

    def ready(self) -> bool:
        """Unknown without reading the socket: a lone worker does not batch over this link (a
        ``CloudServer`` batches across its ends instead)."""
        return False

    def poll(self, timeout: float) -> bool:
        """Whether bytes of a message are waiting (within ``timeout`` s), without reading any."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            return bool(select.select([self.sock], [], [], timeout)[0])
        except (OSError, ValueError):   # closed meanwhile: the next recv says so
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """After a fault: just close the socket."""
        self.close()


class TcpServer:
    """The cloud's listening socket, bound to the given address only.

    :meth:`accept` takes the next end that proves it holds the token, one at a time;
    ``runtime.server.CloudServer`` instead takes raw connections (:meth:`accept_connection`)
    and runs each :meth:`handshake` on its own thread, so that no connection can hold up
    another.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: bytes | str | None = None,
                 timeout_s: float = 30.0, tls: TlsConfig | None = None) -> None:
        self.token = shared_token(token)
        self.timeout_s = timeout_s
        self.tls = tls.server_context() if tls is not None else None
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self.sock.getsockname()[:2]
        self.refused = 0
        self._log = ThrottledLog(log, f"coach cloud {self.host}:{self.port}")

    def accept_connection(self, timeout: float | None = None) -> tuple[socket.socket, str]:
        """The next TCP connection, not yet authenticated: (its socket, "host:port")."""
        self.sock.settimeout(timeout)
        try:
            conn, addr = self.sock.accept()
        except socket.timeout:
            raise LinkTimeout(f"no end connected to {self.host}:{self.port} within {timeout} s") from None
        return conn, f"{addr[0]}:{addr[1]}"

    def handshake(self, conn: socket.socket, peer: str, within_s: float = 10.0,
                  admit: "Callable[[], bool]" = lambda: True) -> TcpEndpoint:
        """Authenticate ``conn`` both ways within ``within_s`` in all, then ask ``admit()``
        whether the end gets a session: it is told ``ADMITTED``, or ``BUSY`` (then
        :class:`ServerBusy` here too, the socket closed). A peer that cannot authenticate is
        refused (:class:`AuthError`; the socket closed, the refusal counted and logged)."""
        deadline = time.monotonic() + within_s
        # the whole handshake, TLS included, ends at the deadline: a watchdog shuts the socket
        # (a TLS handshake's own timeouts are per read, so a trickle could stretch it)
        watchdog = _Watchdog(conn, within_s)
        try:
            conn.settimeout(within_s)
            if self.tls is not None:
                conn.sendall(STARTTLS)
                conn = self.tls.wrap_socket(conn, server_side=True)
            nonce_c = os.urandom(32)
            conn.sendall(HELLO + struct.pack("<H", AUTH_VERSION) + nonce_c)
            nonce_e = _recv_exact(conn, 32, deadline)
            conn.sendall(_mac(self.token, b"cloud", nonce_c, nonce_e))    # the cloud proves first
            proof = _recv_exact(conn, 32, deadline)
            if not hmac.compare_digest(proof, _mac(self.token, b"end", nonce_c, nonce_e)):
                raise AuthError("bad token")
            admitted = admit()
            conn.sendall(ADMITTED if admitted else BUSY)
        except (AuthError, OSError, PeerGone) as e:
            self.refused += 1
            late = isinstance(e, socket.timeout) or time.monotonic() >= deadline
            why = "no handshake in time" if late else str(e) or type(e).__name__
            self._log.warning(f"refused peer {peer}: {why}")
            watchdog.cancel()
            conn.close()
            raise AuthError(f"refused peer {peer}: {why}") from None
        watchdog.cancel()
        if not admitted:
            _close(conn)
            raise ServerBusy(f"turned away {peer} after its handshake: the server filled meanwhile")
        return TcpEndpoint(conn, "end", peer, self.timeout_s,
                           keys=_session_keys(self.token, nonce_c, nonce_e, "cloud"))

    def accept(self, timeout: float | None = None) -> TcpEndpoint:
        """The next end that proves it holds the token (others are refused and logged)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.01, deadline - time.monotonic())
            conn, peer = self.accept_connection(left)
            try:
                return self.handshake(conn, peer, min(self.timeout_s, 10.0))
            except AuthError:
                if deadline is not None and time.monotonic() > deadline:
                    raise LinkTimeout(f"no authenticated end within {timeout} s") from None

    @staticmethod
    def turn_away(conn: socket.socket) -> None:
        """Tell a connection that has not started its handshake that the server is busy
        (:class:`ServerBusy` at its end, TLS or not: this comes before TLS) and close it."""
        try:
            conn.settimeout(0.5)
            conn.sendall(BUSY)
        except OSError:
            pass
        _close(conn)

    def close(self) -> None:
        self.sock.close()


def _close(conn: socket.socket) -> None:
    """Close after what was sent has gone: shut down the sending side first, so that the peer
    reads the last bytes (a close with unread input would reset the connection instead)."""
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


class _Watchdog:
    """Shuts a connection down (waking the thread blocked reading it) at a deadline unless
    cancelled first. It holds a duplicate of the descriptor: wrapping the socket in TLS
    detaches the original object, and the duplicate can never name another connection."""

    def __init__(self, conn: socket.socket, after_s: float) -> None:
        self._sock = conn.dup()
        self._lock = threading.Lock()
        self._timer = threading.Timer(after_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sock.close()
            self._sock = None


def connect(host: str, port: int, token: bytes | str | None = None, timeout_s: float = 30.0,
            shape: Trace | None = None, retry_for: float = 0.0,
            tls: TlsConfig | None = None, source: str | None = None) -> TcpEndpoint:
    """Dial the cloud and authenticate both ways; for ``retry_for`` s retry a refused
    connection, and a cloud that says it is busy (after a short, growing, jittered pause: ends
    that dial together do not retry together). With ``tls`` the cloud's certificate is checked
    first (``ssl.SSLError`` if it fails). ``source``: the local address to dial from (a host
    with several)."""
    key = shared_token(token)
    ctx = tls.client_context() if tls is not None else None
    deadline = time.monotonic() + retry_for
    pause = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(timeout_s, 10.0),
                                            source_address=(source, 0) if source else None)
        except OSError as e:
            if time.monotonic() >= deadline:
                raise PeerGone(f"cannot reach the cloud at {host}:{port}: {e}") from None
        else:
            try:
                return _authenticate(sock, host, port, key, ctx, tls, timeout_s, shape)
            except ServerBusy:
                if time.monotonic() >= deadline:
                    raise
        time.sleep(min(pause * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, 1.0)


def _authenticate(sock: socket.socket, host: str, port: int, key: bytes, ctx: "ssl.SSLContext | None",
                  tls: TlsConfig | None, timeout_s: float, shape: Trace | None) -> TcpEndpoint:
    """The end's side of the handshake on a connected ``sock`` (see the module docstring)."""
    busy = f"the cloud at {host}:{port} serves as many ends as it takes; try later"
    try:
        if ctx is not None:   # the clear preamble first: a busy server says so before TLS
            first = _recv_exact(sock, len(STARTTLS))
            if first == BUSY:
                raise ServerBusy(busy)
            if first != STARTTLS:
                raise AuthError(f"{host}:{port} does not speak TLS (or is not a coach cloud of this version)")
            sock = ctx.wrap_socket(sock, server_hostname=tls.server_name or host)
        hello = _recv_exact(sock, len(HELLO))
        if hello == BUSY:
            raise ServerBusy(busy)
        if hello == STARTTLS:
            raise AuthError(f"the cloud at {host}:{port} requires TLS (give this end tls=TlsConfig(...))")
        hello += _recv_exact(sock, 2 + 32)
        if hello[:len(HELLO)] != HELLO:
            raise AuthError(f"{host}:{port} is not a coach cloud")
        version = struct.unpack("<H", hello[len(HELLO):len(HELLO) + 2])[0]
        if version != AUTH_VERSION:
            raise AuthError(f"cloud speaks handshake version {version}, this end {AUTH_VERSION}")
        nonce_c = hello[-32:]
        nonce_e = os.urandom(32)
        sock.sendall(nonce_e)
        proof = _recv_exact(sock, 32)
        if not hmac.compare_digest(proof, _mac(key, b"cloud", nonce_c, nonce_e)):
            # this end proves nothing to a server that could not prove itself
            raise AuthError(f"the cloud at {host}:{port} does not hold this end's token")
        sock.sendall(_mac(key, b"end", nonce_c, nonce_e))
        verdict = _recv_exact(sock, len(ADMITTED))
        if verdict == BUSY:
            raise ServerBusy(busy)
        if verdict != ADMITTED:
            raise AuthError(f"the cloud at {host}:{port} ended its handshake with {verdict!r}")
    except PeerGone:
        sock.close()
        raise AuthError(f"the cloud at {host}:{port} refused this end (wrong token?)") from None
    except socket.timeout:
        sock.close()
        raise AuthError(f"no handshake from {host}:{port} within the timeout") from None
    except ssl.SSLError as e:
        sock.close()
        raise AuthError(f"TLS with the cloud at {host}:{port} failed: {e}") from None
    except (AuthError, ServerBusy):
        sock.close()
        raise
    return TcpEndpoint(sock, "cloud", f"{host}:{port}", timeout_s, shape,
                       keys=_session_keys(key, nonce_c, nonce_e, "end"))
