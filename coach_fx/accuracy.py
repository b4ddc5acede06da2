"""Accuracy of a candidate cut with quantized crossing tensors, for the bit search.

Only the crossing tensors are fake-quantized (the same quantizer as deployment, no packing;
each sample on its own, as each request is quantized when deployed; an input sent as an image
goes through the image codec's own round trip), calibration data is run in batches, and
results are memoized by (crossing set, bits, codecs). Three modes, chosen from
``Settings.calibration``:

* ``(inputs, labels)`` -> **labels**: top-1 accuracy drop against the unquantized model <= budget;
* ``inputs`` alone (or ``(inputs, None)``) -> **agreement**: 1 - top-1 agreement with the
  unquantized model <= budget;
* ``None`` -> **l2**: relative L2 error of the output <= ``Settings.output_tolerance`` (default
  0.02, i.e. 2 %) on every one of several inputs: the example inputs and
  ``L2_VARIANTS`` inputs drawn with their mean and spread (never one input alone). Without
  data this is a smoke check, not an accuracy claim.

**A budget that holds on unseen data.** With calibration data, a plan passes when the
one-sided ``Settings.accuracy_confidence`` (default 90 %) Clopper-Pearson upper bound of its
rate of *harmful* changes (labels: a right answer made wrong; agreement: any changed answer)
is within the budget. Answers made right do not offset answers made wrong: the flips a
quantizer causes are systematic, and on a small calibration set a few lucky ones would hide
them. A calibration set too small for the budget (no plan could pass but by chance) is
refused with :class:`CalibrationTooSmall`, which says how many samples the budget needs
(:func:`samples_needed`: 460 for the default 0.005 at 90 %).

Example::

    >>> oracle = AccuracyOracle(gm, dag, settings, example_inputs)     # doctest: +SKIP
    >>> oracle.min_bits(dag.crossing(end_set))                          # doctest: +SKIP
    4
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from coach_fx.accuracy_runs import CrossingValues, Halves, Tally, chunks, with_variants
from coach_fx.dag import LayerDAG
from coach_fx.passes.annotate import _tensors
from coach_fx.passes.ops import fake_quantize_per_sample
from coach_fx.plan import plan_bits
from coach_fx.batch_halves import batch_size as common_batch
from coach_fx.settings import calibration_parts
from coach_fx.settings import Settings


#: A sample counts against a plan when the split leaves less than this share of the
#: unquantized model's margin for its answer (see ``_at_risk``). The wider the choice a check
#: picks from, the more a lucky pass must be guarded against: quantized tensors are searched
#: over hundreds of (cut, widths), an image codec for the raw input is one of four fixed
#: options. Measured on the trained grid: with 0.5 on tensors a 4-bit googlenet plan had no
#: calibration sample under half its margin (0 of 539) yet changed 4 test answers of 540
#: (0.56 pt): the search had picked it for that luck; at 0.75 its calibration count is 4 and
#: it is refused. Counting changed answers only let one of digits' 18 plans exceed the budget.
#: On codecs 0.5 refused resnet18's quality-90 JPEG for one sample whose margin fell to
#: 0.3-0.5 of its own while no answer changed on the calibration or the test split.
RISK_MARGIN = 0.75
#: The same for a plan whose only lossy crossing is an image codec of a model input.
CODEC_RISK_MARGIN = 0.25


class CalibrationTooSmall(ValueError):
    """The calibration set is too small for the accuracy budget at the asked confidence."""


def samples_needed(budget: float, confidence: float) -> int:
    """Fewest calibration samples with which a plan can pass at all: with no harmful change
    in n samples the Clopper-Pearson bound is 1 - (1 - confidence)^(1/n) <= budget.

    >>> samples_needed(0.005, 0.9)
    460
    """
    if budget <= 0:
        return math.inf  # type: ignore[return-value]
    return math.ceil(math.log(1 - confidence) / math.log1p(-budget))


def flip_bound(flips: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound of a rate seen ``flips`` times in ``n`` trials
    (Clopper-Pearson, exact for a binomial).

    >>> round(flip_bound(0, 460, 0.9), 5)
    0.00499
    """
    if n <= 0 or flips >= n:
        return 1.0
    from scipy.stats import beta
    return float(beta.ppf(confidence, flips + 1, n - flips))



