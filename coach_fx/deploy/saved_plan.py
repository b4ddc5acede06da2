"""A plan directory opened once, verified, as one typed record: :class:`SavedPlan`, built only
by :func:`open_plan` (``tests/coach_fx/test_house.py`` checks that nothing else constructs it,
and that nothing else makes the verified reader, ``coach_fx.deploy.files.PlanFiles``).

``coach serve``, ``coach run``, ``coach_fx.serve``, ``coach_fx.connect`` and the Ray replicas all
read a plan directory through it; each asks for the side it runs, and only that side's halves
are read (and hashed) from disk.

Example::

    >>> saved = open_plan("plan_dir", "cloud", key=token)          # doctest: +SKIP
    >>> saved.kind, sorted(saved.cloud), saved.cloud_slowdown       # doctest: +SKIP
    ('online', [0, 1, 2], 1.0)
    >>> end = open_plan("plan_dir", "end", key=token, whole=True)  # doctest: +SKIP
    >>> policy = end.end_policy("full"); y = end.whole(*frame)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from coach_fx.deploy.files import FORMAT, ONLINE_FILE, PLAN_FILE, STORE, ArtifactError, PlanFiles
from coach_fx.deploy.schema import (InputSpec, bands_from_json, boundary_from_json, inputs_from_json,
                                    variant_from_json)
from coach_fx.passes._compat import treespec_loads
from coach_fx.passes.boundary import Boundary
from coach_fx.runtime.cloud import CloudHalf
from coach_fx.runtime.plans import EndHalf, FinishOnEnd, OnlinePlans

#: What a plan directory holds: one compiled plan (``cm.save``) or an online model (``om.save``).
KINDS = ("compiled", "online")
#: What ``open_plan`` may load: nothing but the metadata, the end side or the cloud side.
SIDES = ("meta", "end", "cloud")


@dataclass(frozen=True)
class SavedPlan:
    """One side of a saved plan directory, every file it read checked against the manifest.

    Always: ``kind`` (``"compiled"`` or ``"online"``), the input specs, the output structure,
    the devices' slowdowns and the cloud's device, and whether the whole model was saved.
    Side ``"end"``: ``end`` (a compiled plan's end half) or ``plans`` (an online model's
    every plan with its halves, bands and controller settings). Side ``"cloud"``: ``cloud``,
    plan id -> cloud half (one for a compiled plan, one per plan that reaches the cloud).
    ``whole``: the whole model, where asked for (``fallback="local"``)."""

    dir: Path
    kind: str
    side: str
    inputs: tuple[InputSpec, ...]
    out_spec: Any
    end_slowdown: float
    cloud_slowdown: float
    cloud_device: str
    has_whole: bool
    #: a compiled plan's boundary (what crosses, how); None for an online model (per plan)
    boundary: Boundary | None = None
    #: a compiled plan's predicted stage times (``CompiledModel.predicted``), for run stats
    predicted: dict | None = None
    end: Any = None
    plans: OnlinePlans | None = None
    cloud: Mapping[int, CloudHalf] = field(default_factory=dict)
    whole: Any = None

    @property
    def online(self) -> bool:
        return self.kind == "online"

    @property
    def end_only(self) -> bool:
        """Whether every plan runs the whole model on the end: nothing to send to a cloud."""
        if self.boundary is not None:
            return self.boundary.end_only
        return self.plans is not None and all(v.end_only for v in self.plans.variants.values())

    def end_policy(self, mode: str | None = None) -> Any:
        """The end side's policy: a compiled plan's ``StaticPolicy``, or an online model's
        ``OnlinePolicy`` in ``mode`` (default ``"full"``; ``runtime.config.MODES``)."""
        from coach_fx.runtime.policy import OnlinePolicy, StaticPolicy
        if self.side != "end":
            raise ValueError(f"{self.dir} was opened for its {self.side} side: open_plan(..., 'end') for a policy")
        if self.online:
            return OnlinePolicy.of(self.plans, mode or "full")
        if mode is not None:
            raise ValueError(f"mode= is for an online model; {self.dir} holds one compiled plan")
        if self.boundary.end_only:
            raise ValueError(f"{self.dir} holds an end-only plan: nothing to send to a cloud")
        return StaticPolicy(self.end, self.boundary)


def open_plan(path: str | Path, side: str = "meta", *, key: bytes | str | None = None,
              whole: bool = False) -> SavedPlan:
    """Open plan directory ``path`` for ``side`` (``"meta"``: no half; ``"end"``; ``"cloud"``),
    its manifest verified (with a token, ``key`` else ``$COACH_TOKEN``, it must be signed with
    it) and each file it reads checked before it is parsed; ``whole``: also the whole model
    (saved with ``whole=True``). Raises ``ArtifactError`` for a directory that is incomplete,
    altered, malformed or of another version."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    files = PlanFiles(path, key)
    kind = "online" if files.has(ONLINE_FILE) else "compiled"
    name = ONLINE_FILE if kind == "online" else PLAN_FILE
    if not files.has(name):
        raise ArtifactError(f"{files.dir} has no {PLAN_FILE}: not a directory written by cm.save() or om.save()")
    meta = files.json(name)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{files.dir / name}: format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                            f"this version reads {FORMAT} (save the plan again)")
    if meta.get("kind", kind) != kind:
        raise ArtifactError(f"{files.dir / name} says kind {meta.get('kind')!r}, its file name {kind!r}")
    try:   # a field missing or of the wrong type (a bad value is refused by name where it is read)
        return _record(files, kind, side, meta, whole)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ArtifactError(f"{files.dir / name} is malformed ({type(e).__name__}: {e})") from None


