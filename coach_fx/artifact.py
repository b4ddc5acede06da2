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
or ``torch.export.load`` (which unpickles), and every file is read through
:class:`PlanFiles`: the manifest (its size and SHA-256 for each file) is read and, where this
side holds a token (``coach serve``/``coach run`` always do), its HMAC under that token checked
first; then each file is opened once, its size checked against the manifest before a byte is
reserved, read into memory while it is hashed, and parsed from those same bytes only once the
hash matches. Nothing re-opens a file after checking it, so a file swapped while the loader
works changes nothing it loads, and a file larger than listed (a 2 GiB sparse one) is refused
unread. Whoever could rewrite the files and their hashes still cannot forge the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import coach_fx.passes.ops  # noqa: F401 - the halves call torch.ops.coach.*
from coach_fx.passes._compat import treespec_dumps, treespec_loads
from coach_fx.graphfile import DTYPES, LoadedHalf, build_half, parse_graph, parse_tensors, save_exported
from coach_fx.passes.boundary import Boundary, Crossing

#: 3: the manifest lists each file's size beside its SHA-256
FORMAT = 3
#: Every plan directory lists its files' SHA-256 here; nothing is read before they match.
MANIFEST = "manifest.json"
#: What an online model's plan directory holds instead of plan.json (``coach_fx.saved_online``).
ONLINE_FILE = "online.json"


class ArtifactError(ValueError):
    """A plan directory that is incomplete, altered or of another version."""


#: The largest manifest read, and the largest JSON file of a plan (a graph of a big model is a
#: few MB): a longer one is refused before it is read.
MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_BYTES = 256 << 20
#: Files are read and hashed this many bytes at a time.
READ_CHUNK = 1 << 20


def _manifest_mac(key: bytes, listed: dict, sizes: dict) -> str:
    body = json.dumps({"format": FORMAT, "sha256": listed, "bytes": sizes}, sort_keys=True).encode()
    return hmac.new(key, b"coach_fx manifest\0" + body, hashlib.sha256).hexdigest()


def _dtype(name: str | None) -> torch.dtype | None:
    """A dtype named in a plan file, from the same table as tensor files (nothing looked up by name)."""
    if name is None:
        return None
    dt = DTYPES.get(str(name).removeprefix("torch."))
    if dt is None:
        raise ArtifactError(f"plan.json: unknown dtype {name!r}")
    return dt


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
                        _dtype(c["dtype"]), c.get("codec"))
               for c in d["crossings"])
    return Boundary(cs, bool(d["end_only"]))


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
    from coach_fx.passes.imagecodec import max_payload_bytes

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
    """List ``files`` (of directory ``d``) with their SHA-256 and size in its manifest,
    authenticated with ``secret`` (HMAC-SHA256) where one is given."""
    listed, sizes = {}, {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
                h.update(chunk)
        listed[f.name], sizes[f.name] = h.hexdigest(), f.stat().st_size
    manifest: dict[str, Any] = {"format": FORMAT, "sha256": listed, "bytes": sizes}
    if secret is not None:
        manifest["hmac_sha256"] = _manifest_mac(secret, listed, sizes)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))


