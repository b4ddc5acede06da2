"""An online model's plan directory (``OnlineModel.save``): every plan's halves, their weights
stored once, and everything the end side's online policy needs, as data.

    dir/online.json        kind "online": the plans' run-time records (sizes, stage times,
                           safe bits, cache setups, measured end times), the bands, the
                           controller's settings, input specs, output structure, devices
    dir/weights.tensors    every tensor of every graph below, once (``graphfile``'s shared
                           store: the plans share the model's weights on disk as in memory)
    dir/p<id>_end.*        plan <id>'s end half (inputs -> its crossing values, unquantized)
    dir/p<id>_head.*       where its cache looks up before the cut: the end half up to there,
    dir/p<id>_tail.*       and the rest of it
    dir/p<id>_cloud.*      its cloud half on the crossing values (a free batch dimension where
                           it exports so): the server runs it on dequantized requests, the end
                           runs it to finish a request the link has no room for
    dir/model.*            the whole model (``whole=True``: for ``fallback="local"``)
    dir/manifest.json      SHA-256 of each file, signed with the token (``coach_fx.artifact``)

Nothing is pickled; every file is checked against the manifest before it is read.

Example::

    >>> om.save("online_dir", key=token)                                          # doctest: +SKIP
    >>> saved = load_online("online_dir", "end", key=token)                        # doctest: +SKIP
    >>> policy = OnlinePolicy.of(saved.plans, "full")                              # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coach_fx.passes._compat import treespec_dumps
from coach_fx.artifact import (FORMAT, ONLINE_FILE, ArtifactError, PlanFiles, SavedMeta, boundary_from_json,
                               boundary_to_json, export_batched, write_manifest)
from coach_fx.graphfile import save_exported, write_store
from coach_fx.runtime.cloud import CloudHalf
from coach_fx.runtime.config import Bands
from coach_fx.runtime.plans import (CacheSetup, CrossingBits, CutProfile, EndHalf, EndTimes, FinishOnEnd,
                                    OnlinePlans, Variant)
from coach_fx.runtime.policy import as_tuple
from coach_fx.runtime.links.credentials import shared_token

if TYPE_CHECKING:
    from coach_fx.online import OnlineModel

#: The shared tensor store of an online plan directory.
STORE = "weights.tensors"


@dataclass
class SavedOnline(SavedMeta):
    """One side of a saved online model: ``plans`` (the end side: every variant with its
    halves) or ``cloud`` (the cloud side: every plan's cloud half by id), and ``whole`` where
    asked for and saved."""

    meta: dict
    plans: OnlinePlans | None = None
    cloud: dict[int, CloudHalf] = field(default_factory=dict)
    whole: Any = None


def save_online(om: "OnlineModel", path: str | Path, *, key: bytes | str | None = None,
                whole: bool = False) -> Path:
    """Write ``om`` to plan directory ``path`` (see the module docstring)."""
    secret = shared_token(key, required=False)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    x = tuple(om.example_inputs)
    store: dict[str, torch.Tensor] = {}
    files: list[Path] = []

    def export(module: Any, inputs: tuple, stem: str) -> None:
        files.extend(save_exported(torch.export.export(module, inputs), d / stem, store))

    records = {}
    with torch.no_grad():
        if whole:
            export(om.gm, x, "model")
        for pid, v in om.variants.items():
            export(v.end.module, x, f"p{pid}_end")
            if v.end.lookup_split is not None:
                head, tail = v.end.lookup_split
                export(head, x, f"p{pid}_head")
                export(tail, tuple(head(*x)), f"p{pid}_tail")
            batched = False
            if not v.end_only:
                cloud, boundary = om.cloud[pid]
                payload = as_tuple(v.end.module(*x))
                ep = export_batched(cloud, boundary, payload)   # a free batch: the server batches
                batched = ep is not None
                ep = ep or torch.export.export(cloud, payload)
                files.extend(save_exported(ep, d / f"p{pid}_cloud", store))
            records[str(pid)] = {**variant_to_json(v), "batched": batched,
                                 "plan": om.plans[pid].as_dict()}
    files.append(write_store(store, d / STORE))
    s = om.settings
    doc = {"format": FORMAT, "kind": "online", "plans": records,
           "bands": {"plain": asdict(om.bands[False]), "cache": asdict(om.bands[True])},
           "online": {"hold": s.online.hold, "capacity": s.online.capacity,
                      "audit_rate": s.online.audit_rate},
           "end": {"name": s.end.name, "slowdown": s.end.slowdown},
           "cloud": {"name": s.cloud.name, "slowdown": s.cloud.slowdown, "device": s.cloud.device},
           "network": {"uplink_mbps": s.network.uplink_mbps, "rtt_ms": s.network.rtt_ms},
           "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in x],
           "out_spec": treespec_dumps(om.out_spec), "whole": whole}
    (d / ONLINE_FILE).write_text(json.dumps(doc, indent=1))
    files.append(d / ONLINE_FILE)
    write_manifest(d, files, secret)
    return d


def load_online(path: "str | Path | PlanFiles", side: str, key: bytes | str | None = None,
                whole: bool = False) -> SavedOnline:
    """Read one side (``"end"`` or ``"cloud"``) of a saved online model, every file checked
    against the manifest as it is read (with a token, ``key`` or ``$COACH_TOKEN``, it must be
    signed with it); ``whole``: also the whole model (the end side's ``fallback="local"``)."""
    if side not in ("end", "cloud"):
        raise ValueError(f"side must be 'end' or 'cloud', got {side!r}")
    files = path if isinstance(path, PlanFiles) else PlanFiles(path, key)
    d, meta = files.dir, files.meta
    if not files.online:
        raise ArtifactError(f"{d} holds one compiled plan, not an online model (load it with load_half)")
    if whole and not meta.get("whole"):
        raise ValueError(f"fallback='local' needs the whole model in {d}: save it with om.save(dir, whole=True)")
    store = files.tensors(STORE)

    def load(stem: str) -> Any:
        return files.half(stem, store)

    out = SavedOnline(meta, whole=load("model") if whole else None)
    variants = {}
    try:
        for pid_s, rec in meta["plans"].items():
            pid = int(pid_s)
            v = variant_from_json(pid, rec)
            if side == "cloud":
                if not v.end_only:
                    m = load(f"p{pid}_cloud")
                    out.cloud[pid] = CloudHalf(m, v.boundary, m if rec["batched"] else None)
                continue
            split = (load(f"p{pid}_head"), load(f"p{pid}_tail")) if rec["lookup_split"] else None
            v.end = EndHalf(load(f"p{pid}_end"), split)
            if rec["finish_on_end_s"] is not None:
                v.finish_on_end = FinishOnEnd(load(f"p{pid}_cloud"), rec["finish_on_end_s"])
            variants[pid] = v
        bands = {False: _bands(meta["bands"]["plain"]), True: _bands(meta["bands"]["cache"])}
        online = meta["online"]
        if side == "end":
            out.plans = OnlinePlans(variants, bands, int(online["hold"]), int(online["capacity"]),
                                    float(online["audit_rate"]), float(meta["end"]["slowdown"]))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{d / ONLINE_FILE} is malformed ({type(e).__name__}: {e})") from None
    return out


# ------------------------------------------------------------------------------ records as JSON
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


def _bands(d: dict) -> Bands:
    return Bands(tuple(float(e) for e in d["edges_mbps"]),
                 _ints(d["plans"]) if d["plans"] is not None else None, int(d["start"]))


def _ints(xs: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in xs)


__all__ = ["STORE", "SavedOnline", "load_online", "save_online", "variant_from_json", "variant_to_json"]


def cloud_halves(path: "str | Path | PlanFiles",
                 key: bytes | str | None = None) -> tuple[dict[int, CloudHalf], dict]:
    """What a server serves from a plan directory, verified with ``key`` (else
    ``$COACH_TOKEN``): plan id -> cloud half (one for ``cm.save``, one per plan that reaches
    the cloud for ``om.save``), and the directory's metadata (``PlanFiles.meta``)."""
    from coach_fx.artifact import load_half
    files = path if isinstance(path, PlanFiles) else PlanFiles(path, key)
    if files.online:   # every plan's cloud half; requests carry their plan id and bits
        halves = load_online(files, "cloud").cloud
        if not halves:
            raise ValueError(f"{files.dir}: every plan of this online model runs on the end: nothing to serve")
        return halves, files.meta
    half = load_half(files, "cloud")
    return {0: CloudHalf(half.module, half.boundary, half.batched)}, files.meta
