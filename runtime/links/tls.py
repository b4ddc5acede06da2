"""TLS for the TCP link, from the standard ``ssl`` module: the cloud presents a certificate,
the end checks it against a CA (or the cloud's own self-signed certificate); optionally the
cloud asks each end for a client certificate. The shared token stays the application
credential on top (see ``links.tcp``), so an end needs both.

Example::

    >>> cloud_tls = TlsConfig(cert="cloud.pem", key="cloud.key")               # doctest: +SKIP
    >>> end_tls = TlsConfig(ca="cloud.pem")                                     # doctest: +SKIP
    >>> server = TcpServer("0.0.0.0", 29517, token=secret, tls=cloud_tls)      # doctest: +SKIP
    >>> ep = connect("cloud.example", 29517, token=secret, tls=end_tls)        # doctest: +SKIP

A self-signed pair for a test or a private deployment::

    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \\
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout cloud.key -out cloud.pem
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsError(ValueError):
    """A TLS setting that cannot work (a missing or unreadable file, a cert without its key)."""


@dataclass(frozen=True)
class TlsConfig:
    """One side's TLS files (PEM).

    On the cloud: ``cert`` and ``key`` (required); ``ca``: ask every end for a client
    certificate signed by it. On an end: ``ca`` (the CA or the cloud's self-signed
    certificate; None: the system's trusted CAs); ``cert``/``key``: this end's client
    certificate; ``server_name``: the name to check the cloud's certificate against (default:
    the host dialled).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsError("a TLS certificate needs its key and a key its certificate "
                           f"(cert={self.cert!r}, key={self.key!r})")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise TlsError(f"TLS {name} file {path} does not exist")

    def server_context(self) -> ssl.SSLContext:
        """The cloud's context: its certificate; client certificates required when ``ca``."""
        if self.cert is None:
            raise TlsError("the cloud's TLS needs a certificate and its key (--tls-cert, --tls-key)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        if self.ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """An end's context: the cloud's certificate checked (name included), always."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        if self.cert is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as e:
                raise TlsError(f"cannot load the TLS certificate {self.cert} with key {self.key}: {e}") from None


__all__ = ["TlsConfig", "TlsError"]