class PlanFiles:
    """A plan directory as its manifest lists it: the one reader of plan files.

    The manifest is read (at most ``MAX_MANIFEST_BYTES``) and, with a token (``key``, else
    ``$COACH_TOKEN``), its HMAC checked when this is made. Each file is then opened once: its
    size must be the listed one before anything is reserved, its bytes are hashed as they are
    read, and only bytes whose SHA-256 matches are parsed. Nothing is re-opened after its
    check, so swapping a file while the loader works cannot change what is loaded.

    Example::

        >>> files = PlanFiles("plan_dir", key=token)                # doctest: +SKIP
        >>> files.meta["boundary"]; half = files.half("cloud")      # doctest: +SKIP
    """

    def __init__(self, path: str | Path, key: bytes | str | None = None) -> None:
        from coach_fx.runtime.links.credentials import shared_token
        self.dir = Path(path)
        self.key = shared_token(key, required=False)
        m = self.dir / MANIFEST
        if not m.is_file():
            raise ArtifactError(f"{self.dir} has no {MANIFEST}: not a plan directory written by this version "
                                "of cm.save() (save it again)")
        try:
            doc = json.loads(_read_bounded(m, MAX_MANIFEST_BYTES))
            listed, sizes = doc["sha256"], doc["bytes"]
            if not isinstance(listed, dict) or not isinstance(sizes, dict) or set(listed) != set(sizes):
                raise TypeError("sha256 and bytes are not mappings of the same files")
            if not all(isinstance(v, str) for v in listed.values()) or \
                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
                raise TypeError("a hash that is not a string or a size that is not a count")
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{m} is not a manifest of this version ({type(e).__name__}: {e}); "
                                "save the plan again") from None
        if self.key is not None:
            mac = doc.get("hmac_sha256")
            if not isinstance(mac, str):
                raise ArtifactError(f"{m} is not signed, and this side holds a token: whoever could change "
                                    "the files could have rewritten their hashes. Save the plan with the "
                                    "token (cm.save(dir, key=...) or $COACH_TOKEN)")
            if not hmac.compare_digest(mac, _manifest_mac(self.key, listed, sizes)):
                raise ArtifactError(f"{m} is not signed with this side's token: rewritten, or saved "
                                    "with another token")
        self._listed: dict[str, str] = listed
        self._sizes: dict[str, int] = sizes
        self._meta: dict | None = None

    # ------------------------------------------------------------------ what it holds
    @property
    def meta(self) -> dict:
        """``plan.json``, or an online model's ``online.json`` (its ``kind`` is ``"online"``)."""
        if self._meta is None:
            name = ONLINE_FILE if ONLINE_FILE in self._listed else "plan.json"
            if name not in self._listed:
                raise FileNotFoundError(f"{self.dir} has no plan.json: not a directory written by cm.save() "
                                        "or om.save()")
            meta = self.json(name)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ArtifactError(f"{self.dir / name}: format "
                                    f"{meta.get('format') if isinstance(meta, dict) else '?'}, this version "
                                    f"reads {FORMAT} (save the plan again)")
            self._meta = meta
        return self._meta

    @property
    def online(self) -> bool:
        """Whether this is an online model's directory (``om.save``)."""
        return self.meta.get("kind") == "online"

    def has(self, name: str) -> bool:
        return name in self._listed

    # ------------------------------------------------------------------ reading
    def read(self, name: str, limit: int | None = None) -> bytes:
        """File ``name``'s bytes, checked (at most ``limit`` bytes: a longer listing is refused
        unread)."""
        size = self._size(name, limit)
        buf = bytearray(size)
        self._read_into(name, memoryview(buf), size)
        return bytes(buf)

    def json(self, name: str) -> Any:
        """File ``name`` (at most ``MAX_JSON_BYTES``), checked, as JSON."""
        data = self.read(name, MAX_JSON_BYTES)
        try:
            return json.loads(data)
        except ValueError as e:
            raise ArtifactError(f"{self.dir / name} is not JSON ({e})") from None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A tensor file's tensors, read once into one buffer while hashed, and parsed from it
        once the hash matches (tensors at aligned offsets share the buffer)."""
        size = self._size(name)
        buf = torch.empty(size, dtype=torch.uint8)
        if size:
            self._read_into(name, memoryview(buf.numpy()), size)
        return parse_tensors(buf, str(self.dir / name))

    def half(self, stem: str, store: dict[str, torch.Tensor] | None = None) -> LoadedHalf:
        """A saved half: ``<stem>.graph.json`` with its own ``<stem>.tensors``, or with the
        tensors it names in the shared ``store``."""
        source = str(self.dir / f"{stem}.graph.json")
        doc = parse_graph(self.read(f"{stem}.graph.json", MAX_JSON_BYTES), source)
        own = None if doc.get("store") else self.tensors(f"{stem}.tensors")
        return build_half(doc, own if own is not None else store, source)

    def _size(self, name: str, limit: int | None = None) -> int:
        f = self.dir / name
        if name not in self._listed:
            raise ArtifactError(f"{f} is not listed in {self.dir / MANIFEST}")
        size = self._sizes[name]
        if limit is not None and size > limit:
            raise ArtifactError(f"{f}: listed at {size} bytes; a plan's {name} is at most {limit}")
        return size

    def _read_into(self, name: str, view: memoryview, size: int) -> None:
        """Fill ``view`` with file ``name``, hashing as it reads; the file must be a regular
        file of exactly ``size`` bytes whose SHA-256 is the listed one."""
        f = self.dir / name
        try:   # non-blocking: a FIFO planted in the directory must not hang the loader
            fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ArtifactError(f"{f} is missing") from None
        except OSError as e:
            raise ArtifactError(f"{f}: {e.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{f} is not a regular file")
            if st.st_size != size:
                raise ArtifactError(f"{f} does not match its size and SHA-256 in {self.dir / MANIFEST}: it is "
                                    f"{st.st_size} bytes, the manifest lists {size} (changed since it was "
                                    "saved; refused unread)")
            h = hashlib.sha256()
            got = 0
            while got < size:
                k = fh.readinto(view[got:min(size, got + READ_CHUNK)])
                if not k:
                    break
                h.update(view[got:got + k])
                got += k
            if got != size or fh.read(1):
                raise ArtifactError(f"{f} changed size while it was read")
        if not hmac.compare_digest(h.hexdigest(), self._listed[name]):
            raise ArtifactError(f"{f} does not match its SHA-256 in {self.dir / MANIFEST}: changed since "
                                "it was saved")


def _read_bounded(path: Path, limit: int) -> bytes:
    """A small file (the manifest), refused if longer than ``limit``, read once."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"longer than {limit} bytes")
    return data


