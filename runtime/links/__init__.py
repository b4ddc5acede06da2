"""Links between the end and the cloud: one :class:`Endpoint` contract (``base``), three
implementations: ``inprocess`` (threads, emulated rate, real or virtual clock), ``gloo``
(torch.distributed point-to-point) and ``tcp`` (authenticated sockets, survives faults)."""

from coach_fx.runtime.links.base import (Clock, Endpoint, LinkError, LinkTimeout, PeerGone,
                                         RealClock, TokenBucket, VirtualClock)
from coach_fx.runtime.links.inprocess import InProcessLink

__all__ = ["Clock", "Endpoint", "InProcessLink", "LinkError", "LinkTimeout", "PeerGone",
           "RealClock", "TokenBucket", "VirtualClock"]
