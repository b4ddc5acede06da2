"""The end side as an object: :class:`RemoteModel` sends the user's own inputs through the end
half to a cloud server and gives back the model's results, one call at a time, as futures, or
as an ordered stream (``coach_fx.connect`` builds one from a compiled model or a plan folder).

One background thread drives an :class:`~coach_fx.runtime.end.EndWorker` over the requests
as they are submitted; the worker's sender and receiver threads overlap the end half, the
link and the cloud. Reconnects run on a thread of their own (``StreamSession.try_reconnect``),
so a dead cloud never blocks a caller longer than ``StreamConfig.timeout_s``; with a fallback
a request the cloud cannot answer is answered on the device (``"local"``) or given a
:class:`~coach_fx.runtime.session.RequestFailed` (``"error"``). Every request gets exactly one
result, in order.

Example::

    >>> with coach_fx.connect(cm, "cloud.example:29517", fallback="local") as rm:  # doctest: +SKIP
    ...     y = rm(x)                                   # one request
    ...     for out in rm.stream(camera_frames()):      # many, the stages overlapping
    ...         show(out)
    ...     print(rm.stats().table())
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

from coach_fx.runtime.config import StreamConfig
from coach_fx.runtime.end import EndWorker
from coach_fx.runtime.links.base import Endpoint, LinkError
from coach_fx.runtime.policy import Policy
from coach_fx.runtime.session import RequestFailed
from coach_fx.runtime.stats import Outcomes, Stats

_CLOSE = object()
#: how often an idle stream looks for requests the link or the cloud failed
IDLE_POLL_S = 0.05


class RemoteModel:
    """A model whose end half runs here and whose cloud half runs on a ``coach serve``.

    ``policy`` decides per request (a ``StaticPolicy`` for one saved plan); ``dial()`` returns
    a fresh endpoint (called at start, and again after a fault); ``whole_model`` answers on
    the device for ``config.fallback == "local"``.
    """

    def __init__(self, policy: Policy, out_spec: Any, dial: Callable[[], Endpoint],
                 config: StreamConfig = StreamConfig(), *,
                 whole_model: Callable[..., Any] | None = None, connect_now: bool = True) -> None:
        endpoint = None
        if connect_now:
            try:
                endpoint = dial()
            except Exception:  # noqa: BLE001 - with a fallback the stream starts without the cloud
                if config.fallback is None:
                    raise
        self.config = config
        self._worker = EndWorker(endpoint, out_spec, policy, config, whole_model=whole_model,
                                 reconnect=dial, deliver=self._deliver)
        self._requests: queue.Queue = queue.Queue()
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._submitted = 0
        self._closed = False
        self._ended = False     # the driver is gone: nothing submitted now would be answered
        self._error: BaseException | None = None
        self._driver = threading.Thread(target=self._drive, daemon=True, name="coach-remote")
        self._driver.start()

    # ------------------------------------------------------------------ the API
    def submit(self, *x: Any) -> Future:
        """Send one request (the model's inputs); its result comes as a future."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("this RemoteModel is closed")
            if self._ended:
                raise RuntimeError(f"the stream failed: {self._error}") from self._error
            k = self._submitted
            self._submitted += 1
            self._futures[k] = fut
        self._requests.put(x)
        return fut

    def __call__(self, *x: Any) -> Any:
        """One request: the model's output (raises ``RequestFailed`` where it could not be served)."""
        return self.submit(*x).result()

    def stream(self, frames: Iterable[Any], window: int | None = None) -> Iterator[Any]:
        """Results of ``frames`` in order, while the stages overlap. ``frames`` may be any
        iterable (a camera loop, a DataLoader): it is read lazily, at most ``window`` requests
        ahead of the results (default: the requests in flight plus the send queue), so memory
        stays bounded. A request that failed with ``fallback="error"`` yields its
        ``RequestFailed`` in its place."""
        window = window or (self.config.max_inflight + self.config.queue_size + 1)
        ahead: list[Future] = []
        for x in frames:
            ahead.append(self.submit(*(x if isinstance(x, (tuple, list)) else (x,))))
            if len(ahead) >= window:
                yield _result(ahead.pop(0))
        while ahead:
            yield _result(ahead.pop(0))

    def stats(self) -> Stats:
        """The measured figures so far (``Stats.table()`` prints them)."""
        return self._worker.stats()

    @property
    def outcomes(self) -> Outcomes:
        """The stream's counts so far (cache hits, fallbacks, reconnects...): a copy, cheap to
        ask for at every result, unlike ``stats()``."""
        st = self._worker.session
        return dataclasses.replace(st.outcomes) if st is not None else Outcomes()

    @property
    def policy(self) -> Policy:
        """What decides per request (an online model's ``OnlinePolicy``: ``summary()`` tells its
        hits, bits and switches)."""
        return self._worker.policy

    @property
    def events(self) -> list[str]:
        """What happened to the link: ``link down: ...``, ``reconnected``..."""
        return list(self._worker.events)

    def close(self, timeout: float | None = None) -> None:
        """Answer what was submitted, tell the cloud the stream is over and close the link."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._requests.put(_CLOSE)
        self._driver.join(timeout)

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the driver
    def _frames(self) -> Iterator[tuple]:
        """The submitted requests, for the worker's loop (this thread). Between requests it
        settles what the link or the cloud failed (an error reply, a stall), which the loop
        otherwise does only when the next request comes."""
        while True:
            try:
                x = self._requests.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                st = self._worker.session
                if st is not None:
                    st.settle_failed()
                continue
            if x is _CLOSE:
                return
            yield x

    def _drive(self) -> None:
        w = self._worker
        error: BaseException = RuntimeError("the RemoteModel closed before answering")
        try:
            w.run(self._frames())
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            error = self._error = e
        finally:
            self._end(error)
            try:
                w.close(timeout=self.config.timeout_s)
            except (LinkError, OSError):   # the cloud is gone already: nothing to close
                pass
            if w.endpoint is not None:
                w.endpoint.close()

    def _deliver(self, i: int, out: Any) -> None:
        with self._lock:
            fut = self._futures.pop(i, None)
        if fut is None:
            return
        if isinstance(out, RequestFailed):
            fut.set_exception(out)
        else:
            fut.set_result(out)

    def _end(self, e: BaseException) -> None:
        """The driver is done: every request not answered gets ``e``."""
        with self._lock:
            self._ended = True
            futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(e)


def _result(fut: Future) -> Any:
    try:
        return fut.result()
    except RequestFailed as e:
        return e


__all__ = ["RemoteModel"]
