"""The cloud server shared by many ends over real loopback TCP: outcomes (counts, equality,
order), never durations."""

import socket
import struct
import threading
import time

import pytest
import torch

import coach_fx
from coach_fx.runtime.config import Batching, ServerConfig, StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.links.base import LinkError
from coach_fx.runtime.links.tcp import ServerBusy, TcpServer, connect
from coach_fx.runtime.policy import StaticPolicy
from coach_fx.runtime.server import CloudServer

TOKEN = b"a shared secret for the test"



@pytest.fixture(scope="module")
def split(stem_head_split):
    return stem_head_split


def serve(cm, limits=ServerConfig(), sessions=None, config=StreamConfig(timeout_s=10), listener=None):
    listener = listener or TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=10)
    server = CloudServer({0: (cm.cloud_module, cm.boundary)}, listener, config,
                         limits, sessions=sessions).start()
    return server, listener


def shut(server, listener, *socks):
    for s in socks:
        s.close()
    server.stop()
    listener.close()


def until(cond, tries=100):
    """Poll ``cond`` (work done by the server's threads) a bounded number of times."""
    for _ in range(tries):
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def stream(cm, port, frames):
    end = EndWorker(connect("127.0.0.1", port, TOKEN, 10.0), cm.out_spec,
                    StaticPolicy(cm.end_module, cm.boundary), StreamConfig(timeout_s=10))
    try:
        results, _ = end.run(frames)
    finally:
        end.close()
    return results


def expect(m, frames, results):
    assert len(results) == len(frames)
    with torch.no_grad():
        for f, r in zip(frames, results):
            assert torch.allclose(r, m(f), atol=1e-2)


def test_many_ends_at_once_and_an_end_closing_stops_only_its_session(split):
    cm, m = split
    server, listener = serve(cm, sessions=3)
    frames = {k: [torch.randn(1, 3, 8, 8) for _ in range(40)] for k in range(3)}
    got: dict[int, list] = {}
    ends = [threading.Thread(target=lambda k=k: got.__setitem__(k, stream(cm, listener.port, frames[k])))
            for k in (0, 1)]
    for t in ends:
        t.start()
    for t in ends:
        t.join(120)
    # both sessions closed by their ends: the server still takes the next
    got[2] = stream(cm, listener.port, frames[2])
    assert server.wait(60)
    listener.close()
    for k in range(3):
        expect(m, frames[k], got[k])       # each end its own answers, exactly once, in order
    st = server.snapshot()
    assert (st.sessions, st.ended, st.served, st.active) == (3, 3, 120, 0)


def dial_from(source, port):
    """A raw TCP connection from another loopback address (127/8 is all ours): another peer."""
    return socket.create_connection(("127.0.0.1", port), source_address=(source, 0))


def test_silent_and_idle_connections_do_not_lock_out_a_real_end(split):
    cm, m = split
    server, listener = serve(cm, ServerConfig(handshake_s=60, max_per_peer=32))
    silent = dial_from("127.0.0.3", listener.port)
    idle = [dial_from("127.0.0.2", listener.port) for _ in range(200)]
    try:
        # one peer holds at most 8 handshakes: the other 192 are turned away at once
        assert until(lambda: server.snapshot().turned_away == 192)
        frames = [torch.randn(1, 3, 8, 8) for _ in range(30)]
        expect(m, frames, stream(cm, listener.port, frames))
        st = server.snapshot()
        # 9 connections still wait for their handshake deadline while the real end was served
        assert st.sessions == 1 and st.served == 30 and st.refused == 0 and st.turned_away == 192
        assert server._handshaking == {"127.0.0.2": 8, "127.0.0.3": 1}
    finally:
        shut(server, listener, silent, *idle)


def test_sixteen_addresses_of_idle_sockets_leave_handshake_places_for_a_real_end(split):
    """512 idle sockets from 16 addresses: each address holds at most 8 handshakes (128 of the
    256 places); the rest are turned away, and a real end from a 17th address is served."""
    cm, m = split
    server, listener = serve(cm, ServerConfig(handshake_s=60))
    idle = [dial_from(f"127.0.1.{a}", listener.port) for a in range(1, 17) for _ in range(32)]
    try:
        assert until(lambda: server.snapshot().turned_away == 512 - 16 * 8, tries=400)
        frames = [torch.randn(1, 3, 8, 8) for _ in range(10)]
        expect(m, frames, stream(cm, listener.port, frames))
        assert server.snapshot().sessions == 1 and server._handshakes == 16 * 8
    finally:
        shut(server, listener, *idle)


def test_counters_by_address_keep_only_addresses_with_a_connection(split):
    cm, m = split
    server, listener = serve(cm)
    try:
        for a in range(1, 21):     # 20 addresses come, are served and go
            s = socket.create_connection(("127.0.0.1", listener.port), source_address=(f"127.0.2.{a}", 0))
            s.close()
        frames = [torch.randn(1, 3, 8, 8) for _ in range(3)]
        expect(m, frames, stream(cm, listener.port, frames))
        assert until(lambda: server.snapshot().active == 0 and server.snapshot().refused == 20)
        assert until(lambda: not server._per_peer and not server._handshaking)
    finally:
        shut(server, listener)


