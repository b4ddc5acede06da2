"""TLS on the TCP link: the end checks the cloud's certificate, the cloud may ask for the end's,
and the token is still needed inside the channel."""
import shutil
import subprocess
import threading

import pytest

from coach_fx.runtime.links.tcp import AuthError, TcpServer, connect
from coach_fx.runtime.links.tls import TlsConfig, TlsError

TOKEN = b"0123456789abcdef-test-token"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def self_signed(d, name):
    """A self-signed certificate for localhost / 127.0.0.1 (its own CA)."""
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return {name: self_signed(d, name) for name in ("cloud", "other", "end")}


def serve_one(server):
    """Accept one end on a thread; the result holds its endpoint or the error."""
    got = {}

    def run():
        try:
            got["cloud"] = server.accept(timeout=10)
        except Exception as e:  # noqa: BLE001
            got["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, got


def test_a_tls_end_is_served_and_messages_cross(certs):
    cert, key = certs["cloud"]
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5, tls=TlsConfig(cert=cert, key=key))
    t, got = serve_one(server)
    end = connect("127.0.0.1", server.port, TOKEN, 5, tls=TlsConfig(ca=cert))
    t.join(10)
    try:
        end.send(b"request")
        assert got["cloud"].recv(5) == b"request"
        got["cloud"].send(b"x" * 300_000)             # more than one TLS record
        assert end.recv(5) == b"x" * 300_000
    finally:
        end.close()
        got["cloud"].close()
        server.close()


def test_an_end_refuses_a_cloud_whose_certificate_it_does_not_trust(certs):
    cert, key = certs["cloud"]
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5, tls=TlsConfig(cert=cert, key=key))
    t, got = serve_one(server)
    try:
        with pytest.raises(AuthError, match="TLS"):
            connect("127.0.0.1", server.port, TOKEN, 5, tls=TlsConfig(ca=certs["other"][0]))
        with pytest.raises(AuthError, match="TLS"):                 # the name must match too
            connect("127.0.0.1", server.port, TOKEN, 5,
                    tls=TlsConfig(ca=cert, server_name="cloud.example"))
    finally:
        server.close()
        t.join(15)


def test_a_plain_end_gets_nothing_from_a_tls_cloud(certs):
    cert, key = certs["cloud"]
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5, tls=TlsConfig(cert=cert, key=key))
    t, got = serve_one(server)
    try:
        with pytest.raises(AuthError):
            connect("127.0.0.1", server.port, TOKEN, 3)
    finally:
        server.close()
        t.join(15)
    assert server.refused >= 1


def test_client_certificates_when_the_cloud_asks_for_them(certs):
    cert, key = certs["cloud"]
    end_cert, end_key = certs["end"]
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5,
                       tls=TlsConfig(cert=cert, key=key, ca=end_cert))
    t, got = serve_one(server)
    with pytest.raises(AuthError):                                  # no client certificate
        connect("127.0.0.1", server.port, TOKEN, 5, tls=TlsConfig(ca=cert))
    end = connect("127.0.0.1", server.port, TOKEN, 5, tls=TlsConfig(ca=cert, cert=end_cert, key=end_key))
    t.join(15)
    try:
        end.send(b"hello")
        assert got["cloud"].recv(5) == b"hello"
    finally:
        end.close()
        got["cloud"].close()
        server.close()


def test_the_token_is_still_required_inside_tls(certs):
    cert, key = certs["cloud"]
    server = TcpServer("127.0.0.1", 0, token=TOKEN, timeout_s=5, tls=TlsConfig(cert=cert, key=key))
    t, got = serve_one(server)
    try:
        with pytest.raises(AuthError, match="does not hold"):
            connect("127.0.0.1", server.port, b"another-token-of-16+bytes", 5, tls=TlsConfig(ca=cert))
    finally:
        server.close()
        t.join(15)


def test_bad_settings_are_named(tmp_path, certs):
    with pytest.raises(TlsError, match="needs its key"):
        TlsConfig(cert=certs["cloud"][0])
    with pytest.raises(TlsError, match="does not exist"):
        TlsConfig(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(TlsError, match="needs a certificate"):
        TlsConfig(ca=certs["cloud"][0]).server_context()
    with pytest.raises(TlsError, match="cannot load"):
        TlsConfig(cert=certs["cloud"][0], key=certs["other"][1]).server_context()