def _fresh(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _batch_major(gm: fx.GraphModule, example: tuple) -> bool:
    """Do the inputs share a first (batch) dimension, and every output tensor with them?"""
    b = common_batch(example)
    if b is None:
        return False
    with torch.no_grad():
        outs = list(_tensors(gm(*example)))
    return all(t.dim() > 0 and t.shape[0] == b for t in outs)


def _flat_output(out: Any, whole: bool = False) -> torch.Tensor:
    """The output's tensors as rows per sample (``whole``: one row)."""
    ts = [t.detach().float().reshape(1 if whole or not t.dim() else t.shape[0], -1) for t in _tensors(out)]
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
            inputs = with_variants(tuple(example_inputs))
        else:
            inputs, labels = calibration_parts(calib)
            self.mode = "labels" if labels is not None else "agreement"
        #: the inputs share no batch dimension (a sequence-first input beside a batch-first
        #: mask), or the outputs do not follow it (a detector's anchors beside its per-image
        #: scores): the example is checked whole, one request, as it is sent
        self.whole = not _batch_major(gm, tuple(example_inputs))
        if self.whole:
            if calib is not None:
                raise ValueError("calibration data is sliced into samples along the first dimension, "
                                 "but this model's inputs (or outputs) share none (e.g. a "
                                 "sequence-first input beside a batch-first mask, or a detector's "
                                 "anchors beside its scores); compile without calibration (the "
                                 "output's relative L2 is checked)")
            inputs = tuple(example_inputs)
        self.inputs = inputs
        self.labels = labels
        if self.mode == "l2" and not self.whole:
            try:   # the variants need a batch dimension; a model without one checks the example alone
                with torch.no_grad():
                    gm(*inputs)
            except Exception:  # noqa: BLE001
                self.inputs = inputs = tuple(example_inputs)
        n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        ex = example_inputs[0] if example_inputs else None
        if self.whole:
            n, ex = 1, None
        static = gm.meta.get("coach_capture") != "symbolic_trace"
        self.batch = (ex.shape[0] if static and isinstance(ex, torch.Tensor) and ex.dim() else batch_size)
        #: samples per request, as the model was compiled for (the example input's batch):
        #: each request's crossing tensors are quantized together, as deployed
        self.request = ex.shape[0] if isinstance(ex, torch.Tensor) and ex.dim() else 1
        if self.batch % self.request:
            self.batch = max(self.request, self.batch - self.batch % self.request)
        self.n = n
        #: candidates measured, and calibration samples their cloud halves ran on in all
        self.evals = 0
        self.samples_run = 0
        #: fixed sample ranges the calibration data is run in (a small first one, then batches)
        self.chunks = chunks(n, self.batch, self.request)
        #: memo: key -> what was measured (possibly stopped early, see ``Tally``)
        self._cache: dict[tuple, Tally] = {}
        #: (crossing name, chunk) -> the end half's value on that chunk, LRU by bytes
        self._values = CrossingValues()
        self._halves = Halves(gm)
        #: the compiled model's own outputs, unquantized: what a searched plan's near changes
        #: are measured from
        self.unquantized = self._run(self.gm)
        #: what answers are kept against: ``Settings.reference`` (the model a
        #: ``train_cut`` student was made from: the student's own difference counts too), else
        #: the compiled model itself
        self.reference = settings.reference
        self.reference_out = self._run(self.reference) if self.reference is not None else self.unquantized
        if self.mode == "labels":
            if labels.shape[0] != n:
                raise ValueError(f"calibration has {n} inputs but {labels.shape[0]} labels")
            self.ref_right = self.reference_out.argmax(1) == labels.reshape(-1)
            self.ref_acc = self.ref_right.float().mean().item()
        #: per sample: whether the model itself (no quantization) already changes or nearly
        #: changes the reference's answer (the margin share of a fixed option, as for a codec);
        #: none without a reference
        self.own_harm = torch.zeros(self.unquantized.shape[0], dtype=torch.bool)
        if self.reference is not None and self.mode != "l2":
            self.own_harm = self._at_risk_rows(self.reference_out, self.unquantized, 0, self.n, CODEC_RISK_MARGIN)

    @property
    def budget(self) -> float:
        return self.settings.output_tolerance if self.mode == "l2" else self.settings.accuracy_budget

    @property
    def bounded(self) -> bool:
        """Whether ``ok`` uses the confidence bound (calibration data and a confidence given)."""
        return self.mode != "l2" and self.settings.accuracy_confidence is not None

    def describe(self) -> str:
        """How plans are checked, for reports."""
        if self.mode == "l2":
            return (f"output relative L2 <= {self.budget:g} on {self.n} inputs (the example inputs "
                    "and inputs drawn like them; no calibration data: not an accuracy claim)")
        what = "top-1 drop" if self.mode == "labels" else "top-1 disagreement"
        if not self.bounded:
            return f"{what} <= {self.budget:g} on {self.n} calibration samples"
        return (f"{what} <= {self.budget:g} at {self.settings.accuracy_confidence:.0%} confidence "
                f"on {self.n} calibration samples")

    def _slice(self, lo: int, hi: int) -> tuple:
        if self.whole:
            return self.inputs
        return tuple(x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() else x for x in self.inputs)

    def _flat(self, out: Any) -> torch.Tensor:
        return _flat_output(out, self.whole)

    def _run(self, fn: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self._flat(fn(*self._slice(lo, hi))) for lo, hi in self.chunks])

    def _sent(self, value: Any, kind: str, bits: int, codec: str | None) -> Any:
        """What the cloud half receives for a crossing value, as deployed (per request)."""
        if codec is not None:
            from coach_fx.passes.imagecodec import roundtrip
            return roundtrip(value, codec)
        if kind == "quant" and self.whole:   # one request: the whole tensor (a scale per token)
            if value.dim() == 0:
                return fake_quantize_per_sample(value.unsqueeze(0), bits, 1).squeeze(0)
            return fake_quantize_per_sample(value, bits, max(value.shape[0], 1))
        if kind == "quant":
            return fake_quantize_per_sample(value, bits, self.request)
        return _fresh(value)

    def _crossing_values(self, e32: fx.GraphModule, names: list[str], k: int) -> list[Any]:
        """The end half's crossing values on chunk ``k``, kept or by running it."""
        return self._values.get(names, k, lambda: _as_tuple(e32(*self._slice(*self.chunks[k]))))

    def _measure(self, end_nodes: Iterable[str], bits: dict[str, int],
                 codecs: Mapping[str, str] | None, full: bool) -> "Tally":
        """Run the split on the calibration data chunk by chunk. Unless ``full``, stop as soon as
        the harmful changes exceed what the confidence bound allows (the count only grows, so
        the answer of ``ok`` is the same; a failing candidate is usually told by its first
        chunk)."""
        cut = self.dag.crossing(end_nodes)
        codecs = {x: c for x, c in (codecs or {}).items() if x in cut}
        key = (tuple(sorted((x, b) for x, b in bits.items() if x in cut and b < 32 and x not in codecs)),
               tuple(sorted(codecs.items())))
        if not key[0] and not key[1]:   # nothing lossy crosses: the model itself
            if self.reference is None:
                return Tally(0.0, 0, self.n)
            harmful = int(self.own_harm.sum()) if self.mode != "l2" else 0
            return Tally(self._value(self.unquantized), harmful, self.n)
        tally = self._cache.get(key)
        if tally is not None and (tally.done(self.n) or not full):
            return tally
        self._check_size()
        stop = None if full or not self.bounded else self._allowed()
        # Each calibration sample's crossing tensors are quantized on their own, as each
        # request is when deployed (one scale per tensor per request, not per batch).
        e32 = self._halves.get(frozenset(end_nodes), ())[0]
        _, c, boundary = self._halves.get(frozenset(end_nodes), key[0])
        names = [x.name for x in boundary.crossings]
        harmful, seen, outs = 0, 0, []
        self.evals += 1
        with torch.no_grad():
            for k, (lo, hi) in enumerate(self.chunks):
                vals = self._crossing_values(e32, names, k)
                payload = [self._sent(v, x.kind, x.bits, codecs.get(x.dag_node))
                           for v, x in zip(vals, boundary.crossings)]
                out = self._flat(c(*payload))
                outs.append(out)
                harmful += self._harmful(out, lo, hi, RISK_MARGIN if key[0] else CODEC_RISK_MARGIN)
                seen = hi
                self.samples_run += hi - lo
                if stop is not None and harmful > stop:
                    break
        value = self._value(torch.cat(outs)) if seen == self.n else None
        tally = Tally(value, harmful, seen)
        self._cache[key] = tally
        return tally

    def _at_risk_rows(self, ref: torch.Tensor, out: torch.Tensor, lo: int, hi: int, margin: float) -> torch.Tensor:
        """Samples ``lo:hi`` whose kept answer (the label the reference got right, or the
        reference's answer) ``out`` changed or nearly changed from ``ref``'s margin."""
        if self.mode == "labels":
            y = self.labels.reshape(-1)[lo:hi]
            return self.ref_right[lo:hi] & _at_risk(ref, out, y, margin)
        return _at_risk(ref, out, self.reference_out[lo:hi].argmax(1), margin)

    def _harmful(self, out: torch.Tensor, lo: int, hi: int, margin: float) -> int:
        """Samples harmed: by the split's quantization (near changes from the compiled model's
        own outputs, ``margin``), or already by the model against the reference (``own_harm``)."""
        if self.mode == "l2":
            return 0
        split = self._at_risk_rows(self.unquantized[lo:hi], out, lo, hi, margin)
        return int((split | self.own_harm[lo:hi]).sum())

    def _value(self, out: torch.Tensor) -> float:
        ref = self.reference_out
        if self.mode == "labels":
            right = out.argmax(1) == self.labels.reshape(-1)
            return self.ref_acc - right.float().mean().item()
        if self.mode == "agreement":
            return (out.argmax(1) != ref.argmax(1)).float().mean().item()
        # per request: the worst input decides
        k = self.request
        d = (out - ref).reshape(-1, k * out.shape[1]).norm(dim=1)
        r = ref.reshape(-1, k * ref.shape[1]).norm(dim=1).clamp_min(1e-12)
        return (d / r).max().item()

    def _allowed(self) -> int:
        """Most harmful changes in the calibration set with which a plan still passes."""
        conf, k = self.settings.accuracy_confidence, -1
        while k + 1 < self.n and flip_bound(k + 1, self.n, conf) <= self.budget + 1e-12:
            k += 1
        return k

    def _check_size(self) -> None:
        if not self.bounded:
            return
        conf = self.settings.accuracy_confidence
        need = samples_needed(self.budget, conf)
        if self.n < need:
            raise CalibrationTooSmall(
                f"accuracy_budget={self.budget:g} at {conf:.0%} confidence needs at least {need} "
                f"calibration samples (with fewer, a quantized plan could pass only by chance); got "
                f"{self.n}. Give more calibration data, raise accuracy_budget, or lower "
                "accuracy_confidence (None: no statistical claim)")

    def metric(self, end_nodes: Iterable[str], bits: dict[str, int],
               codecs: Mapping[str, str] | None = None) -> float:
        """Measured accuracy loss of the split (drop, disagreement or relative L2 by mode); memoized."""
        value = self._measure(end_nodes, bits, codecs, full=True).value
        assert value is not None
        return value

    def bound(self, end_nodes: Iterable[str], bits: dict[str, int],
              codecs: Mapping[str, str] | None = None) -> float:
        """What ``ok`` compares with the budget: the confidence bound of the rate of harmful
        changes, or the measured metric when unbounded (l2 mode, ``accuracy_confidence=None``)."""
        if not self.bounded:
            return self.metric(end_nodes, bits, codecs)
        harmful = self._measure(end_nodes, bits, codecs, full=False).harmful
        cut = self.dag.crossing(end_nodes)
        lossy = any(b < 32 for x, b in bits.items() if x in cut) or any(x in cut for x in (codecs or {})) \
            or self.reference is not None   # the model itself differs from the reference
        if not lossy:
            return 0.0
        if self.budget <= 0:
            return 0.0 if harmful == 0 else 1.0
        return flip_bound(harmful, self.n, self.settings.accuracy_confidence)

    def ok(self, end_nodes: Iterable[str], bits: dict[str, int],
           codecs: Mapping[str, str] | None = None) -> bool:
        return self.bound(end_nodes, bits, codecs) <= self.budget + 1e-12

    def min_bits(self, end_nodes: Iterable[str], allowed: Sequence[int] | None = None,
                 codecs: Mapping[str, str] | None = None) -> int | None:
        """Fewest uniform bits for the crossing tensors that meet the budget.

        Model inputs that cross keep ``Settings.input_width`` (or go through ``codecs``). None
        when even the most bits allowed break the budget. A binary search, not a scan from the
        fewest up: a scan would be cheaper (a failing check stops within its first samples) but
        tries more widths per cut, and every extra try is a chance for a width that is not good
        enough to pass by luck (on digits a scan let one of 18 plans exceed the budget).
        """
        end_nodes = frozenset(end_nodes)
        allowed = sorted(allowed or self.settings.bits)
        cut = self.dag.crossing(end_nodes)
        ib = self.settings.input_width
        def ok(b: int) -> bool:
            return self.ok(end_nodes, plan_bits(self.dag, cut, b, ib), codecs)
        if not any(self.dag.info[x].quantizable for x in cut if x not in self.dag.inputs):
            return allowed[0] if ok(allowed[0]) else None
        lo, hi = 0, len(allowed) - 1
        if not ok(allowed[hi]):
            return None
        while lo < hi:   # accuracy is monotone in bits: find the first that passes
            mid = (lo + hi) // 2
            if ok(allowed[mid]):
                hi = mid
            else:
                lo = mid + 1
        return allowed[lo]


def _at_risk(ref: torch.Tensor, out: torch.Tensor, cls: torch.Tensor, share: float) -> torch.Tensor:
    """Samples whose answer ``cls`` the split changed or nearly changed: its margin over the
    runner-up fell below ``share`` of the unquantized model's (or turned negative).

    Counting near changes, not only changes, is what makes the bound hold after a search: the
    planner tries many (cut, bits) candidates and keeps the cheapest that passes, so a
    candidate whose few flips all happened to miss the calibration set would be picked; its
    near changes do not miss it."""
    def margin(y: torch.Tensor) -> torch.Tensor:
        own = y.gather(1, cls[:, None]).squeeze(1)
        other = y.scatter(1, cls[:, None], float("-inf")).amax(1)
        return own - other
    m_ref, m_out = margin(ref), margin(out)
    return (m_out <= 0) | (m_out < share * m_ref)


