"""Accuracy of a candidate cut with quantized crossing tensors, for the bit search.

Only the crossing tensors are fake-quantized (the same quantizer as deployment, no packing;
each sample on its own, as each request is quantized when deployed), calibration data is run
in batches, and results are memoized by (crossing set, bits). Three modes, chosen from ``Settings.calibration``:

* ``(inputs, labels)`` -> **labels**: top-1 accuracy drop against the unquantized model <= budget;
* ``inputs`` alone (or ``(inputs, None)``) -> **agreement**: 1 - top-1 agreement with the
  unquantized model <= budget;
* ``None`` -> **l2**: relative L2 error of the output on the example inputs <=
  ``Settings.output_tolerance`` (default 0.02, i.e. 2 %).

Example::

    >>> oracle = AccuracyOracle(gm, dag, settings, example_inputs)     # doctest: +SKIP
    >>> oracle.min_bits(dag.crossing(end_set))                          # doctest: +SKIP
    4
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from coach_fx.graph import LayerDAG
from coach_fx.passes.annotate import _tensors
from coach_fx.passes.ops import fake_quantize_per_sample
from coach_fx.passes.partition import partition
from coach_fx.plan import plan_bits
from coach_fx.settings import Settings


#: Keep the reference run's activations for reuse up to this many bytes.
ACTIVATION_CACHE_BYTES = 1 << 30



class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op not in ("output", "get_attr"):
            # a copy: a later in-place op (relu_, +=) would otherwise change what we keep
            self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def _fresh(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _flat_output(out: Any) -> torch.Tensor:
    ts = [t.detach().float().reshape(t.shape[0] if t.dim() else 1, -1) for t in _tensors(out)]
    return torch.cat(ts, dim=1) if ts else torch.zeros(1, 0)


class AccuracyOracle:
    """Answers "does this crossing set with these bits stay within the accuracy budget?"."""

    def __init__(self, gm: fx.GraphModule, dag: LayerDAG, settings: Settings,
                 example_inputs: Sequence[Any], batch_size: int = 256) -> None:
        self.gm, self.dag, self.settings = gm, dag, settings
        calib = settings.calibration
        labels = None
        if calib is None:
            self.mode = "l2"
            inputs = tuple(example_inputs)
        else:
            if isinstance(calib, (tuple, list)) and len(calib) == 2 and (
                    calib[1] is None or isinstance(calib[1], torch.Tensor)) and \
                    isinstance(calib[0], (torch.Tensor, tuple, list)):
                inputs, labels = _as_tuple(calib[0]), calib[1]
            else:
                inputs = _as_tuple(calib)
            self.mode = "labels" if labels is not None else "agreement"
        self.inputs = inputs
        self.labels = labels
        n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        ex = example_inputs[0] if example_inputs else None
        static = gm.meta.get("coach_capture") != "symbolic_trace"
        self.batch = (ex.shape[0] if static and isinstance(ex, torch.Tensor) and ex.dim() else batch_size)
        #: samples per request, as the model was compiled for (the example input's batch):
        #: each request's crossing tensors are quantized together, as deployed
        self.request = ex.shape[0] if isinstance(ex, torch.Tensor) and ex.dim() else 1
        if self.batch % self.request:
            self.batch = max(self.request, self.batch - self.batch % self.request)
        self.n = n
        self.evals = 0
        self._cache: dict[tuple, float] = {}
        self._split_cache: dict[tuple, Any] = {}
        self._acts: list[dict[str, Any]] | None = []
        self.reference = self._run(self._record)
        if self.mode == "labels":
            if labels.shape[0] != n:
                raise ValueError(f"calibration has {n} inputs but {labels.shape[0]} labels")
            self.ref_acc = self._top1(self.reference, labels)

    @property
    def budget(self) -> float:
        return self.settings.output_tolerance if self.mode == "l2" else self.settings.accuracy_budget

    def _run(self, fn: Any) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, self.n, self.batch):
                xs = tuple(x[i:i + self.batch] if isinstance(x, torch.Tensor) and x.dim() else x
                           for x in self.inputs)
                outs.append(_flat_output(fn(*xs)))
        return torch.cat(outs)

    def _record(self, *xs: Any) -> Any:
        """Run the model once, keeping every node's output (the end half of any candidate is
        then free: only its cloud half runs), unless that would take too much memory."""
        if self._acts is None:
            return self.gm(*xs)
        rec = _Recorder(self.gm)
        out = rec.run(*xs)
        self._acts.append(rec.values)
        held = sum(t.numel() * t.element_size() for acts in self._acts for v in acts.values()
                   for t in _tensors(v))
        if held > ACTIVATION_CACHE_BYTES:
            self._acts = None
        return out

    def _run_split(self, end_nodes: Iterable[str], bits: dict[str, int]) -> torch.Tensor:
        # Each calibration sample's crossing tensors are quantized on their own, as each
        # request is when deployed (one scale per tensor per request, not per batch).
        e, c, boundary = partition(self.gm, set(end_nodes), bits, mode="train")
        if self._acts is None:
            e32, c32, _ = partition(self.gm, set(end_nodes), {})
            def run(*xs: Any) -> Any:
                vals = _as_tuple(e32(*xs))
                return c32(*[fake_quantize_per_sample(v, x.bits, self.request) if x.kind == "quant" else v
                             for v, x in zip(vals, boundary.crossings)])
            return self._run(run)
        outs = []
        with torch.no_grad():
            for acts in self._acts:
                # fresh tensors each time: the cloud half may modify its inputs in place
                payload = [fake_quantize_per_sample(acts[x.name], x.bits, self.request) if x.kind == "quant"
                           else _fresh(acts[x.name]) for x in boundary.crossings]
                outs.append(_flat_output(c(*payload)))
        return torch.cat(outs)

    @staticmethod
    def _top1(out: torch.Tensor, labels: torch.Tensor) -> float:
        return (out.argmax(1) == labels.reshape(-1)).float().mean().item()

    def metric(self, end_nodes: Iterable[str], bits: dict[str, int]) -> float:
        """Accuracy loss of the split (drop, disagreement or relative L2 by mode); memoized."""
        cut = self.dag.crossing(end_nodes)
        key = tuple(sorted((x, b) for x, b in bits.items() if x in cut and b < 32))
        if not key:
            return 0.0
        if key in self._cache:
            return self._cache[key]
        out = self._run_split(end_nodes, dict(key))
        self.evals += 1
        ref = self.reference
        if self.mode == "labels":
            value = self.ref_acc - self._top1(out, self.labels)
        elif self.mode == "agreement":
            value = 1.0 - (out.argmax(1) == ref.argmax(1)).float().mean().item()
        else:
            value = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        self._cache[key] = value
        return value

    def ok(self, end_nodes: Iterable[str], bits: dict[str, int]) -> bool:
        return self.metric(end_nodes, bits) <= self.budget + 1e-12

    def min_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None) -> int | None:
        """Fewest uniform bits for the crossing tensors that meet the budget (binary search).

        Model inputs that cross keep ``Settings.input_bits``. None when even the most bits
        allowed break the budget.
        """
        end_nodes = frozenset(end_nodes)
        allowed = sorted(allowed or self.settings.bits)
        cut = self.dag.crossing(end_nodes)
        ib = self.settings.input_bits
        if not any(self.dag.info[x].quantizable for x in cut if x not in self.dag.inputs):
            return allowed[0] if self.ok(end_nodes, plan_bits(self.dag, cut, allowed[0], ib)) else None
        lo, hi = 0, len(allowed) - 1
        if not self.ok(end_nodes, plan_bits(self.dag, cut, allowed[hi], ib)):
            return None
        while lo < hi:   # accuracy is monotone in bits: find the first that passes
            mid = (lo + hi) // 2
            if self.ok(end_nodes, plan_bits(self.dag, cut, allowed[mid], ib)):
                hi = mid
            else:
                lo = mid + 1
        return allowed[lo]
