"""The cloud worker: receives requests, runs the plan's cloud half, sends results back.

Requests that have arrived together run as one batch (a server that falls behind catches up);
each reply carries the cloud's compute time, the request's size and its time on the wire, from
which the end side learns the bandwidth. An error in one request, a frame that does not even
decode included, is that request's error reply; the worker goes on.

Example::

    >>> link = InProcessLink.for_network(Network(20))                                   # doctest: +SKIP
    >>> cloud = CloudWorker({0: (cm.cloud_module, cm.boundary)}, link.cloud).start()     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch

from coach_fx.passes._compat import tree_flatten, tree_unflatten
from coach_fx.passes.boundary import Boundary
from coach_fx.runtime.codec import entries_to_payload, output_to_entries, payload_to_floats
from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.emulation import emulate, fast_handoff
from coach_fx.runtime.links.base import Endpoint
from coach_fx.runtime.wire import (CLOSE_ID, FLAG_CONTROL, FLAG_ERROR, FLAG_RESULT, Entry, ReplyStats, WireError, decode,
                                  encode, peek_header)
from coach_fx.passes.wire_sizes import packed_nbytes, row_quantized

log = logging.getLogger("coach_fx.runtime")

@dataclass(frozen=True)
class CloudHalf:
    """One plan's cloud side: its cloud half, the boundary its requests follow, and optionally
    the same half on dequantized inputs with a free batch dimension (``batched``: requests
    are dequantized one by one, exactly as the half's own boundary ops do, then run as one
    batch; the packed form cannot batch, its shapes are per request)."""

    module: Callable[..., Any]
    boundary: Boundary
    batched: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Arrival:
    """How a request arrived, as the cloud's endpoint saw it (``Endpoint.last_wire_s`` and
    ``last_arrival_s``), and how many ends shared the cloud then (a server's sessions); each
    reply reports all three: the end's bandwidth samples, and the load that pushes its
    controller toward plans with less cloud work."""

    wire_s: float = 0.0
    at_s: float = 0.0
    ends: int = 1

    @classmethod
    def of(cls, endpoint: Endpoint, ends: int = 1) -> "Arrival":
        return cls(endpoint.last_wire_s, endpoint.last_arrival_s, ends)


#: What a worker or server is given per plan: a :class:`CloudHalf`, or (module, boundary).
CloudPlan = Union[CloudHalf, tuple[Callable[..., Any], Boundary]]


def cloud_half(plan: CloudPlan) -> CloudHalf:
    return plan if isinstance(plan, CloudHalf) else CloudHalf(*plan)


def cloud_device(name: str) -> torch.device:
    """The device a cloud half runs on, checked: "cpu", or "cuda[:N]" where there is one."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"a cloud device is 'cpu' or 'cuda[:N]', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cloud device {name!r}: this machine has no CUDA device")
    return device


def on_device(half: CloudHalf, device: torch.device) -> CloudHalf:
    """``half`` with its modules' weights on ``device`` (as it is on the CPU)."""
    if device.type == "cpu":
        return half
    move = (lambda m: m.to(device) if isinstance(m, torch.nn.Module) else m)
    return CloudHalf(move(half.module), half.boundary, move(half.batched) if half.batched is not None else None)


class CloudWorker:
    """Receives payloads, runs the cloud half, sends results back (a thread or a process)."""

    def __init__(self, plans: dict[int, CloudPlan], endpoint: Endpoint | None,
                 config: StreamConfig = StreamConfig(), *, adaptive: bool = False, device: str = "cpu") -> None:
        #: where the halves run (their dequantize ops too: "cpu", "cuda", "cuda:1"...); replies
        #: are built on the CPU
        self.device = cloud_device(device)
        #: plan id -> its cloud half and boundary
        self.plans = {k: on_device(cloud_half(v), self.device) for k, v in plans.items()}
        #: requests that have arrived together run as one batch, up to ``config.batching.max_batch``
        #: (only on an endpoint whose ``ready()`` tells what has arrived: the in-process link)
        self.max_batch = config.batching.max_batch
        self.batching = config.batching
        #: plan id -> (a batch's fixed seconds, seconds per request), measured at warm-up
        self._costs: dict[int, tuple[float, float]] = {}
        self._warm = False
        #: accept float crossings quantized with bits chosen per request (online control)
        self.adaptive = adaptive
        self.endpoint = endpoint
        self.slowdown = config.cloud_slowdown
        self.busy_s = 0.0
        self.served = 0
        self.calls = 0      # runs of a cloud half (one per batch): served / calls = mean batch
        self.error: BaseException | None = None
        self.rejected = 0   # frames that did not decode (each answered with its error)
        self._thread: threading.Thread | None = None

    #: batches it runs at once (``runtime.compute.Compute``): one, on the calling thread
    parallelism = 1

    def submit(self, msgs: Sequence[tuple[bytes, Arrival]]) -> Callable[[], list[bytes | None]]:
        """``handle_batch`` now, its replies when asked (``runtime.compute.Compute``)."""
        replies = self.handle_batch(msgs)
        return lambda: replies

    def close(self) -> None:
        """Nothing to release: the halves live as long as the worker."""

    def handle(self, msg: bytes, arrival: Arrival | None = None) -> bytes | None:
        """One request message -> its result message (None for a close request); ``arrival``:
        how it arrived (default: as the endpoint's last message did)."""
        if arrival is None:
            arrival = Arrival.of(self.endpoint) if self.endpoint is not None else Arrival()
        try:
            req, plan_id, flags, entries = decode(msg)
        except WireError as e:   # a bad frame fails only itself (its error reply); the worker goes on
            self.rejected += 1
            return self.reply_to_bad_frame(msg, e)
        if flags & FLAG_CONTROL and req == CLOSE_ID:
            return None
        t0 = time.perf_counter()
        try:
            if flags & FLAG_CONTROL:
                raise WireError(f"control message for request {req}: the only control request is close")
            if plan_id not in self.plans:
                raise WireError(f"unknown plan id {plan_id}")
            half = self.plans[plan_id]
            payload = self._here(entries_to_payload(half.boundary, entries, self.adaptive))
            self.calls += 1
            with torch.no_grad():
                out = self._back(half.module(*payload))
            if not all_finite(tree_flatten(out)[0]):
                raise ValueError(NOT_FINITE)
            out_entries, _ = output_to_entries(out)
        except Exception as e:  # noqa: BLE001 - reported to the end side, the worker goes on
            return error_reply(req, plan_id, e)
        took = emulate(t0, self.slowdown)
        self.busy_s += took
        self.served += 1
        return encode(req, [*out_entries, reply_stats(took, msg, arrival)], FLAG_RESULT, plan_id)

    def _here(self, payload: tuple) -> tuple:
        """A request's payload on the halves' device (the packed codes travel there: the
        unpack and dequantize run there too)."""
        if self.device.type == "cpu":
            return payload
        return tuple(v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in payload)

    def _back(self, out: Any) -> Any:
        """A result on the CPU, where replies are encoded."""
        if self.device.type == "cpu":
            return out
        leaves, spec = tree_flatten(out)
        return tree_unflatten([v.cpu() if isinstance(v, torch.Tensor) else v for v in leaves], spec)

    def warm_up(self) -> None:
        """Run every plan's halves once on a zero request (the first call of a loaded graph
        costs about a second: the first end's first request should not pay it). Plans whose
        requests cannot be made up here (images, non-tensor values) are skipped. A half that
        cannot run raises here (a server must not take ends it cannot answer). Once warm, a
        second call does nothing."""
        if self._warm:
            return
        for pid, half in self.plans.items():
            payload = zero_payload(half.boundary)
            if payload is None:
                continue
            payload = self._here(payload)
            try:
                with torch.no_grad():
                    half.module(*payload)
                    floats = payload_to_floats(half.boundary, payload)
                    if half.batched is not None and floats is not None:
                        half.batched(*(torch.cat([v, v]) for v in floats))
                        if self.max_batch > 1:
                            self._costs[pid] = _batch_costs(half.batched, floats, self.max_batch)
            except Exception as e:
                raise RuntimeError(f"plan {pid}'s cloud half fails on a request of zeros: "
                                   f"{type(e).__name__}: {e}") from e
        self._warm = True

    def shared_batch(self) -> int:
        """The largest batch while several ends share this worker: within
        ``Batching.shared_latency`` of one request alone for every plan it measured."""
        return min([self.batching.shared_batch(*c) for c in self._costs.values()] or [self.max_batch])

    @staticmethod
    def reply_to_bad_frame(msg: bytes, e: Exception) -> bytes:
        """The reply to a frame that does not decode: an error for its request id where its
        header still names one (a corrupted payload), else for request 0."""
        log.warning("coach cloud: refused a malformed frame (%s)", e)
        return error_reply_to(msg, e)

    def serve(self) -> None:
        """Serve until the end side sends close (or the link goes away)."""
        with fast_handoff():
            self._serve()

    def handle_batch(self, msgs: Sequence[tuple[bytes, Arrival]]) -> list[bytes | None]:
        """Several request messages (each with how it arrived) -> their replies, in order.
        Requests for one plan run through its cloud half as one batch (one call's overhead for
        all: a server that falls behind catches up). What does not batch goes alone with the
        same reply as ``handle``: a close, a frame that does not decode or does not fit its
        plan (its error), a plan whose values do not batch. In a batch, a request whose result
        is not finite gets its error and the others their answers from the same run; a run
        that raises is split in halves until only the failing requests are left, each with
        its error: one hostile request costs its neighbours a rerun or two, not one each."""
        if len(msgs) == 1:
            return [self.handle(*msgs[0])]
        replies: list[bytes | None] = [None] * len(msgs)
        groups: dict[int, list[tuple[int, int, tuple]]] = {}
        for k, (msg, arrival) in enumerate(msgs):
            try:
                req, plan_id, flags, entries = decode(msg)
                if flags & FLAG_CONTROL or plan_id not in self.plans:
                    raise WireError("not a request of a plan served here")
                half = self.plans[plan_id]
                payload = self._here(entries_to_payload(half.boundary, entries, self.adaptive))
            except Exception:  # noqa: BLE001 - alone, ``handle`` gives it the reply it gets alone
                replies[k] = self.handle(msg, arrival)
                continue
            groups.setdefault(plan_id, []).append((k, req, payload))
        for plan_id, items in groups.items():
            for k, reply in self._run_batch(plan_id, items, msgs):
                replies[k] = reply
        return replies

    def _run_batch(self, plan_id: int, items: list[tuple[int, int, tuple]],
                   msgs: Sequence[tuple[bytes, Arrival]]) -> list[tuple[int, bytes | None]]:
        """(index, reply) of checked requests for one plan (index into ``msgs``, request id,
        payload), run as one batch where their values batch."""
        if len(items) == 1:
            return [(items[0][0], self.handle(*msgs[items[0][0]]))]
        half = self.plans[plan_id]
        payloads, module = [p for _, _, p in items], half.module
        if half.batched is not None:   # dequantized here, so that the rest runs as one batch
            floats = [payload_to_floats(half.boundary, p) for p in payloads]
            if all(f is not None for f in floats):
                payloads, module = floats, half.batched
        if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 for p in payloads for v in p):
            return [(k, self.handle(*msgs[k])) for k, _, _ in items]
        n = len(items)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = self._back(module(*(torch.cat(vs) for vs in zip(*payloads))))
            leaves, spec = tree_flatten(out)
            if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n for v in leaves):
                return [(k, self.handle(*msgs[k])) for k, _, _ in items]   # the output does not follow the batch
        except Exception:  # noqa: BLE001 - split: the failing requests are found, the rest answered
            mid = n // 2
            return self._run_batch(plan_id, items[:mid], msgs) + self._run_batch(plan_id, items[mid:], msgs)
        self.calls += 1
        took = emulate(t0, self.slowdown)
        self.busy_s += took
        finite = finite_rows(leaves, n)
        replies = []
        for row, (k, req, _) in enumerate(items):
            msg, arrival = msgs[k]
            if not finite[row]:
                replies.append((k, error_reply(req, plan_id, ValueError(NOT_FINITE))))
                continue
            self.served += 1
            out_entries, _ = output_to_entries(tree_unflatten([v[row:row + 1] for v in leaves], spec))
            replies.append((k, encode(req, [*out_entries, reply_stats(took / n, msg, arrival)], FLAG_RESULT, plan_id)))
        return replies

    def _serve(self) -> None:
        ep = self.endpoint
        while True:
            msgs = [(ep.recv(None), Arrival.of(ep))]
            # what has arrived meanwhile goes in one batch (only what is already there: no
            # request waits for another)
            while len(msgs) < self.max_batch and ep.ready():
                msgs.append((ep.recv(None), Arrival.of(ep)))
            for reply in self.handle_batch(msgs):
                if reply is None:   # close: acknowledge, so the end's receiver stops cleanly
                    self.endpoint.send(encode(CLOSE_ID, [], FLAG_CONTROL))
                    return
                t0 = time.perf_counter()
                self.endpoint.send(reply)
                self.busy_s += time.perf_counter() - t0

    def start(self) -> "CloudWorker":
        def run() -> None:
            try:
                self.serve()
            except BaseException as e:  # noqa: BLE001
                self.error = e
        self._thread = threading.Thread(target=run, name="coach-cloud", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)


