"""The semantic cache's features: normalized, spatially pooled activations (one vector per
sample), as the cache looks them up and as its offline calibration computes them.

Example::

    >>> pooled_features([torch.ones(1, 8, 4, 4)], grid=2).shape
    (32,)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def pooled_features(tensors: Sequence[torch.Tensor], grid: int = 1) -> np.ndarray:
    """One normalized vector per sample: each tensor average-pooled over its spatial dims
    (to ``grid`` x ``grid`` cells for images: 2 keeps the coarse layout that tells a 6 from a
    9, which a global mean loses), each part normalized, then joined.

    It runs on every request on the (slow) end device, so it is a handful of calls: one
    pooling op in torch for an image, the norms in numpy (torch's per-op overhead would cost
    more than the arithmetic on these short vectors).
    """
    if len(tensors) == 1:
        v = _pooled_one(tensors[0], grid)
        if v is not None:
            return v / max(math.sqrt(float(v @ v)), 1e-12)
    parts = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.detach().float().cpu()
            if t.dim() == 4:
                h, w = t.shape[2:]
                g = grid if grid > 1 else 1
                if (h, w) != (g, g):     # already one cell per grid cell: nothing to pool
                    t = (torch.nn.functional.avg_pool2d(t, (h // g, w // g)) if h % g == 0 and w % g == 0
                         else torch.nn.functional.adaptive_avg_pool2d(t, g))
            a = t.numpy()
        else:
            a = np.asarray(t, np.float32)
        if a.ndim > 2 and not (a.ndim == 4 and isinstance(t, torch.Tensor)):
            a = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2)
        a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        parts.append(a)
    if len(parts) == 1:
        v = parts[0]
    else:
        v = np.concatenate([a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
                            for a in parts], axis=1)
    v = v / np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v))[:, None], 1e-12)
    return v[0] if v.shape[0] == 1 else v


def lookup_features(tensors: Sequence[torch.Tensor], grid: int = 1) -> np.ndarray:
    """``pooled_features`` up to a positive factor: what :meth:`SemanticCache.lookup` and
    :meth:`SemanticCache.confirm` take (cosine similarity and the centers' normalization do
    not see the factor). Per request on the end device: for one image tensor of one sample
    (the usual case) it is one pooling op, nothing normalized there."""
    if len(tensors) == 1:
        v = _pooled_one(tensors[0], grid)
        if v is not None:
            return v
    return pooled_features(tensors, grid)


def _pooled_one(t: object, grid: int) -> np.ndarray | None:
    """One float32 CPU image tensor of one sample whose sides the grid divides, average-pooled
    and flattened (not normalized); None: not that case."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1
            and t.dtype == torch.float32 and t.device.type == "cpu"):
        return None
    h, w = t.shape[2:]
    g = grid if grid > 1 else 1
    if h % g or w % g:
        return None
    t = t.detach()
    if (h, w) == (g, g):
        # a copy: the value runs on through the rest of the end half, maybe into an in-place op
        return t.numpy().reshape(-1).copy()
    return torch.nn.functional.avg_pool2d(t, (h // g, w // g)).numpy().reshape(-1)


def vec_rows(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    return np.asarray(feats, dtype=np.float64)


__all__ = ["lookup_features", "pooled_features", "vec_rows"]
