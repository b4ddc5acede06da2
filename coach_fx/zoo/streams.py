"""Streams of samples as a camera would see them: a class persists for a while, then another.

Example::

    >>> stream = locality_stream(torch.tensor([0, 1, 2, 0]), 20, mean_run=5.0)
    >>> len(stream)
    20
"""

from __future__ import annotations

import random

import torch


def locality_stream(labels: torch.Tensor, n: int, mean_run: float = 10.0, seed: int = 0) -> list[int]:
    """Indices of ``n`` samples forming a stream with temporal locality: a class persists for a
    geometric number of frames (mean ``mean_run``), each frame a random sample of that class."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(int(c), []).append(i)
    classes = sorted(by_class)
    out: list[int] = []
    while len(out) < n:
        c = rng.choice(classes)
        run = 1
        while rng.random() > 1.0 / mean_run:
            run += 1
        out += [rng.choice(by_class[c]) for _ in range(run)]
    return out[:n]


__all__ = ["locality_stream"]
