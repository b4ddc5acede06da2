"""``CompiledModel``: a model split between an end device and the cloud (made by
``coach_fx.compile``, see ``coach_fx.driver``): it runs, streams, saves and reports itself.

Example::

    >>> import torch, torchvision, coach_fx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 224, 224)
    >>> cm = coach_fx.compile(model, (x,), network=coach_fx.Network(uplink_mbps=10),
    ...                       end=coach_fx.Device("pi", slowdown=8), strategy="brute-force")
    >>> y = cm(x)                       # end half -> in-process link -> cloud half
    >>> print(cm.report())              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from coach_fx.accuracy import AccuracyOracle
from coach_fx.batch_halves import SHAPE_FREE_CAPTURES, BatchHalves, batch_size
from coach_fx.profile import torch_threads
from coach_fx.dag import LayerDAG
from coach_fx.passes.partition import partition
from coach_fx.plan import Plan
from coach_fx.passes.wire_sizes import MESSAGE_HEADER_BYTES
from coach_fx.settings import Settings
from coach_fx.runtime.timing import median_time


class InputError(ValueError):
    """An input does not match what the model was compiled for."""


def example_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of the model's positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _identity_link(payload: tuple) -> tuple:
    return payload


def _shares_weights(gm: fx.GraphModule, source: nn.Module | None) -> bool:
    """Whether every tensor of ``gm`` is one of ``source``'s (a traced graph reuses the model's
    modules; an exported one holds copies)."""
    if source is None:
        return False
    own = {id(t) for t in source.parameters()} | {id(t) for t in source.buffers()}
    return all(id(t) in own for t in gm.parameters()) and all(id(t) in own for t in gm.buffers())


def _load_plain_keys(cm: "CompiledModel", state_dict: dict, prefix: str, _metadata: Any, _strict: bool,
                     missing: list[str], unexpected: list[str], _errors: list[str]) -> None:
    """Pre-hook: the entries under ``prefix`` in the plain model's keys (not one of the
    compiled model's own parts) load into the weights the halves share, and leave the dict;
    what the plain model lacks or has left over is reported as the outer load would."""
    parts = set(cm._modules)
    plain = {k[len(prefix):]: k for k in list(state_dict) if k.startswith(prefix)
             and k[len(prefix):].split(".", 1)[0] not in parts}
    cm._loaded_as = None
    if plain:
        got = (cm._source or cm.gm).load_state_dict({k: state_dict.pop(full) for k, full in plain.items()},
                                                    strict=False)
        missing += [prefix + k for k in got.missing_keys]
        unexpected += [prefix + k for k in got.unexpected_keys]
        cm._loaded_as = prefix


def _forget_internal_keys(cm: "CompiledModel", incompatible: Any) -> None:
    """Post-hook: after a plain-key load, the compiled model's own parts are not missing."""
    if cm._loaded_as is not None:
        inside = tuple(f"{cm._loaded_as}{name}." for name in cm._modules)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(inside)]
        cm._loaded_as = None


