"""``coach_fx.train_cut``: train a cut to be small, then let the planner price it.

Split computing barely beats sending a JPEG unless the tensor that crosses is trained to be
small (the supervised-compression literature: SC2, Entropic Student, FrankenSplit). At a few
candidate cuts (the model's image input and early articulation points of its DAG, or the
nodes named) a bottleneck is inserted (``passes.bottleneck``: an encoder the end runs, a
decoder on the cloud) and trained by distillation from the unchanged model (the teacher): its
outputs' KL divergence (soft labels at ``temperature``) plus each decoder's reconstruction of
what its encoder saw, with the crossing's own quantizer in the loop (straight through, at bits
drawn per step from ``bits``). The teacher's weights stay frozen unless ``finetune``.

The result is the model with its bottlenecks (an ``fx.GraphModule``): compiling it with
``reference=`` the original model (what ``train_cut(cm, ...)`` does for a ``CompiledModel``)
lets the exact search price each code like any crossing (coded bytes, the encoder and decoder
timed as nodes), and the accuracy budget is then measured against the original model, so the
bottlenecks' own error counts too.

Reproducible from ``seed`` (initial weights, the bits drawn; the data's order is the loader's),
resumable (``checkpoint``: a safetensors file of the trained weights, the optimizer's state
and the step, written every ``checkpoint_every`` steps and at the end; a run with the same
recipe continues from it), with a progress bar.

Example::

    >>> student = coach_fx.train_cut(model, loader, epochs=2)                          # doctest: +SKIP
    >>> cm = coach_fx.compile(student, (x,), calibration=(xc, yc), reference=model)     # doctest: +SKIP
    >>> cm2 = coach_fx.train_cut(cm, loader)    # the same, re-planned with cm's settings  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from coach_fx.passes._compat import tree_flatten
from coach_fx.passes.annotate import meta
from coach_fx.passes.bottleneck import ARCHITECTURE, BottleneckSpec, bottlenecks, init_from, insert_bottlenecks
from coach_fx.progress import Progress
from coach_fx.settings import Settings


@dataclass(frozen=True)
class CutTraining:
    """How ``train_cut`` trains (its keywords).

    ``cuts``: node names to put bottlenecks after (a model input's name included; None: chosen,
    ``candidates`` of them: an image input, then the ends of the first stages (the last
    articulation point at each spatial size) within the first ``span`` of the model's FLOPs). A code has ``channels // reduction`` channels (at
    least 2) at a feature map, ``input_channels`` channels per ``input_stride`` x
    ``input_stride`` pixels at an image input.
    """

    cuts: Sequence[str] | None = None
    candidates: int = 3
    span: float = 0.4
    reduction: int = 16
    input_channels: int = 8
    input_stride: int = 4
    bits: Sequence[int] = (2, 3, 4, 6, 8)
    epochs: int = 2
    lr: float = 3e-3
    temperature: float = 2.0
    #: also train the teacher's layers after the bottlenecks (the cloud's side of every cut:
    #: they learn to read the restored tensor), not only the bottlenecks themselves
    finetune: bool = False
    seed: int = 0
    checkpoint: str | Path | None = None
    checkpoint_every: int = 100
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.candidates < 1 or self.reduction < 1:
            raise ValueError(f"epochs, candidates and reduction must be >= 1, got {self.epochs}, "
                             f"{self.candidates}, {self.reduction}")
        if not self.bits or any(b not in (2, 3, 4, 5, 6, 8, 16) for b in self.bits):
            raise ValueError(f"bits must be quantized widths (2-8, 16), got {tuple(self.bits)}")
        if not 0 < self.span <= 1:
            raise ValueError(f"span must be in (0, 1], got {self.span}")

    def recipe(self) -> dict:
        """What a checkpoint must have been trained with to be resumed."""
        d = dataclasses.asdict(self)
        for k in ("checkpoint", "checkpoint_every", "progress"):
            d.pop(k)
        d["cuts"] = list(d["cuts"]) if d["cuts"] is not None else None
        d["bits"] = list(d["bits"])
        d["architecture"] = ARCHITECTURE
        return d


@dataclass(frozen=True)
class TrainedCut:
    """One trained bottleneck: after which node, its shape, and the code's shape per request."""

    after: str
    spec: BottleneckSpec
    code_shape: tuple[int, ...]