def _batch_costs(batched: Callable[..., Any], floats: tuple, most: int, repeat: int = 5) -> tuple[float, float]:
    """(fixed seconds, seconds per request) of a batched half: the medians of ``repeat`` runs at
    batch 1 and batch ``most`` on ``floats``, fitted to a line."""
    import statistics

    def median_s(n: int) -> float:
        xs = [torch.cat([v] * n) for v in floats]
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            batched(*xs)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    one, many = median_s(1), median_s(most)
    per = max(0.0, (many - one) / (most - 1))
    return max(0.0, one - per), per


def reply_stats(took: float, msg: bytes, arrival: Arrival) -> Entry:
    """A reply's figures for the end (``wire.ReplyStats``), as its stats entry."""
    return ReplyStats(took, float(len(msg)), float(arrival.wire_s), float(arrival.at_s), float(arrival.ends)).entry()


def zero_payload(boundary: Boundary) -> tuple | None:
    """A request of zeros for ``boundary`` (None where one cannot be made up: an image or a
    crossing without a tensor shape)."""
    out: list[Any] = []
    for c in boundary.crossings:
        if c.kind == "image" or c.shape is None or c.dtype is None:
            return None
        if c.kind == "quant":
            params = (*c.shape[:-1], 1) if row_quantized(c.shape, c.bits) else ()
            out += [torch.zeros(packed_nbytes(math.prod(c.shape), c.bits), dtype=torch.uint8),
                    torch.ones(params), torch.zeros(params, dtype=torch.int32)]
        else:
            out.append(torch.zeros(c.shape, dtype=c.dtype))
    return tuple(out)


