"""The bytes of a plan directory: its manifest, and the one reader of its files.

Every file a plan directory holds (``coach_fx.deploy.save`` writes them) is listed in
``manifest.json`` with its size and SHA-256, the list authenticated with the shared token
(HMAC-SHA256) when one is given or set in ``$COACH_TOKEN``. No file of a plan directory is
code: nothing is written or read with pickle, ``torch.load`` or ``torch.export.load`` (which
unpickles), and every file is read through :class:`PlanFiles`: the manifest is read and, where
this side holds a token (``coach serve``/``coach run`` always do), its HMAC under that token
checked first; then each file is opened once, its size checked against the manifest before a
byte is reserved, read into memory while it is hashed, and parsed from those same bytes only
once the hash matches. Nothing re-opens a file after checking it, so a file swapped while the
loader works changes nothing it loads, and a file larger than listed (a 2 GiB sparse one) is
refused unread. Whoever could rewrite the files and their hashes still cannot forge the HMAC.

Only ``coach_fx.deploy.saved_plan.open_plan`` makes a :class:`PlanFiles`
(``tests/coach_fx/test_house.py`` checks it): everything else gets a typed ``SavedPlan``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any, Sequence

import torch

import coach_fx.passes.ops  # noqa: F401 - the halves call torch.ops.coach.*
from coach_fx.deploy.graphfile import LoadedHalf, build_half, parse_graph, parse_tensors

#: 3: the manifest lists each file's size beside its SHA-256
FORMAT = 3
#: Every plan directory lists its files' SHA-256 here; nothing is read before they match.
MANIFEST = "manifest.json"
#: A compiled plan's metadata (``cm.save``), and what an online model's directory holds instead
#: (``om.save``); one of them is in every plan directory.
PLAN_FILE = "plan.json"
ONLINE_FILE = "online.json"
#: The shared tensor store of an online plan directory (every plan's weights, once).
STORE = "weights.tensors"


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
        >>> files.json("plan.json")["boundary"]; half = files.half("cloud")   # doctest: +SKIP
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

    # ------------------------------------------------------------------ what it holds
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
