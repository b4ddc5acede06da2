"""The boundary contract between the two halves of a split model: which values cross and how
each travels (:class:`Crossing`), in payload order (:class:`Boundary`). ``partition`` makes
it; the runtime's codec encodes and decodes by it.

Example::

    >>> c = Crossing("relu", "relu", "quant", 4, (1, 8, 4, 4), torch.float32)
    >>> Boundary((c,), end_only=False).n_payload     # packed codes, scale, zero point
    3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Crossing:
    """One value that crosses from end to cloud and how it travels."""

    name: str            # fx node name on the end side
    dag_node: str        # the DAG node (or model input) it belongs to
    kind: str            # "quant" (b <= 16: packed, scale, zero point), "raw" (as is) or
                         # "image" (a model input as one coded payload, see ``codec``)
    bits: int
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    #: "image": the image codec's name ("jpeg90", "png"); "quant": the lossless codec of the
    #: packed codes on the wire ("deflate"), None: packed as they are
    codec: str | None = None

    @property
    def n_payload(self) -> int:
        return 3 if self.kind == "quant" else 1


@dataclass(frozen=True)
class Boundary:
    """What joins the two halves: the crossing values in payload order."""

    crossings: tuple[Crossing, ...]
    end_only: bool

    @property
    def n_payload(self) -> int:
        return sum(c.n_payload for c in self.crossings)


__all__ = ["Boundary", "Crossing"]
