"""A load generator: many ends that replay recorded, valid request messages to a cloud server,
so that tests and benchmarks can put dozens of ends on one machine for little CPU (no end
half runs: the messages were made once by the real end half, ``record``).

Each generated end dials with the token (and TLS), keeps at most ``LoadSpec.inflight``
requests unanswered, sends at ``rate_hz`` (None: as fast as replies allow) and closes its
session when done. Only the request id in the message header changes per request (the
checksum covers what follows the header), so every message stays one a real end would send.

Example::

    >>> msgs = record(cm, frames)                                              # doctest: +SKIP
    >>> report = run_load(server.address, token, msgs, LoadSpec(ends=16, requests=50))  # doctest: +SKIP
    >>> report.throughput, report.p95_s                                         # doctest: +SKIP
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from coach_fx.runtime.codec import payload_to_entries
from coach_fx.runtime.links.tcp import connect
from coach_fx.runtime.links.tls import TlsConfig
from coach_fx.runtime.wire import CLOSE_ID, FLAG_CONTROL, FLAG_ERROR, decode, encode

_REQUEST_ID = struct.Struct("<Q")
_REQUEST_ID_AT = 8   # magic (4), version (2), flags (2), then the request id


@dataclass(frozen=True)
class LoadSpec:
    """``ends`` generated ends, each sending ``requests`` requests at ``rate_hz`` (None: as
    fast as replies allow) with at most ``inflight`` unanswered."""

    ends: int = 8
    requests: int = 50
    rate_hz: float | None = None
    inflight: int = 4
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.ends < 1 or self.requests < 1 or self.inflight < 1:
            raise ValueError(f"ends, requests and inflight must be >= 1, got {self.ends}, "
                             f"{self.requests}, {self.inflight}")
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")


@dataclass
class EndRecord:
    """What one generated end got: its replies by request id, in arrival order, and each
    request's latency (send to reply)."""

    replies: list[tuple[int, bytes]] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0          # error replies (the request failed in the cloud)
    failure: str | None = None


@dataclass
class LoadReport:
    """All generated ends' records, and the seconds from the first send to the last reply."""

    ends: list[EndRecord]
    elapsed_s: float

    @property
    def answered(self) -> int:
        return sum(len(e.replies) for e in self.ends)

    @property
    def throughput(self) -> float:
        """Replies per second, all ends together."""
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def quantile_s(self, q: float) -> float:
        lat = sorted(t for e in self.ends for t in e.latencies_s)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    @property
    def p95_s(self) -> float:
        return self.quantile_s(0.95)


def record(target: Any, frames: Sequence[tuple], plan_id: int = 0) -> list[bytes]:
    """The request messages a real end sends for ``frames`` through ``target``'s end half
    (a :class:`~coach_fx.compiled.CompiledModel`), numbered from 0."""
    out = []
    with torch.no_grad():
        for k, x in enumerate(frames):
            payload = target.end_module(*x)
            payload = payload if isinstance(payload, tuple) else (payload,)
            out.append(bytes(encode(k, payload_to_entries(target.boundary, payload), plan_id=plan_id)))
    return out


def with_request_id(msg: bytes, req: int) -> bytes:
    """``msg`` with request id ``req`` (the checksum does not cover the header)."""
    m = bytearray(msg)
    _REQUEST_ID.pack_into(m, _REQUEST_ID_AT, req)
    return bytes(m)


def _one_end(address: tuple[str, int], token: bytes | str | None, tls: TlsConfig | None,
             messages: Sequence[bytes], spec: LoadSpec, rec: EndRecord) -> None:
    # a server turns away handshakes beyond its share per address: ends that start together retry
    ep = connect(address[0], address[1], token, spec.timeout_s, tls=tls, retry_for=spec.timeout_s)
    sent: dict[int, float] = {}
    room = threading.Semaphore(spec.inflight)

    def receive() -> None:
        while len(rec.replies) + rec.errors < spec.requests:
            msg = ep.recv(spec.timeout_s)
            req, _, flags, _ = decode(msg)
            if flags & FLAG_ERROR:
                rec.errors += 1
            else:
                rec.replies.append((req, bytes(msg)))
                rec.latencies_s.append(time.perf_counter() - sent.pop(req))
            room.release()

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    try:
        start = time.perf_counter()
        for k in range(spec.requests):
            if spec.rate_hz is not None:
                time.sleep(max(0.0, start + k / spec.rate_hz - time.perf_counter()))
            if not room.acquire(timeout=spec.timeout_s):
                raise TimeoutError(f"no reply for {spec.timeout_s} s")
            sent[k] = time.perf_counter()
            ep.send(with_request_id(messages[k % len(messages)], k))
        reader.join(spec.timeout_s)
        ep.send(encode(CLOSE_ID, [], FLAG_CONTROL))
        while not decode(ep.recv(spec.timeout_s))[2] & FLAG_CONTROL:   # the close's acknowledgement
            pass
    finally:
        ep.close()


def run_load(address: tuple[str, int], token: bytes | str | None, messages: Sequence[bytes],
             spec: LoadSpec, tls: TlsConfig | None = None) -> LoadReport:
    """Run ``spec.ends`` generated ends against the server at ``address`` at once."""
    if not messages:
        raise ValueError("run_load needs at least one recorded message (record(cm, frames))")
    records = [EndRecord() for _ in range(spec.ends)]

    def run(rec: EndRecord) -> None:
        try:
            _one_end(address, token, tls, messages, spec, rec)
        except Exception as e:  # noqa: BLE001 - reported per end
            rec.failure = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in records]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadReport(records, time.perf_counter() - t0)


__all__ = ["EndRecord", "LoadReport", "LoadSpec", "record", "run_load", "with_request_id"]
