"""Saved plans: ``cm.save(dir)`` writes each half on its own so that each side loads only its own.

    dir/plan.json         the plan, the boundary (what crosses, how), input specs, output
                          structure, devices and network
    dir/end.graph.json    the end half: its exported graph and its tensors
    dir/end.tensors       (``coach_fx.graphfile``: JSON and raw bytes, no pickle)
    dir/cloud.*           the cloud half (absent for an end-only plan)
    dir/model.*           the whole model (only with ``whole=True``: for ``fallback="local"``)
    dir/manifest.json     the SHA-256 of every file above

No file of a plan directory is code: nothing is written or read with pickle, ``torch.load``
or ``torch.export.load`` (which unpickles), and a loader checks every file against the
manifest before it reads any of them, so a changed weight or a planted file is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import coach_fx.passes.ops  # noqa: F401 - the halves call torch.ops.coach.*
from coach_fx._compat import treespec_dumps, treespec_loads
from coach_fx.graphfile import load_exported, save_exported
from coach_fx.passes.boundary import Boundary, Crossing

FORMAT = 2
#: Every plan directory lists its files' SHA-256 here; nothing is read before they match.
MANIFEST = "manifest.json"


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"plan.json: unknown dtype {name!r}")
    return dt


def boundary_to_json(b: Boundary) -> dict:
    return {"end_only": b.end_only,
            "crossings": [{**asdict(c), "dtype": str(c.dtype) if c.dtype else None,
                           "shape": list(c.shape) if c.shape is not None else None}
                          for c in b.crossings]}


def boundary_from_json(d: dict) -> Boundary:
    cs = tuple(Crossing(c["name"], c["dag_node"], c["kind"], int(c["bits"]),
                        tuple(c["shape"]) if c["shape"] is not None else None, _dtype(c["dtype"]),
                        c.get("codec"))
               for c in d["crossings"])
    return Boundary(cs, bool(d["end_only"]))


@dataclass
class SavedHalf:
    module: Any
    boundary: Boundary
    meta: dict

    @property
    def out_spec(self) -> Any:
        return treespec_loads(self.meta["out_spec"])

    @property
    def input_specs(self) -> list[dict]:
        return self.meta["inputs"]


def _payload_dims(boundary: Boundary) -> tuple | None:
    """Dynamic shapes of the cloud half's inputs: an image crossing's coded length varies per
    request (up to its codec's bound); everything else is as in the example."""
    from coach_fx.runtime.imagecodec import max_payload_bytes

    dims: list[Any] = []
    for c in boundary.crossings:
        if c.kind == "image":
            dims.append({0: torch.export.Dim(f"{c.name}_image_bytes", min=2,
                                             max=max_payload_bytes(c.shape, c.codec))})
        else:
            dims += [None] * c.n_payload
    return tuple(dims) if any(d is not None for d in dims) else None


def save(path: str | Path, end_module: torch.nn.Module, cloud_module: torch.nn.Module,
         boundary: Boundary, example_inputs: Sequence[Any], out_spec: Any, meta: dict,
         whole: torch.nn.Module | None = None) -> Path:
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    files = []
    with torch.no_grad():
        files += save_exported(torch.export.export(end_module, tuple(example_inputs)), d / "end")
        if whole is not None:   # for fallback="local": the end device can run everything
            files += save_exported(torch.export.export(whole, tuple(example_inputs)), d / "model")
        if not boundary.end_only:
            payload = end_module(*example_inputs)
            files += save_exported(torch.export.export(cloud_module, tuple(payload),
                                                       dynamic_shapes=_payload_dims(boundary)), d / "cloud")
    inputs = [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in example_inputs]
    doc = {"format": FORMAT, **meta, "boundary": boundary_to_json(boundary), "inputs": inputs,
           "out_spec": treespec_dumps(out_spec)}
    (d / "plan.json").write_text(json.dumps(doc, indent=1))
    files.append(d / "plan.json")
    manifest = {"format": FORMAT, "sha256": {f.name: _sha256(f) for f in files}}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(d: Path, names: Sequence[str]) -> None:
    """Check ``names`` (files of plan directory ``d``) against its manifest before anything
    reads them: a missing, changed or unlisted file is refused."""
    m = d / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST}: not a plan directory written by this version "
                            "of cm.save() (save it again)")
    try:
        listed = json.loads(m.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{m} is not a manifest ({e})") from None
    for name in names:
        f = d / name
        if name not in listed:
            raise ArtifactError(f"{f} is not listed in {m}")
        if not f.is_file():
            raise ArtifactError(f"{f} is missing")
        if not hmac.compare_digest(_sha256(f), str(listed[name])):
            raise ArtifactError(f"{f} does not match its SHA-256 in {m}: changed since it was saved")


class ArtifactError(ValueError):
    """A plan directory that is incomplete, altered or of another version."""


def load_half(path: str | Path, side: str) -> SavedHalf:
    """Load one half (``"end"`` or ``"cloud"``) of a saved plan, or the whole model (``"model"``,
    written with ``cm.save(dir, whole=True)``, for ``fallback="local"``)."""
    d = Path(path)
    if side not in ("end", "cloud", "model"):
        raise ValueError(f"side must be 'end', 'cloud' or 'model', got {side!r}")
    if not (d / "plan.json").is_file():
        raise FileNotFoundError(f"{d} has no plan.json: not a directory written by cm.save()")
    verify(d, ["plan.json"])
    meta = json.loads((d / "plan.json").read_text())
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{d / 'plan.json'}: format {meta.get('format')}, this version reads {FORMAT}")
    boundary = boundary_from_json(meta["boundary"])
    if side == "cloud" and boundary.end_only:
        raise ValueError(f"{d} holds an end-only plan: there is no cloud half to serve")
    verify(d, [f"{side}.graph.json", f"{side}.tensors"])
    module = load_exported(d / side)
    return SavedHalf(module, boundary, meta)


def make_frames(input_specs: list[dict], n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random frames matching the saved input specs (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(n):
        xs = []
        for spec in input_specs:
            dt = _dtype(spec["dtype"])
            if dt.is_floating_point:
                xs.append(torch.randn(spec["shape"], generator=g).to(dt))
            else:
                xs.append(torch.randint(0, 10, spec["shape"], generator=g).to(dt))
        frames.append(tuple(xs))
    return frames
