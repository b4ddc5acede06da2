"""TCP framing: a length prefix reserves nothing the peer has not sent."""
import socket
import struct
import threading
import tracemalloc

import pytest

from coach_fx.runtime.links.base import MAX_MESSAGE, LinkError, PeerGone
from coach_fx.runtime.links.tcp import RECV_CHUNK, TcpEndpoint


def pair(timeout_s=5.0):
    """(an endpoint, the raw socket of its peer) over loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        peer = socket.create_connection(srv.getsockname())
        mine, _ = srv.accept()
    return TcpEndpoint(mine, "end", "test", timeout_s), peer


def test_a_huge_announced_length_reserves_only_what_arrives():
    ep, peer = pair()
    peer.sendall(struct.pack("<Q", MAX_MESSAGE) + b"x" * 1000)
    peer.close()
    tracemalloc.start()
    try:
        with pytest.raises(PeerGone):
            ep.recv()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * RECV_CHUNK        # not the announced GiB


def test_over_the_limit_is_refused_before_reading():
    ep, peer = pair()
    peer.sendall(struct.pack("<Q", MAX_MESSAGE + 1))
    with pytest.raises(LinkError, match="announced"):
        ep.recv()


def test_messages_across_chunks_arrive_whole():
    ep, peer = pair()
    big = bytes(range(256)) * (3 * RECV_CHUNK // 256 + 7)
    t = threading.Thread(target=lambda: peer.sendall(struct.pack("<Q", len(big)) + big + struct.pack("<Q", 3) + b"abc"))
    t.start()
    assert ep.recv() == big and ep.recv() == b"abc"
    t.join()


def test_a_storm_of_warnings_is_throttled():
    import logging
    from coach_fx.runtime.links.base import ThrottledLog
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("coach_fx.test_throttle")
    logger.addHandler(Keep())
    t = ThrottledLog(logger, "cloud", burst=5, window_s=3600)
    for k in range(100):
        t.warning(f"refused peer {k}")
    assert len(records) == 5 and t.suppressed == 95
