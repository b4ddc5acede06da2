"""Saved plans: ``cm.save(dir)`` writes each half on its own so that each side loads only its own.

    dir/plan.json         the plan, the boundary (what crosses, how), input specs, output
                          structure, devices and network
    dir/end.graph.json    the end half: its exported graph and its tensors
    dir/end.tensors       (``coach_fx.graphfile``: JSON and raw bytes, no pickle)
    dir/cloud.*           the cloud half (absent for an end-only plan)
    dir/cloud_batched.*   the cloud half on dequantized inputs with a free batch dimension
                          (the server batches requests of many ends through it; absent where
                          the half does not export that way: then it serves one at a time)
    dir/model.*           the whole model (only with ``whole=True``: for ``fallback="local"``)
    dir/manifest.json     the SHA-256 of every file above, authenticated with the shared
                          token (HMAC-SHA256) when one is given or set in ``$COACH_TOKEN``

No file of a plan directory is code: nothing is written or read with pickle, ``torch.load``
or ``torch.export.load`` (which unpickles), and a loader checks every file against the
manifest before it reads any of them, so a changed weight or a planted file is refused. A
loader that holds a token (``coach serve``/``coach run`` always do) also requires the
manifest's HMAC under that token: whoever could rewrite the files and their hashes still
cannot forge it.
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
#: What an online model's plan directory holds instead of plan.json (``coach_fx.saved_online``).
ONLINE_FILE = "online.json"


def _manifest_mac(key: bytes, listed: dict) -> str:
    body = json.dumps({"format": FORMAT, "sha256": listed}, sort_keys=True).encode()
    return hmac.new(key, b"coach_fx manifest\0" + body, hashlib.sha256).hexdigest()


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


class SavedMeta:
    """What any saved plan's metadata (``meta``: plan.json or online.json) tells of its model."""

    meta: dict

    @property
    def out_spec(self) -> Any:
        return treespec_loads(self.meta["out_spec"])

    @property
    def input_specs(self) -> list[dict]:
        return self.meta["inputs"]


@dataclass
class SavedHalf(SavedMeta):
    module: Any
    boundary: Boundary
    meta: dict
    #: the cloud half on dequantized inputs, batch dimension free (``runtime.cloud.CloudHalf``)
    batched: Any = None


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


#: The largest batch an exported batched cloud half takes.
MAX_BATCH = 1024


def export_batched(batched: torch.nn.Module, boundary: Boundary, payload: Sequence[Any]) -> Any:
    """``batched`` (the cloud half on floats) exported with a free batch dimension, or None
    where that does not hold (an input without a batch dimension, a graph that fixes it)."""
    from coach_fx.runtime.codec import payload_to_floats

    floats = payload_to_floats(boundary, payload)
    if floats is None or not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1
                                 for v in floats):
        return None
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:   # an example of two: a batch of one would be specialised
        return torch.export.export(batched, tuple(torch.cat([v, v]) for v in floats),
                                   dynamic_shapes=tuple({0: batch} for _ in floats))
    except Exception:  # noqa: BLE001 - e.g. a view that fixes the batch: served one at a time
        return None


def save(path: str | Path, end_module: torch.nn.Module, cloud_module: torch.nn.Module,
         boundary: Boundary, example_inputs: Sequence[Any], out_spec: Any, meta: dict,
         whole: torch.nn.Module | None = None, key: bytes | str | None = None,
         batched: torch.nn.Module | None = None) -> Path:
    """Write a plan directory; ``key`` (default ``$COACH_TOKEN``; none: unsigned) signs its
    manifest; ``batched``: the cloud half on floats (``CompiledModel.batched_cloud_module``),
    written where it exports with a free batch dimension."""
    from coach_fx.runtime.links.credentials import shared_token
    secret = shared_token(key, required=False)
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
            ep = export_batched(batched, boundary, payload) if batched is not None else None
            if ep is not None:
                files += save_exported(ep, d / "cloud_batched")
            meta = {**meta, "batched": ep is not None}
    inputs = [{"shape": list(x.shape), "dtype": str(x.dtype)} for x in example_inputs]
    doc = {"format": FORMAT, **meta, "boundary": boundary_to_json(boundary), "inputs": inputs,
           "out_spec": treespec_dumps(out_spec)}
    (d / "plan.json").write_text(json.dumps(doc, indent=1))
    files.append(d / "plan.json")
    write_manifest(d, files, secret)
    return d


