"""The gloo link: torch.distributed **gloo** point-to-point between an end process and a cloud
process over TCP. A message is a fixed header (its length) then a payload buffer sized from
it, each direction in its own process group. Optional shaping: a token bucket in the sender
that follows a trace (it paces each message to the trace's rate).

Example::

    >>> cloud = GlooEndpoint("cloud", "127.0.0.1", 29500)   # doctest: +SKIP
    >>> end = GlooEndpoint("end", "127.0.0.1", 29500)       # doctest: +SKIP  (another process)
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from coach_fx.runtime.links.base import MAX_MESSAGE, LinkError, LinkTimeout, PeerGone, RealClock, TokenBucket
from coach_fx.runtime.traces import Trace


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class GlooEndpoint:
    """One side of a gloo link: rank 0 is the cloud (it hosts the TCP store), rank 1 the end."""

    def __init__(self, role: str, host: str, port: int, timeout_s: float = 30.0,
                 shape: Trace | None = None) -> None:
        import torch
        import torch.distributed as dist

        if role not in ("end", "cloud"):
            raise ValueError(f"role must be 'end' or 'cloud', got {role!r}")
        self.torch, self.dist = torch, dist
        self.role = role
        self.peer_name = "cloud" if role == "end" else "end"
        self.addr = f"{host}:{port}"
        self.rank = 0 if role == "cloud" else 1
        self.peer = 1 - self.rank
        self.timeout_s = timeout_s
        self.bucket = TokenBucket(shape) if shape is not None else None
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=2, timeout=timedelta(seconds=timeout_s))
            # one group per direction, so a sender and a receiver thread never share one
            self._up = dist.new_group([0, 1], backend="gloo")
            self._down = dist.new_group([0, 1], backend="gloo")
        except Exception as e:  # noqa: BLE001
            raise PeerGone(f"could not connect the {role} side to {host}:{port} within "
                           f"{timeout_s} s: {e}") from None
        self.out_group = self._up if role == "end" else self._down
        self.in_group = self._down if role == "end" else self._up
        self.busy_s = 0.0
        self.bytes = 0
        self._pending = None

    def send(self, msg: bytes) -> float:
        torch, dist = self.torch, self.dist
        t0 = time.monotonic()
        start = self.bucket.wait(len(msg)) if self.bucket else t0
        head = torch.tensor([len(msg)], dtype=torch.int64)
        body = torch.frombuffer(bytearray(msg), dtype=torch.uint8) if msg else torch.empty(0, dtype=torch.uint8)
        if self.bucket:
            RealClock().sleep_until(start)
        try:
            dist.send(head, dst=self.peer, group=self.out_group)
            if len(msg):
                dist.send(body, dst=self.peer, group=self.out_group)
        except Exception as e:  # noqa: BLE001
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone (while sending): "
                           f"{_first_line(e)}") from None
        end = self.bucket.finish() if self.bucket else time.monotonic()
        self.busy_s += end - start
        self.bytes += len(msg)
        return end - start

    def _wait(self, work: Any, timeout: float | None, what: str) -> None:
        try:
            work.wait(timedelta(seconds=timeout if timeout is not None else self.timeout_s))
        except Exception as e:  # noqa: BLE001
            text = str(e).lower()
            if "timed out" in text or "timeout" in text:
                raise LinkTimeout(f"no {what} from the {self.peer_name} side ({self.addr}) within "
                                  f"{timeout if timeout is not None else self.timeout_s} s") from None
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone (waiting for a {what}): "
                           f"{_first_line(e)}") from None

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message. A gloo receive whose wait times out is failed for good (every
        later wait on it fails at once, and gloo cannot post another in its place), so a
        shorter ``timeout`` than the link's own (a caller polling for stalls) is not used: the
        wait lasts ``timeout_s``, and after it the link counts as gone."""
        torch = self.torch
        if self._pending == "dead":
            raise PeerGone(f"the gloo link to the {self.peer_name} side ({self.addr}) timed out "
                           f"after {self.timeout_s} s without a message; it cannot be resumed")
        if self._pending is None:
            head = torch.empty(1, dtype=torch.int64)
            self._pending = (self._post(head), head)
        work, head = self._pending
        try:
            self._wait(work, max(timeout or 0.0, self.timeout_s), "message header")
        except LinkTimeout:
            self._pending = "dead"
            raise
        self._pending = None
        n = int(head.item())
        if not 0 <= n <= MAX_MESSAGE:   # checked before allocating
            raise LinkError(f"peer announced a message of {n} bytes (limit {MAX_MESSAGE})")
        body = torch.empty(n, dtype=torch.uint8)
        if n:
            self._wait(self._post(body), max(timeout or 0.0, self.timeout_s), "message body")
        return body.numpy().tobytes()

    def _post(self, buf: Any) -> Any:
        """Post a receive into ``buf`` (gloo refuses at once when the peer's connection is gone)."""
        try:
            return self.dist.irecv(buf, src=self.peer, group=self.in_group)
        except Exception as e:  # noqa: BLE001
            raise PeerGone(f"the {self.peer_name} side ({self.addr}) is gone: {_first_line(e)}") from None

    def ready(self) -> bool:
        """Unknown without waiting on gloo: the cloud does not batch over this link."""
        return False

    @property
    def last_wire_s(self) -> float:
        """Not measured by gloo (the end uses its own send time)."""
        return 0.0

    @property
    def last_arrival_s(self) -> float:
        return 0.0

    def abort(self) -> None:
        """After a fault: leave the process group alone (tearing it down from a worker thread
        with a receive posted would abort the process)."""

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - closing twice or after a failure is fine
            pass