def plan_meta(path: str | Path, key: bytes | str | None = None) -> dict:
    """A saved plan's ``plan.json``, or an online model's ``online.json`` (its ``kind`` is
    ``"online"``), verified against the manifest (with a token, ``key`` or ``$COACH_TOKEN``,
    the manifest must be signed with it); no half loaded."""
    return PlanFiles(path, key).meta


def load_half(path: "str | Path | PlanFiles", side: str, key: bytes | str | None = None) -> SavedHalf:
    """Load one half (``"end"`` or ``"cloud"``) of a saved plan, or the whole model (``"model"``,
    written with ``cm.save(dir, whole=True)``, for ``fallback="local"``). With a token
    (``key``, else ``$COACH_TOKEN``) the manifest must be signed with it."""
    if side not in ("end", "cloud", "model"):
        raise ValueError(f"side must be 'end', 'cloud' or 'model', got {side!r}")
    files = path if isinstance(path, PlanFiles) else PlanFiles(path, key)
    meta = files.meta
    if files.online:
        raise ArtifactError(f"{files.dir} holds an online model (om.save): serve and run it over TCP (coach "
                            "serve / coach run without --link gloo, or coach_fx.serve / coach_fx.connect)")
    boundary = boundary_from_json(meta["boundary"])
    if side == "cloud" and boundary.end_only:
        raise ValueError(f"{files.dir} holds an end-only plan: there is no cloud half to serve")
    module = files.half(side)
    batched = files.half("cloud_batched") if side == "cloud" and meta.get("batched") else None
    return SavedHalf(module, boundary, meta, batched)


def make_frames(input_specs: list[dict], n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random frames matching the saved input specs (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for k, spec in enumerate(input_specs):
        check_shape(spec["shape"], f"input {k}")
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