#: The error of a request whose result is not finite.
NOT_FINITE = ("the cloud half's result is not finite (NaN or inf): the request's values or scales "
              "were out of range")


def finite_rows(leaves: Sequence[Any], n: int) -> list[bool]:
    """Per row of a batch of ``n``: whether every floating-point leaf is finite in that row."""
    ok = torch.ones(n, dtype=torch.bool)
    for v in leaves:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            ok &= torch.isfinite(v).reshape(n, -1).all(1)
    return ok.tolist()


def all_finite(leaves: Sequence[Any]) -> bool:
    """Whether every floating-point tensor among ``leaves`` is finite (a NaN or inf result is
    an error, never an answer)."""
    return all(bool(torch.isfinite(v).all()) for v in leaves
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def error_reply(req: int, plan_id: int, e: BaseException) -> bytes:
    """The error reply to request ``req``: the error's type and text (at most 4 KiB)."""
    text = f"{type(e).__name__}: {e}".encode()[:4096]
    return encode(req, [Entry.raw(torch.frombuffer(bytearray(text), dtype=torch.uint8))],
                  FLAG_RESULT | FLAG_ERROR, plan_id)


__all__ = ["Arrival", "CloudHalf", "CloudPlan", "CloudWorker", "all_finite", "cloud_half", "error_reply"]


def error_reply_to(msg: bytes, e: BaseException) -> bytes:
    """The error reply to a request message: for its request id where its header still names
    one (a corrupted payload), else for request 0."""
    try:
        req, plan_id, _, _ = peek_header(msg)
    except WireError:
        req, plan_id = 0, 0
    return error_reply(req, plan_id, e)
