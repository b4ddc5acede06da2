"""The TCP link's handshake and per-message integrity, against a proxy and a fake server."""
import socket
import threading

import pytest

from coach_fx.runtime.links.tcp import (ADMITTED, AUTH_VERSION, HELLO, AuthError, IntegrityError, TcpServer,
                                        connect)

TOKEN = b"0123456789abcdef-test-token"
#: bytes each way before the first message: cloud -> end hello + proof + verdict, end -> cloud
#: nonce + proof
HANDSHAKE_DOWN, HANDSHAKE_UP = len(HELLO) + 2 + 32 + 32 + len(ADMITTED), 32 + 32


def pair_through(proxy_edit):
    """(end, cloud) endpoints joined through a proxy whose end -> cloud bytes pass through
    ``proxy_edit(bytes so far, chunk) -> chunk``."""
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5)
    front = socket.create_server(("127.0.0.1", 0))
    got = {}

    def accept():
        got["cloud"] = server.accept(timeout=10)

    def relay(src, dst, edit):
        seen = 0
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out = edit(seen, chunk) if edit else chunk
            seen += len(chunk)
            try:
                dst.sendall(out)
            except OSError:
                break
        dst.close()

    def proxy():
        client, _ = front.accept()
        upstream = socket.create_connection(("127.0.0.1", server.port))
        threading.Thread(target=relay, args=(client, upstream, proxy_edit), daemon=True).start()
        threading.Thread(target=relay, args=(upstream, client, None), daemon=True).start()

    threads = [threading.Thread(target=accept), threading.Thread(target=proxy)]
    for t in threads:
        t.start()
    end = connect("127.0.0.1", front.getsockname()[1], token=TOKEN, timeout_s=5)
    for t in threads:
        t.join(10)
    front.close()
    return end, got["cloud"], server


def test_messages_pass_through_an_honest_proxy():
    end, cloud, server = pair_through(None)
    for k in range(3):
        end.send(b"request %d" % k)
        assert cloud.recv(5) == b"request %d" % k
    cloud.send(b"result")
    assert end.recv(5) == b"result"
    server.close()


def test_an_altered_message_is_refused():
    def flip(seen, chunk):   # one bit inside the first message's body
        at = HANDSHAKE_UP + 8 + 3 - seen
        if 0 <= at < len(chunk):
            chunk = chunk[:at] + bytes([chunk[at] ^ 1]) + chunk[at + 1:]
        return chunk
    end, cloud, server = pair_through(flip)
    end.send(b"an honest request")
    with pytest.raises(IntegrityError, match="integrity"):
        cloud.recv(5)
    server.close()


def test_a_replayed_message_is_refused():
    state = {"stream": b"", "sent": 0, "done": False}

    def replay(seen, chunk):
        """The first whole frame after the handshake (length, message, tag) goes twice; bytes
        after the handshake are held until it is whole, however TCP splits them."""
        if state["done"]:
            return chunk
        state["stream"] += chunk
        s, a = state["stream"], HANDSHAKE_UP
        if len(s) >= a + 8:
            b = a + 8 + int.from_bytes(s[a:a + 8], "little") + 16
            if len(s) >= b:
                state["done"] = True
                return s[state["sent"]:b] + s[a:b] + s[b:]
        release = max(state["sent"], min(len(s), a))
        out, state["sent"] = s[state["sent"]:release], release
        return out
    end, cloud, server = pair_through(replay)
    end.send(b"pay once")
    assert cloud.recv(5) == b"pay once"
    with pytest.raises(IntegrityError):
        cloud.recv(5)
    server.close()


def test_the_end_proves_nothing_to_a_server_that_cannot_prove_itself():
    fake = socket.create_server(("127.0.0.1", 0))
    heard = []

    def impostor():
        conn, _ = fake.accept()
        conn.sendall(HELLO + AUTH_VERSION.to_bytes(2, "little") + b"n" * 32)
        heard.append(conn.recv(64))          # the end's nonce
        conn.sendall(b"\0" * 32)             # a proof it cannot make
        conn.settimeout(5)
        rest = b""
        try:
            while chunk := conn.recv(64):
                rest += chunk
        except OSError:
            pass
        heard.append(rest)
        conn.close()

    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(AuthError, match="does not hold this end's token"):
        connect("127.0.0.1", fake.getsockname()[1], token=TOKEN, timeout_s=5)
    t.join(10)
    fake.close()
    assert len(heard[0]) == 32 and heard[1] == b""   # a nonce, and never a proof


def test_short_tokens_are_refused():
    with pytest.raises(AuthError, match="at least 16"):
        TcpServer("127.0.0.1", 0, token="short")
    with pytest.raises(AuthError, match="at least 16"):
        connect("127.0.0.1", 1, token=b"x")