class CompiledModel(nn.Module):
    """A model split into an end and a cloud GraphModule joined by quantized boundary ops.

    ``cm(x)`` returns what the model returns, computed end -> link -> cloud. Attributes:
    ``plan`` (:class:`coach_fx.Plan`), ``dag`` (:class:`coach_fx.LayerDAG`), ``end_module`` and
    ``cloud_module`` (``torch.fx.GraphModule``), ``boundary`` (what crosses, in payload order).
    """

    def __init__(self, gm: fx.GraphModule, dag: LayerDAG, plan: Plan, settings: Settings,
                 example_inputs: Sequence[Any], oracle: AccuracyOracle | None = None,
                 source: nn.Module | None = None) -> None:
        super().__init__()
        # the model compiled, not a submodule (its weights are the graph's): its keys are the
        # ones a checkpoint speaks (see state_dict)
        object.__setattr__(self, "_source", source if _shares_weights(gm, source) else None)
        self.gm, self.dag, self.plan, self.settings = gm, dag, plan, settings
        self.oracle = oracle
        self.example_inputs = tuple(example_inputs)
        self.input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.end_module, self.cloud_module, self.boundary = partition(
            gm, plan.end_nodes, plan.bits, codecs=plan.codecs, tensor_codecs=plan.tensor_codecs)
        self._train_end, self._train_cloud, _ = partition(gm, plan.end_nodes, plan.bits, mode="train",
                                                          codecs=plan.codecs)
        self.link: Callable[[tuple], tuple] = _identity_link
        #: the size of the inputs' first dimension that may change from call to call (None:
        #: the shapes are fixed: no common batch dimension, or a static export/dynamo graph)
        self.batch = batch_size(self.example_inputs) if gm.meta.get("coach_capture") in SHAPE_FREE_CAPTURES \
            else None
        self._batches = BatchHalves(gm, plan, self.boundary, self._train_end, self.example_inputs,
                                    (self.end_module, self.cloud_module))
        self.train(gm.training)
        # inside a bigger model, torch loads a checkpoint module by module, not through
        # ``load_state_dict`` below: these hooks take the plain model's keys there too
        self.register_load_state_dict_pre_hook(_load_plain_keys)
        self.register_load_state_dict_post_hook(_forget_internal_keys)
        self._loaded_as: str | None = None

    @property
    def batched_cloud_module(self) -> fx.GraphModule:
        """The cloud half on dequantized inputs (one float tensor per crossing, in boundary
        order): a server dequantizes each request as the boundary ops do and runs many
        requests through this as one batch (``runtime.cloud.CloudHalf``)."""
        return self._train_cloud

    # -------------------------------------------------------------- checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The model's own state dict (its keys, as the plain model writes them), so that a
        checkpoint of the compiled model loads into the plain model and back."""
        return (self._source or self.gm).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint of the plain model (or of this one): the halves share its tensors."""
        if assign:
            raise ValueError("load_state_dict(assign=True) would detach the halves from the "
                             "weights; load with assign=False")
        return (self._source or self.gm).load_state_dict(state_dict, strict=strict)

    # -------------------------------------------------------------- running
    def check_inputs(self, args: Sequence[Any], any_batch: bool = True) -> None:
        """Raise :class:`InputError` naming the expected shape/dtype before any work is done;
        ``any_batch``: the batch may differ from the example's (in process; a stream's halves
        and wire keep the compiled shapes)."""
        if len(args) != len(self.example_inputs):
            raise InputError(f"expected {len(self.example_inputs)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(args)}")
        for i, (a, e) in enumerate(zip(args, self.example_inputs)):
            name = self.input_names[i] if i < len(self.input_names) else str(i)
            if isinstance(e, torch.Tensor):
                if not isinstance(a, torch.Tensor):
                    raise InputError(f"input {i} ({name!r}) must be a tensor of shape "
                                     f"{tuple(e.shape)}, got {type(a).__name__}")
                free = any_batch and self.batch is not None and a.dim() == e.dim() and a.dim() > 0
                if (a.shape[1:] if free else a.shape) != (e.shape[1:] if free else e.shape) \
                        or a.dtype != e.dtype:
                    want = ("(any batch, " + ", ".join(map(str, e.shape[1:])) + ")") if free \
                        else str(tuple(e.shape))
                    raise InputError(
                        f"input {i} ({name!r}) has shape {tuple(a.shape)} and dtype {a.dtype}; "
                        f"expected shape {want} and dtype {e.dtype} (the example inputs the model "
                        "was compiled for; compile again for another shape)")
        if any_batch and self.batch is not None and batch_size(args) is None:
            raise InputError("the inputs' first dimensions differ: they are one batch and must "
                             f"agree (got {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]})")

    def _bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        if not kwargs:
            return args
        args = list(args)
        for name in self.input_names[len(args):]:
            if name not in kwargs:
                raise InputError(f"missing input {name!r}")
            args.append(kwargs[name])
        extra = set(kwargs) - set(self.input_names)
        if extra:
            raise InputError(f"unexpected keyword input(s) {sorted(extra)}")
        return tuple(args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = self._bind(args, kwargs)
        self.check_inputs(args)
        if self.training and torch.is_grad_enabled():
            # fake-quantized boundary whose gradient passes straight through
            payload = self._train_end(*args)
            return self._structured(payload if self.boundary.end_only else self._train_cloud(*payload))
        end, cloud = self._batches.get(args) if self.batch is not None else (self.end_module, self.cloud_module)
        out = end(*args)
        if not self.boundary.end_only:
            out = cloud(*self.link(out))
        return self._structured(out)

    def _structured(self, out: Any) -> Any:
        """``out`` as the model's own output class (transformers' ModelOutput) where the graph
        could only write a plain dict."""
        spec = self.gm.meta.get("coach_out_spec")
        if spec is None:
            return out
        from coach_fx.passes._compat import tree_flatten, tree_unflatten
        return tree_unflatten(tree_flatten(out)[0], spec)

    # -------------------------------------------------------------- streams
    @property
    def out_spec(self) -> Any:
        """The structure of the model's output (leaves travel flat on the wire)."""
        if getattr(self, "_out_spec", None) is None and "coach_out_spec" in self.gm.meta:
            self._out_spec = self.gm.meta["coach_out_spec"]
        if getattr(self, "_out_spec", None) is None:
            from coach_fx.passes._compat import tree_flatten
            with torch.no_grad():
                self._out_spec = tree_flatten(self.gm(*self.example_inputs))[1]
        return self._out_spec

    def predicted(self) -> dict[str, float]:
        p = self.plan
        return {"t_end": p.t_end, "t_link": p.t_link, "t_cloud": p.t_cloud, "latency": p.latency,
                "period": p.period, "throughput": p.throughput, "bubble_ratio": p.bubble_ratio,
                "bytes_sent": p.bytes_sent}

    def stream(self, inputs: Sequence[Any], *, pipelined: bool = True, link: Any = None,
               timeout_s: float = 30.0, queue_size: int = 2) -> tuple[list[Any], Any]:
        """Run a stream through end -> link -> cloud as a three-stage pipeline, in-process.

        ``inputs``: frames, each a tensor or a tuple of the model's inputs. The link defaults
        to an in-process one with the compile-time network (its trace, if it has one); the
        end (and cloud) devices are emulated with their slowdowns. Returns (outputs in order,
        :class:`coach_fx.runtime.stats.Stats`). ``pipelined=False`` runs one request at a
        time, for comparison.
        """
        from coach_fx.runtime.end import run_end_only

        frames = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in inputs]
        for f in frames:
            self.check_inputs(f, any_batch=False)
        if self.boundary.end_only:
            with torch_threads(self.settings.threads):
                outs, stats = run_end_only(self.end_module, frames, self.settings.end.slowdown,
                                        self.plan.extra.get("end_host_s"))
            stats.predicted = self.predicted()
            return outs, stats
        with torch_threads(self.settings.threads):
            return self._stream(frames, pipelined, link, timeout_s, queue_size)

    def _stream(self, frames: list[tuple], pipelined: bool, link: Any, timeout_s: float,
                queue_size: int) -> tuple[list[Any], Any]:
        from coach_fx.runtime.cloud import CloudWorker
        from coach_fx.runtime.config import StreamConfig
        from coach_fx.runtime.end import EndWorker, run_session
        from coach_fx.runtime.links.inprocess import InProcessLink
        from coach_fx.runtime.policy import StaticPolicy

        link = link or InProcessLink.for_network(self.settings.network)
        config = StreamConfig(self.settings.end.slowdown, self.settings.cloud.slowdown,
                              queue_size=queue_size, timeout_s=timeout_s)
        cloud = CloudWorker({0: (self.cloud_module, self.boundary)}, link.cloud, config).start()
        # a calibrated plan measured the end half on this host: emulate the device from that
        ref = self.plan.extra.get("end_host_s")
        end = EndWorker(link.end, self.out_spec, StaticPolicy(self.end_module, self.boundary,
                                                              end_host_s=ref), config)
        return run_session(end, cloud, frames, pipelined=pipelined, predicted=self.predicted())

    def save(self, path: str, whole: bool = False, key: bytes | str | None = None) -> str:
        """Write the plan and each half on its own (``coach serve DIR`` / ``coach run DIR``);
        ``whole=True`` also writes the whole model, for ``coach run --fallback local``.
        ``key``: the shared token that signs the manifest (default ``$COACH_TOKEN``); a side
        that holds a token loads only a plan signed with it.

        Example::

            >>> cm.save("plan_dir", whole=True, key=open("token").read())   # doctest: +SKIP
        """
        from coach_fx.deploy.save import save_compiled
        was = self.training
        self.eval()
        try:
            return str(save_compiled(self, path, whole=whole, key=key))
        finally:
            self.train(was)

    # -------------------------------------------------------------- reporting
    def report(self) -> str:
        """The plan and its predicted stage times as a table."""
        p = self.plan
        head = (f"plan: {p.strategy}, objective {p.objective}; {len(p.end_nodes)}/{len(self.dag)} "
                f"nodes on the end; crossing: "
                + (", ".join(p.crossing_label(x) for x in p.cut) or "nothing"))
        if p.accuracy is not None:
            head += f"\naccuracy: {p.note}"
        rows = [["T_end", p.t_end * 1e3], ["T_link", p.t_link * 1e3], ["T_cloud", p.t_cloud * 1e3],
                ["latency", p.latency * 1e3], ["period", p.period * 1e3],
                ["throughput /s", p.throughput], ["bubble ratio", p.bubble_ratio],
                ["bytes sent", p.bytes_sent]]
        return head + "\n" + tabulate(rows, headers=["predicted", "ms / value"], floatfmt=".3f")

    def remeasure(self, repeat: int = 5) -> Plan:
        """Re-measure the chosen plan's halves as whole modules on this host and re-price it
        (``self.plan`` becomes the re-priced plan, which is returned).

        The search prices plans with per-node costs; a half run as one module (with its
        quantize/pack, or unpack/dequantize, and message encoding) takes somewhat different
        time (``prediction_check`` says how much). The plan's stage times become the measured
        ones × each device's slowdown; the per-node figures stay in ``plan.extra``.
        """
        from coach_fx.runtime.codec import entries_to_payload, output_to_entries, payload_to_entries
        from coach_fx.runtime.wire import decode, encode

        p = self.plan
        x = self.example_inputs
        if self.boundary.end_only:   # the whole model on the end device
            with torch.no_grad(), torch_threads(self.settings.threads):
                t_end = median_time(lambda: self.end_module(*x), repeat)
            self.plan = dataclasses.replace(
                p, t_end=self.settings.end.seconds(t_end),
                extra={**p.extra, "model_t_end": p.t_end, "remeasured": True, "end_host_s": t_end})
            return self.plan
        with torch.no_grad(), torch_threads(self.settings.threads):
            def end() -> bytes:
                return encode(0, payload_to_entries(self.boundary, self.end_module(*x)))
            msg = end()
            def cloud() -> bytes:
                out = self.cloud_module(*entries_to_payload(self.boundary, decode(msg)[3]))
                return encode(0, output_to_entries(out)[0])
            t_end = median_time(end, repeat)
            t_cloud = median_time(cloud, repeat)
        net = self.settings.network
        self.plan = dataclasses.replace(
            p, t_end=self.settings.end.seconds(t_end),
            t_cloud=(self.settings.cloud.seconds(t_cloud) + net.rtt_ms / 2e3
                     + net.down_seconds(self.dag.output_bytes() + MESSAGE_HEADER_BYTES)),
            extra={**p.extra, "model_t_end": p.t_end, "model_t_cloud": p.t_cloud,
                   "remeasured": True, "end_host_s": t_end, "cloud_host_s": t_cloud})
        return self.plan

    def prediction_check(self, repeat: int = 10) -> dict[str, float]:
        """How well the per-node sum of host times predicts each half run as one module."""
        host = getattr(self.dag, "host_times", None)
        if host is None:
            return {}
        # the cost model's host figures for each half, boundary ops included (no network)
        end_set = set(self.plan.end_nodes)
        q_end = q_cloud = 0.0
        for x in self.plan.cut:
            d = self.dag.info[x]
            if d.quantizable and self.plan.bits[x] < 32:
                qe, qc = self.dag.quant_cost(self.plan.bits[x])
                q_end += qe * d.numel / self.settings.end.slowdown
                q_cloud += qc * d.numel / self.settings.cloud.slowdown
        pred_end = q_end + sum(host.get(m, 0.0) for v in end_set for m in self.dag.members[v])
        pred_cloud = q_cloud + sum(host.get(m, 0.0) for v in self.dag.nodes if v not in end_set
                                   for m in self.dag.members[v])
        with torch.no_grad():
            payload = self.end_module(*self.example_inputs)
            meas_end = median_time(lambda: self.end_module(*self.example_inputs), repeat)
            meas_cloud = 0.0 if self.boundary.end_only else \
                median_time(lambda: self.cloud_module(*payload), repeat)
        def err(pred: float, meas: float) -> float:
            return (pred - meas) / meas if meas > 0 else 0.0
        return {"end_pred_s": pred_end, "end_meas_s": meas_end, "end_err": err(pred_end, meas_end),
                "cloud_pred_s": pred_cloud, "cloud_meas_s": meas_cloud,
                "cloud_err": err(pred_cloud, meas_cloud)}