def test_sixteen_ends_at_once_each_get_their_own_answers_in_order(split):
    cm, m = split
    server, listener = serve(cm, sessions=16, config=StreamConfig(timeout_s=10,
                                                                   batching=Batching(16, 0.002)))
    frames = {k: [torch.randn(1, 3, 8, 8) for _ in range(25)] for k in range(16)}
    got: dict[int, list] = {}
    ends = [threading.Thread(target=lambda k=k: got.__setitem__(k, stream(cm, listener.port, frames[k])))
            for k in range(16)]
    for t in ends:
        t.start()
    for t in ends:
        t.join(180)
    assert server.wait(60)
    for k in range(16):
        expect(m, frames[k], got[k])
    st = server.snapshot()
    assert (st.sessions, st.ended, st.served, st.active) == (16, 16, 400, 0)
    assert 1 <= st.batches <= 400


def test_a_length_prefix_beyond_the_plan_s_largest_request_ends_only_that_session(split):
    cm, m = split
    server, listener = serve(cm)
    rogue = connect("127.0.0.1", listener.port, TOKEN, 10.0)
    try:
        rogue.sock.sendall(struct.pack("<Q", server.max_message + 1))   # nothing follows
        with pytest.raises(LinkError):
            rogue.recv(10)                      # the server closed the session unread
        frames = [torch.randn(1, 3, 8, 8) for _ in range(5)]
        expect(m, frames, stream(cm, listener.port, frames))
    finally:
        shut(server, listener, rogue.sock)


def test_a_trickling_handshake_is_cut_at_its_deadline(split):
    cm, _ = split
    server, listener = serve(cm, ServerConfig(handshake_s=1.0))
    s = socket.create_connection(("127.0.0.1", listener.port))
    try:
        s.recv(64)                                     # the server's hello
        s.settimeout(0.3)
        closed = False
        for _ in range(200):                           # a byte now and then, never a whole proof
            try:
                s.sendall(b"x")
                if s.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed
        assert until(lambda: server.snapshot().refused == 1)   # counted by the handshake thread
    finally:
        shut(server, listener, s)


def test_beyond_its_ends_the_server_says_busy(split):
    cm, m = split
    server, listener = serve(cm, ServerConfig(max_ends=1))
    first = connect("127.0.0.1", listener.port, TOKEN, 10.0)
    try:
        assert until(lambda: server.snapshot().active == 1)    # the first end's session has started
        with pytest.raises(ServerBusy, match="try later"):
            connect("127.0.0.1", listener.port, TOKEN, 10.0)
        assert server.snapshot().turned_away == 1
    finally:
        shut(server, listener, first)