def write_manifest(d: Path, files: Sequence[Path], secret: bytes | None) -> None:
    """List ``files`` (of directory ``d``) with their SHA-256 in its manifest, authenticated
    with ``secret`` (HMAC-SHA256) where one is given."""
    listed = {f.name: _sha256(f) for f in files}
    manifest: dict[str, Any] = {"format": FORMAT, "sha256": listed}
    if secret is not None:
        manifest["hmac_sha256"] = _manifest_mac(secret, listed)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(d: Path, names: Sequence[str], key: bytes | None = None) -> None:
    """Check ``names`` (files of plan directory ``d``) against its manifest before anything
    reads them: a missing, changed or unlisted file is refused; with ``key``, a manifest not
    authenticated with it too."""
    m = d / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST}: not a plan directory written by this version "
                            "of cm.save() (save it again)")
    try:
        doc = json.loads(m.read_text())
        listed = doc["sha256"]
        if not isinstance(listed, dict):
            raise TypeError("sha256 is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{m} is not a manifest ({e})") from None
    if key is not None:
        mac = doc.get("hmac_sha256")
        if not isinstance(mac, str):
            raise ArtifactError(f"{m} is not signed, and this side holds a token: whoever could change "
                                "the files could have rewritten their hashes. Save the plan with the "
                                "token (cm.save(dir, key=...) or $COACH_TOKEN)")
        if not hmac.compare_digest(mac, _manifest_mac(key, listed)):
            raise ArtifactError(f"{m} is not signed with this side's token: rewritten, or saved "
                                "with another token")
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


def plan_meta(path: str | Path, key: bytes | str | None = None) -> dict:
    """A saved plan's ``plan.json``, or an online model's ``online.json`` (its ``kind`` is
    ``"online"``), verified against the manifest like any file of it (with a token, ``key`` or
    ``$COACH_TOKEN``, the manifest must be signed with it); no half loaded."""
    from coach_fx.runtime.links.credentials import shared_token
    d = Path(path)
    name = ONLINE_FILE if (d / ONLINE_FILE).is_file() else "plan.json"
    if not (d / name).is_file():
        raise FileNotFoundError(f"{d} has no plan.json: not a directory written by cm.save() or om.save()")
    verify(d, [name], shared_token(key, required=False))
    try:
        meta = json.loads((d / name).read_text())
    except ValueError as e:
        raise ArtifactError(f"{d / name} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{d / name}: format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                            f"this version reads {FORMAT}")
    return meta


def load_half(path: str | Path, side: str, key: bytes | str | None = None) -> SavedHalf:
    """Load one half (``"end"`` or ``"cloud"``) of a saved plan, or the whole model (``"model"``,
    written with ``cm.save(dir, whole=True)``, for ``fallback="local"``). With a token
    (``key``, else ``$COACH_TOKEN``) the manifest must be signed with it."""
    from coach_fx.runtime.links.credentials import shared_token
    secret = shared_token(key, required=False)
    d = Path(path)
    if side not in ("end", "cloud", "model"):
        raise ValueError(f"side must be 'end', 'cloud' or 'model', got {side!r}")
    meta = plan_meta(d, secret)
    if meta.get("kind") == "online":
        raise ArtifactError(f"{d} holds an online model (om.save): serve and run it over TCP (coach serve / "
                            "coach run without --link gloo, or coach_fx.serve / coach_fx.connect)")
    boundary = boundary_from_json(meta["boundary"])
    if side == "cloud" and boundary.end_only:
        raise ValueError(f"{d} holds an end-only plan: there is no cloud half to serve")
    verify(d, [f"{side}.graph.json", f"{side}.tensors"], secret)
    module = load_exported(d / side)
    batched = None
    if side == "cloud" and meta.get("batched"):
        verify(d, ["cloud_batched.graph.json", "cloud_batched.tensors"], secret)
        batched = load_exported(d / "cloud_batched")
    return SavedHalf(module, boundary, meta, batched)


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