def train_cut(model: Any, data: Iterable[Any], example_inputs: Any = None, **options: Any) -> Any:
    """Train bottlenecks at candidate cuts of ``model`` by distillation (module docstring).

    ``model``: an ``nn.Module`` (the trained student is returned: an ``fx.GraphModule`` whose
    ``meta["coach_cuts"]`` lists the :class:`TrainedCut`\\ s; compile it with
    ``reference=model``), or a ``CompiledModel`` (trained, then compiled again with its
    settings and ``reference`` its model: the new ``CompiledModel`` is returned). ``data``: a
    re-iterable of batches (a ``DataLoader``): input tensors, or tuples whose first item is the
    input (labels are not needed). ``example_inputs``: default the first batch's first sample.
    ``options``: the fields of :class:`CutTraining`.
    """
    from coach_fx.compiled import CompiledModel, example_tuple
    from coach_fx.driver import traced

    opts = CutTraining(**options)
    compiled = model if isinstance(model, CompiledModel) else None
    if compiled is not None:
        example, gm = compiled.example_inputs, compiled.gm
    else:
        example = example_tuple(example_inputs) if example_inputs is not None else \
            tuple(v[:1] for v in _inputs_of(next(iter(data))))
        gm, example = traced(model, example, Settings.of(costs="analytic", progress=False))
    points = choose_cuts(gm, opts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        student = insert_bottlenecks(gm, points)
    features = _features(gm, list(points), data)
    for (enc, dec), (name, spec) in zip(bottlenecks(student), points.items()):
        init_from(enc, dec, features[name], spec)
    _train(gm, student, data, opts)
    student.eval()
    student.meta["coach_cuts"] = tuple(TrainedCut(name, spec, spec.code_shape(meta(_node(gm, name)).shape))
                                       for name, spec in points.items())
    if compiled is None:
        return student
    from coach_fx.api import compile_with
    return compile_with(student, compiled.example_inputs,
                        compiled.settings.replace(reference=compiled.gm))


# ---------------------------------------------------------------------------------- the cuts
def choose_cuts(gm: fx.GraphModule, opts: CutTraining) -> dict[str, BottleneckSpec]:
    """Where bottlenecks go: ``opts.cuts``, or an image input and the ends of the first stages
    (4-D float outputs of at least 8 channels within the first ``opts.span`` of the FLOPs)."""
    from coach_fx.dag import LayerDAG
    names = list(opts.cuts) if opts.cuts is not None else None
    if names is None:
        zero: dict[str, float] = {}
        dag = LayerDAG.from_graph_module(gm, zero, zero)
        names = [x for x in dag.inputs if _spec(gm, x, opts) is not None][:1]
        total = sum(dag.info[v].flops for v in dag.nodes) or 1.0
        done, share = 0.0, {}
        for v in dag.nodes:
            done += dag.info[v].flops
            share[v] = done / total
        arts = set(dag.articulation_nodes())
        # per spatial size the narrowest articulation point (the last of equals: a stage's
        # end, or an inverted residual's output rather than its expansion), so that the
        # candidates sit at different resolutions, never one layer apart; a code no smaller
        # than the image's would not be worth its end-side layers
        code = lambda v: math.prod(_spec(gm, v, opts).code_shape(meta(_node(gm, v)).shape))  # noqa: E731
        most = min((code(x) for x in names), default=math.inf)
        ends: dict[tuple, str] = {}
        for v in dag.nodes:
            if v in arts and share[v] <= opts.span and _spec(gm, v, opts) is not None and code(v) < most:
                size = tuple(meta(_node(gm, v)).shape[2:])
                if size not in ends or meta(_node(gm, v)).shape[1] <= meta(_node(gm, ends[size])).shape[1]:
                    ends[size] = v
        names += list(ends.values())[:opts.candidates - len(names)]
        if not names:
            raise ValueError("train_cut: found no cut to train (no image-shaped input and no 4-D feature map "
                             "at an articulation point); name them with cuts=[...]")
    out = {}
    for name in names:
        spec = _spec(gm, name, opts)
        if spec is None:
            raise ValueError(f"train_cut: a bottleneck needs a (N, C, H, W) float tensor; {name!r} is not one")
        out[name] = spec
    return out


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise ValueError(f"train_cut: no node {name!r} in the graph (names: the DAG's, cm.dag.nodes)")


def _spec(gm: fx.GraphModule, name: str, opts: CutTraining) -> BottleneckSpec | None:
    m = meta(_node(gm, name))
    if m.kind != "tensor" or m.shape is None or len(m.shape) != 4 or m.dtype is None or not m.dtype.is_floating_point:
        return None
    c, h, w = m.shape[1:]
    if c <= 3:   # an image: fewer pixels, more channels per pixel
        s = opts.input_stride
        return BottleneckSpec(c, opts.input_channels, s, 32) if h % s == 0 and w % s == 0 else None
    return BottleneckSpec(c, max(2, c // opts.reduction)) if c >= 8 else None


# ---------------------------------------------------------------------------------- training
def _features(gm: fx.GraphModule, names: list[str], data: Iterable[Any], batches: int = 8) -> dict[str, Tensor]:
    """The teacher's values at ``names`` on the first ``batches`` batches (to start the
    bottlenecks at their principal components)."""
    got: dict[str, list[Tensor]] = {n: [] for n in names}

    class Taps(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in got:
                got[n.name].append(out.detach())
            return out

    taps = Taps(gm)
    with torch.no_grad():
        for k, batch in enumerate(data):
            if k >= batches:
                break
            taps.run(*_inputs_of(batch))
    return {n: torch.cat(v) for n, v in got.items()}


def _inputs_of(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise TypeError("train_cut: each batch must be an input tensor or a tuple (input, ...), got "
                    f"{type(batch).__name__}")


def _trainable(student: fx.GraphModule, opts: CutTraining) -> list[tuple[str, nn.Parameter]]:
    names = {f"coach_cut_{k}_{side}" for k in range(len(bottlenecks(student))) for side in ("enc", "dec")}
    if opts.finetune:   # every module after the first decoder
        after = False
        for n in student.graph.nodes:
            after = after or (n.op == "call_module" and str(n.target).endswith("_dec"))
            if after and n.op == "call_module":
                names.add(str(n.target))
    return [(k, p) for k, p in student.named_parameters() if any(k.startswith(m + ".") for m in names)]


def _distill(s_out: Any, t_out: Any, temperature: float) -> Tensor:
    """KL divergence for (N, classes) outputs at ``temperature``, normalized MSE for others."""
    terms = []
    for s, t in zip(tree_flatten(s_out)[0], tree_flatten(t_out)[0]):
        if not isinstance(s, Tensor) or not s.is_floating_point():
            continue
        if s.dim() == 2:
            terms.append(F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1),
                                  reduction="batchmean") * temperature ** 2)
        else:
            terms.append(F.mse_loss(s, t) / (t.var() + 1e-8))
    if not terms:
        raise ValueError("train_cut: the model's outputs hold no floating-point tensor to distil")
    return sum(terms)


def _train(teacher: fx.GraphModule, student: fx.GraphModule, data: Iterable[Any], opts: CutTraining) -> None:
    teacher.eval()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    params = _trainable(student, opts)
    for _, p in params:
        p.requires_grad_(True)
    pairs = bottlenecks(student)
    seen: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for k, (enc, dec) in enumerate(pairs):
        enc.train(), dec.train()
        hooks.append(enc.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, (a[0], None))))
        hooks.append(dec.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, (seen[k][0], o))))
    # the teacher's own layers (``finetune``) move ten times slower than the new bottlenecks:
    # they only adapt to the restored tensor (at the bottlenecks' rate they forget, here at
    # once: a resnet18 fell to chance in one epoch)
    own = {id(p) for enc, dec in pairs for m in (enc, dec) for p in m.parameters()}
    groups = [{"params": [p for _, p in params if id(p) in own], "lr": opts.lr},
              {"params": [p for _, p in params if id(p) not in own], "lr": opts.lr / 10}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr, weight_decay=1e-4)
    steps_per_epoch = len(data) if hasattr(data, "__len__") else None   # type: ignore[arg-type]
    total = steps_per_epoch * opts.epochs if steps_per_epoch else None
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                                                pct_start=0.1) if total else None
    step = _resume(opts, params, opt, sched)
    g = torch.Generator().manual_seed(opts.seed + 1)
    bar = Progress("training cut", opts.progress)
    done = 0
    try:
        for _ in range(opts.epochs):
            for batch in data:
                bits = [int(opts.bits[int(i)]) for i in torch.randint(len(opts.bits), (len(pairs),), generator=g)]
                if done < step:   # resumed: these steps are in the checkpoint
                    done += 1
                    continue
                x = _inputs_of(batch)
                for (enc, _), b in zip(pairs, bits):
                    enc.train_bits = b
                with torch.no_grad():
                    t_out = teacher(*x)
                s_out = student(*x)
                loss = _distill(s_out, t_out, opts.temperature)
                for a, y in seen.values():   # each decoder restores what its encoder saw
                    loss = loss + F.mse_loss(y, a.detach()) / (a.detach().var() + 1e-8)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                done += 1
                bar.update(done, total or done, f"training cut (loss {loss.item():.3f})")
                if opts.checkpoint is not None and done % opts.checkpoint_every == 0:
                    _save(opts, params, opt, sched, done)
        if opts.checkpoint is not None:
            _save(opts, params, opt, sched, done)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        for enc, _ in pairs:
            enc.train_bits = None
        for p in student.parameters():
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------- checkpoints
def _save(opts: CutTraining, params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
          sched: Any, step: int) -> None:
    """The trained weights, the optimizer's moments and the step, as safetensors (no pickle)."""
    from safetensors.torch import save_file
    tensors = {f"param/{k}": p.detach().contiguous() for k, p in params}
    state = opt.state_dict()["state"]
    for i, k in enumerate(_in_optimizer_order(params, opt)):
        for name, v in state.get(i, {}).items():
            if isinstance(v, Tensor):
                tensors[f"opt/{k}/{name}"] = v.detach().reshape(v.shape or (1,)).contiguous()
    metadata = {"recipe": json.dumps(opts.recipe(), sort_keys=True), "step": str(step)}
    path = Path(opts.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _in_optimizer_order(params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer) -> list[str]:
    """The parameters' names in the order the optimizer numbers its state (its groups' order:
    with ``finetune`` the bottlenecks' group comes first, not the model's order)."""
    name = {id(p): k for k, p in params}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def _resume(opts: CutTraining, params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
            sched: Any) -> int:
    """The step a checkpoint of the same recipe reached (its weights and optimizer state loaded),
    else 0."""
    if opts.checkpoint is None or not Path(opts.checkpoint).is_file():
        return 0
    from safetensors import safe_open
    with safe_open(str(opts.checkpoint), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("recipe") != json.dumps(opts.recipe(), sort_keys=True):
            import warnings
            warnings.warn(f"train_cut: {opts.checkpoint} was trained with another recipe; starting over",
                          RuntimeWarning, stacklevel=3)
            return 0
        keys = set(f.keys())
        by_name = dict(params)
        with torch.no_grad():
            for k, p in by_name.items():
                p.copy_(f.get_tensor(f"param/{k}"))
        state = {}
        by_name = dict(params)
        for i, k in enumerate(_in_optimizer_order(params, opt)):
            p = by_name[k]
            entry = {}
            for name in ("step", "exp_avg", "exp_avg_sq"):
                if f"opt/{k}/{name}" in keys:
                    v = f.get_tensor(f"opt/{k}/{name}")
                    entry[name] = v.reshape(()) if name == "step" else v.reshape(p.shape)
            if entry:
                state[i] = entry
        step = int(md.get("step", "0"))
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    if sched is not None:
        import warnings
        with warnings.catch_warnings():   # "step() before optimizer.step()": a replay, on purpose
            warnings.simplefilter("ignore")
            for _ in range(step):   # the schedule is a function of the step: replay it
                sched.step()
    return step


__all__ = ["CutTraining", "TrainedCut", "choose_cuts", "train_cut"]