def _record(files: PlanFiles, kind: str, side: str, meta: dict, whole: bool) -> SavedPlan:
    has_whole = files.has("model.graph.json")
    if whole and not has_whole:
        raise ValueError(f"fallback='local' needs the whole model in {files.dir}: save it with "
                         f"{'om' if kind == 'online' else 'cm'}.save(dir, whole=True)")
    store = files.tensors(STORE) if kind == "online" and side != "meta" else None
    head = dict(dir=files.dir, kind=kind, side=side, inputs=inputs_from_json(meta["inputs"]),
                out_spec=treespec_loads(meta["out_spec"]), end_slowdown=float(meta["end"]["slowdown"]),
                cloud_slowdown=float(meta["cloud"]["slowdown"]),
                cloud_device=str(meta["cloud"].get("device", "cpu")), has_whole=has_whole,
                whole=files.half("model", store) if whole else None)
    if kind == "online":
        return _online(files, side, meta, store, head)
    boundary = boundary_from_json(meta["boundary"])
    out = dict(head, boundary=boundary, predicted=meta.get("predicted"))
    if side == "end":
        out["end"] = files.half("end")
    elif side == "cloud":
        if boundary.end_only:
            raise ValueError(f"{files.dir} holds an end-only plan: there is no cloud half to serve")
        half = files.half("cloud")   # first: a refused graph stops the load before anything is built
        out["cloud"] = {0: CloudHalf(half, boundary, files.half("cloud_batched") if meta.get("batched") else None)}
    return SavedPlan(**out)


def _online(files: PlanFiles, side: str, meta: dict, store: Any, head: dict) -> SavedPlan:
    """An online model's side: every plan's cloud half by id, or every variant with its halves."""
    cloud, variants = {}, {}
    for pid_s, rec in meta["plans"].items():
        pid = int(pid_s)
        v = variant_from_json(pid, rec)
        if side == "cloud":
            if not v.end_only:
                m = files.half(f"p{pid}_cloud", store)
                cloud[pid] = CloudHalf(m, v.boundary, m if rec["batched"] else None)
        elif side == "end":
            split = ((files.half(f"p{pid}_head", store), files.half(f"p{pid}_tail", store))
                     if rec["lookup_split"] else None)
            v.end = EndHalf(files.half(f"p{pid}_end", store), split)
            if rec["finish_on_end_s"] is not None:
                v.finish_on_end = FinishOnEnd(files.half(f"p{pid}_cloud", store), float(rec["finish_on_end_s"]))
        variants[pid] = v
    if side == "cloud" and not cloud:
        raise ValueError(f"{files.dir}: every plan of this online model runs on the end: nothing to serve")
    plans = None
    if side == "end":
        online = meta["online"]
        plans = OnlinePlans(variants, bands_from_json(meta["bands"]), int(online["hold"]),
                            int(online["capacity"]), float(online["audit_rate"]), head["end_slowdown"])
    return SavedPlan(**head, cloud=cloud, plans=plans)


__all__ = ["KINDS", "SIDES", "SavedPlan", "open_plan"]
