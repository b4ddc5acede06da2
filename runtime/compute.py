"""Where a cloud server's batches run: the :class:`Compute` protocol between the front door
(``runtime.server``: TLS, tokens, sessions, batching per plan) and the engine that runs the
cloud halves, in this process (``runtime.cloud.CloudWorker``) or on the replicas of a Ray
Serve deployment (``runtime.ray_compute.RayCompute``).

A batch is submitted and answered later: the front door keeps up to ``parallelism`` batches
out at once and hands their replies to the sessions in the order it submitted them, so each
end gets its answers in order whichever replica computed them.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from coach_fx.runtime.cloud import Arrival, CloudHalf

#: What a submitted batch gives back when asked: one reply per request (None: a close).
Replies = Callable[[], "list[bytes | None]"]


class Compute(Protocol):
    """An engine that runs the cloud halves of ``plans`` on batches of request messages."""

    #: plan id -> its cloud half and boundary (the front door sizes and checks requests with them)
    plans: dict[int, CloudHalf]
    #: batches it runs at once (the front door keeps this many out)
    parallelism: int
    #: frames that did not decode, and runs of a cloud half, so far
    rejected: int
    calls: int

    def warm_up(self) -> None:
        """Make the first request as fast as the rest (load, compile, first call)."""

    def shared_batch(self) -> int:
        """The largest batch while several ends share the engine (``Batching.shared_batch``
        on its halves' measured costs; ``max_batch`` where it measured none)."""

    def submit(self, msgs: Sequence[tuple[bytes, Arrival]]) -> Replies:
        """Start a batch of requests (each with how it arrived); returns how to get their replies."""

    def close(self) -> None:
        """Release what it holds (replicas, threads)."""