class GatedListener(TcpServer):
    """A listener whose first handshake waits at its verdict until ``gate`` is set: the test
    fills the server meanwhile, as ends racing for the last place do."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate, self.at_verdict, self._first = threading.Event(), threading.Event(), True

    def handshake(self, conn, peer, within_s=10.0, admit=lambda: True):
        if not self._first:
            return super().handshake(conn, peer, within_s, admit)
        self._first = False

        def late():
            self.at_verdict.set()
            self.gate.wait(30)
            return admit()
        return super().handshake(conn, peer, within_s, late)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    import shutil
    import subprocess
    from coach_fx.runtime.links.tls import TlsConfig
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "c.pem", d / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return TlsConfig(cert=str(cert), key=str(key)), TlsConfig(ca=str(cert))


@pytest.mark.parametrize("with_tls", [False, True], ids=["plain", "tls"])
def test_a_server_that_fills_during_a_handshake_tells_the_end_it_is_busy(split, with_tls, request):
    cm, m = split
    server_tls, end_tls = request.getfixturevalue("tls_pair") if with_tls else (None, None)
    server, listener = serve(cm, ServerConfig(max_ends=1, handshake_s=30), listener=GatedListener(
        "127.0.0.1", 0, token=TOKEN, timeout_s=10, tls=server_tls))
    got = {}

    def racer():
        try:
            got["end"] = connect("127.0.0.1", listener.port, TOKEN, 10.0, tls=end_tls)
        except Exception as e:  # noqa: BLE001 - the outcome under test
            got["error"] = e
    t = threading.Thread(target=racer)
    t.start()
    first = None
    try:
        assert listener.at_verdict.wait(30)          # the racer has proved its token...
        first = connect("127.0.0.1", listener.port, TOKEN, 10.0, tls=end_tls)   # ...the last place goes
        assert until(lambda: server.snapshot().active == 1)
        listener.gate.set()
        t.join(30)
        assert isinstance(got.get("error"), ServerBusy), got
        assert "try later" in str(got["error"])
        # and the end that got the place is served
        end = EndWorker(first, cm.out_spec, StaticPolicy(cm.end_module, cm.boundary), StreamConfig(timeout_s=10))
        frames = [torch.randn(1, 3, 8, 8) for _ in range(5)]
        results, _ = end.run(frames)
        end.close()
        expect(m, frames, results)
        first = None
        with pytest.raises(ServerBusy):             # and a draining server says busy too, before TLS
            server._stop.set()
            connect("127.0.0.1", listener.port, TOKEN, 10.0, tls=end_tls)
        assert server.snapshot().turned_away == 2
    finally:
        listener.gate.set()
        shut(server, listener, *([first.sock] if first is not None else []))


@pytest.mark.parametrize("with_tls", [False, True], ids=["plain", "tls"])
def test_a_full_server_says_busy_before_the_handshake_with_or_without_tls(split, with_tls, request):
    cm, m = split
    server_tls, end_tls = request.getfixturevalue("tls_pair") if with_tls else (None, None)
    server, listener = serve(cm, ServerConfig(max_ends=1, evict_idle_s=600), listener=TcpServer(
        "127.0.0.1", 0, token=TOKEN, timeout_s=10, tls=server_tls))
    first = connect("127.0.0.1", listener.port, TOKEN, 10.0, tls=end_tls)
    try:
        assert until(lambda: server.snapshot().active == 1)
        with pytest.raises(ServerBusy, match="try later"):
            connect("127.0.0.1", listener.port, TOKEN, 10.0, tls=end_tls)
        assert server.snapshot().turned_away == 1 and server.snapshot().refused == 0
    finally:
        shut(server, listener, first.sock)


def test_a_new_end_takes_the_place_of_the_session_idle_longest(split):
    cm, m = split
    server, listener = serve(cm, ServerConfig(max_ends=2, evict_idle_s=0.3))
    idle = [connect("127.0.0.1", listener.port, TOKEN, 10.0) for _ in range(2)]
    try:
        assert until(lambda: server.snapshot().active == 2)
        time.sleep(0.5)   # the input: both sessions idle past evict_idle_s (not a wait for a thread)
        frames = [torch.randn(1, 3, 8, 8) for _ in range(10)]
        expect(m, frames, stream(cm, listener.port, frames))      # admitted, served
        assert until(lambda: server.snapshot().ended >= 2)
        st = server.snapshot()
        assert st.sessions == 3 and st.turned_away == 0
        gone = 0
        for ep in idle:   # the one that gave its place was closed by the server
            try:
                ep.sock.settimeout(5)
                gone += ep.sock.recv(1) == b""
            except OSError:
                gone += 1
        assert gone >= 1
    finally:
        shut(server, listener, *(ep.sock for ep in idle))


@pytest.fixture(scope="module")
def signed_plan(split, tmp_path_factory):
    cm, m = split
    d = tmp_path_factory.mktemp("plan")
    cm.save(d, whole=True, key=TOKEN)
    return d


def test_serve_api_over_tls_then_drain_answers_what_was_read(split, signed_plan, tmp_path):
    """coach_fx.serve with TLS; drain mid-stream: every request gets exactly one answer, in
    order (the end finishes on its device what the server no longer takes)."""
    import shutil
    import subprocess
    from coach_fx.runtime.links.tls import TlsConfig
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    cm, m = split
    server = coach_fx.serve(signed_plan, port=0, token=TOKEN,
                            tls=TlsConfig(cert=str(cert), key=str(key)))
    host, port = server.address
    frames = [torch.randn(1, 3, 8, 8) for _ in range(300)]

    def camera():
        yield from ((f,) for f in frames)

    end = EndWorker(connect(host, port, TOKEN, 10.0, tls=TlsConfig(ca=str(cert))), cm.out_spec,
                    StaticPolicy(cm.end_module, cm.boundary),
                    # a generous stall limit: this test is about the drain, and a busy host must not
                    # make the end give up on the cloud before it (its reason is in ``end.events``)
                    StreamConfig(timeout_s=120, fallback="local", retry_s=60), whole_model=m)
    got = {}

    def run():
        try:
            got["r"] = end.run(camera())
        except BaseException as e:  # noqa: BLE001 - named by the assertion below
            got["error"] = e
    t = threading.Thread(target=run)
    t.start()
    until(lambda: server.snapshot().served >= 100 or not t.is_alive(), tries=6000)
    assert server.snapshot().served >= 100, \
        f"the stream left the cloud early: {got.get('error')!r}, events {end.events}"
    assert server.drain(30)                 # everything read was answered
    t.join(120)
    assert "r" in got, f"the end failed: {got.get('error')!r}"
    results, stats = got["r"]
    expect(m, frames, results)
    st = server.snapshot()
    # every request answered once; a reply still on its way when the link closed may have been
    # superseded by the device's answer (counted on both sides, delivered once)
    assert st.served >= 100 and st.served + stats.outcomes.fell_back >= 300 and st.active == 0
