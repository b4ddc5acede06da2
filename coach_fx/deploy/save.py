"""Writing plan directories: ``cm.save(dir)`` (one compiled plan) and ``om.save(dir)`` (an
online model's every plan). Each half is written on its own, so that each side loads only its
own (``coach_fx.deploy.saved_plan.open_plan``).

A compiled plan (``save_compiled``)::

    dir/plan.json         kind "compiled": the plan, the boundary (what crosses, how), input
                          specs, output structure, devices, network, predicted stage times
    dir/end.graph.json    the end half: its exported graph and its tensors
    dir/end.tensors       (``coach_fx.deploy.graphfile``: JSON and raw bytes, no pickle)
    dir/cloud.*           the cloud half (absent for an end-only plan)
    dir/cloud_batched.*   the cloud half on dequantized inputs with a free batch dimension
                          (the server batches requests of many ends through it; absent where
                          the half does not export that way: then it serves one at a time)
    dir/model.*           the whole model (only with ``whole=True``: for ``fallback="local"``)
    dir/manifest.json     size and SHA-256 of every file above, signed with the shared token
                          (``coach_fx.deploy.files``)

An online model (``save_online``)::

    dir/online.json        kind "online": the plans' run-time records (sizes, stage times,
                           safe bits, cache setups, measured end times), the bands, the
                           controller's settings, input specs, output structure, devices
    dir/weights.tensors    every tensor of every graph below, once (the plans share the
                           model's weights on disk as in memory)
    dir/p<id>_end.*        plan <id>'s end half (inputs -> its crossing values, unquantized)
    dir/p<id>_head.*       where its cache looks up before the cut: the end half up to there,
    dir/p<id>_tail.*       and the rest of it
    dir/p<id>_cloud.*      its cloud half on the crossing values (a free batch dimension where
                           it exports so): the server runs it on dequantized requests, the end
                           runs it to finish a request the link has no room for
    dir/model.*            the whole model (``whole=True``: for ``fallback="local"``)
    dir/manifest.json

Example::

    >>> cm.save("plan_dir", key=token)      # save_compiled(cm, "plan_dir", key=token)  # doctest: +SKIP
    >>> om.save("online_dir", key=token)    # save_online(om, "online_dir", key=token)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from coach_fx.deploy.files import FORMAT, ONLINE_FILE, PLAN_FILE, STORE, write_manifest
from coach_fx.deploy.graphfile import save_exported, write_store
from coach_fx.deploy.schema import bands_to_json, boundary_to_json, inputs_to_json, variant_to_json
from coach_fx.passes._compat import treespec_dumps
from coach_fx.passes.boundary import Boundary
from coach_fx.runtime.links.credentials import shared_token
from coach_fx.runtime.policy import as_tuple

if TYPE_CHECKING:
    from coach_fx.compiled import CompiledModel
    from coach_fx.online import OnlineModel
    from coach_fx.settings import Settings

#: The largest batch an exported batched cloud half takes.
MAX_BATCH = 1024


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


def _devices(s: "Settings") -> dict:
    """The devices and the network of a plan file (what ``open_plan`` reads back)."""
    return {"end": {"name": s.end.name, "slowdown": s.end.slowdown},
            "cloud": {"name": s.cloud.name, "slowdown": s.cloud.slowdown, "device": s.cloud.device},
            "network": {"uplink_mbps": s.network.uplink_mbps, "downlink_mbps": s.network.down_mbps,
                        "rtt_ms": s.network.rtt_ms, "efficiency": s.network.efficiency}}


def save_compiled(cm: "CompiledModel", path: str | Path, *, whole: bool = False,
                  key: bytes | str | None = None) -> Path:
    """Write ``cm`` to plan directory ``path`` (see the module docstring); ``key`` (default
    ``$COACH_TOKEN``; none: unsigned) signs its manifest."""
    secret = shared_token(key, required=False)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    x, boundary = tuple(cm.example_inputs), cm.boundary
    files: list[Path] = []
    batched = False
    with torch.no_grad():
        files += save_exported(torch.export.export(cm.end_module, x), d / "end")
        if whole:   # for fallback="local": the end device can run everything
            files += save_exported(torch.export.export(cm.gm, x), d / "model")
        if not boundary.end_only:
            payload = cm.end_module(*x)
            files += save_exported(torch.export.export(cm.cloud_module, tuple(payload),
                                                       dynamic_shapes=_payload_dims(boundary)), d / "cloud")
            ep = export_batched(cm.batched_cloud_module, boundary, payload)
            if ep is not None:
                files += save_exported(ep, d / "cloud_batched")
            batched = ep is not None
    doc = {"format": FORMAT, "kind": "compiled", "plan": cm.plan.as_dict(), **_devices(cm.settings),
           "predicted": cm.predicted(), "batched": batched, "whole": whole,
           "boundary": boundary_to_json(boundary), "inputs": inputs_to_json(x),
           "out_spec": treespec_dumps(cm.out_spec)}
    (d / PLAN_FILE).write_text(json.dumps(doc, indent=1))
    write_manifest(d, files + [d / PLAN_FILE], secret)
    return d


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
    doc = {"format": FORMAT, "kind": "online", "plans": records, "bands": bands_to_json(om.bands),
           "online": {"hold": s.online.hold, "capacity": s.online.capacity,
                      "audit_rate": s.online.audit_rate},
           **_devices(s), "inputs": inputs_to_json(x), "out_spec": treespec_dumps(om.out_spec),
           "whole": whole}
    (d / ONLINE_FILE).write_text(json.dumps(doc, indent=1))
    write_manifest(d, files + [d / ONLINE_FILE], secret)
    return d


__all__ = ["MAX_BATCH", "export_batched", "save_compiled", "save_online"]
