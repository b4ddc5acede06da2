"""How each record of a plan directory is written as JSON and read back: the one home of the
plan files' schema (``coach_fx.deploy.save`` writes through it, ``saved_plan.open_plan`` reads
through it). Every value read is checked before anything is allocated from it: a shape is at
most what the wire carries, a dtype is one of the tensor files' table, a count is an int.

Example::

    >>> boundary_from_json(boundary_to_json(b)) == b                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from coach_fx.deploy.files import ArtifactError
from coach_fx.deploy.graphfile import DTYPES
from coach_fx.passes.boundary import Boundary, Crossing
from coach_fx.runtime.config import Bands
from coach_fx.runtime.plans import CacheSetup, CrossingBits, CutProfile, EndHalf, EndTimes, Variant


@dataclass(frozen=True)
class InputSpec:
    """One model input of a saved plan: what a frame fed to it must look like."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def dtype_of(name: Any) -> torch.dtype:
    """A dtype named in a plan file, from the same table as tensor files (nothing looked up by name)."""
    dt = DTYPES.get(str(name).removeprefix("torch."))
    if dt is None:
        raise ArtifactError(f"unknown dtype {name!r} in a plan file")
    return dt


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    """A shape read from a plan file: at most the wire's rank and elements per tensor
    (``runtime.wire.LIMITS``: a tensor the wire cannot carry can never be served, and a warm-up
    or a synthetic frame must not allocate it), or :class:`ArtifactError`."""
    from coach_fx.runtime.wire import LIMITS, MAX_RANK
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or \
            not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= LIMITS.max_dim for v in shape):
        raise ArtifactError(f"{what}: shape {shape!r} is not a list of at most {MAX_RANK} sizes")
    if math.prod(shape) > LIMITS.max_elements:
        raise ArtifactError(f"{what}: shape {list(shape)} has {math.prod(shape)} elements; the wire carries "
                            f"at most {LIMITS.max_elements} per tensor")
    return tuple(shape)


def inputs_to_json(example_inputs: Any) -> list[dict]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in example_inputs]


def inputs_from_json(specs: Any) -> tuple[InputSpec, ...]:
    return tuple(InputSpec(check_shape(s["shape"], f"input {k}"), dtype_of(s["dtype"]))
                 for k, s in enumerate(specs))


def boundary_to_json(b: Boundary) -> dict:
    return {"end_only": b.end_only,
            "crossings": [{**asdict(c), "dtype": str(c.dtype) if c.dtype else None,
                           "shape": list(c.shape) if c.shape is not None else None}
                          for c in b.crossings]}


def boundary_from_json(d: dict) -> Boundary:
    """A saved boundary, every crossing's shape checked against what the wire can carry
    (``check_shape``) before anything of that shape is allocated."""
    cs = tuple(Crossing(c["name"], c["dag_node"], c["kind"], int(c["bits"]),
                        check_shape(c["shape"], f"crossing {c['name']!r}") if c["shape"] is not None else None,
                        dtype_of(c["dtype"]) if c["dtype"] is not None else None, c.get("codec"))
               for c in d["crossings"])
    return Boundary(cs, bool(d["end_only"]))


def variant_to_json(v: Variant) -> dict:
    """A variant's data (not its modules) as plain JSON."""
    return {"boundary": boundary_to_json(v.boundary), "profile": asdict(v.profile),
            "bits": asdict(v.bits), "cache": asdict(v.cache) if v.cache is not None else None,
            "times": asdict(v.times), "lookup_split": v.end.lookup_split is not None,
            "finish_on_end_s": v.finish_on_end.host_s if v.finish_on_end is not None else None}


def variant_from_json(pid: int, rec: dict) -> Variant:
    """A variant from ``variant_to_json`` (its end half still to be loaded)."""
    p, b, c = rec["profile"], rec["bits"], rec["cache"]
    profile = CutProfile.from_json(p)
    plan_bits = b["plan"] if isinstance(b["plan"], int) else _ints(b["plan"])
    bits = CrossingBits(tuple(b["pinned"]), plan_bits, tuple(b["caps"]) if b["caps"] is not None else None)
    cache = None if c is None else CacheSetup(
        float(c["sim_threshold"]), float(c["margin"]), float(c["hit_rate"]),
        [(float(e), int(k)) for e, k in c["bits_by_similarity"]], int(c["grid"]), c["at"], bool(c["context"]))
    return Variant(pid, EndHalf(_unloaded), boundary_from_json(rec["boundary"]), profile, bits, cache,
                   EndTimes(**rec["times"]))


def _unloaded(*_: Any) -> Any:
    raise RuntimeError("this variant's end half is not loaded (a cloud-side read)")


def bands_to_json(bands: dict[bool, Bands]) -> dict:
    return {"plain": asdict(bands[False]), "cache": asdict(bands[True])}


def bands_from_json(d: dict) -> dict[bool, Bands]:
    def one(b: dict) -> Bands:
        return Bands(tuple(float(e) for e in b["edges_mbps"]),
                     _ints(b["plans"]) if b["plans"] is not None else None, int(b["start"]))
    return {False: one(d["plain"]), True: one(d["cache"])}


def _ints(xs: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in xs)
