"""Models nobody here wrote a test for, as a new user brings them: torchvision, timm and
transformers, small configurations with random weights. Each compiles with the default
planner; a split in the middle of the model matches eager PyTorch at 32 bits (max abs error
≤ 1e-5 × max |out|) and at 8 bits (relative L2 ≤ 3 %); the output keeps its class; and the
plan equals brute force wherever brute force can run."""

from __future__ import annotations

import pytest
import torch

import coach_fx
from coach_fx.compiled import CompiledModel
from coach_fx.optimize import Problem, brute_force, coach
from coach_fx.plan import evaluate
from coach_fx.settings import Network
from coach_fx.zoo.small import SMALL_MODELS, gpt2

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NET = Network(10)
MODELS = SMALL_MODELS


def _first_float(out) -> torch.Tensor:  # noqa: ANN001
    leaves = coach_fx.passes._compat.tree_flatten(out)[0]
    return next(t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def _middle_split(cm: CompiledModel, bits: int) -> CompiledModel:
    """The same model cut after its middle articulation node (one tensor crosses)."""
    dag = cm.dag
    arts = dag.articulation_nodes()
    a = arts[len(arts) // 2]
    end = dag.nodes[: dag.index[a] + 1]
    plan = evaluate(dag, end, bits, NET)
    assert plan.cut and len(end) < len(dag.nodes)
    return CompiledModel(cm.gm, dag, plan, cm.settings, cm.example_inputs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_compiles_splits_like_eager_and_plans_like_brute_force(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    with torch.no_grad():
        want = model(*x)
    cm = coach_fx.compile(model, x, costs="analytic", network=NET, progress=False)
    with torch.no_grad():
        got = cm(*x)
    assert type(got) is type(want)             # transformers' ModelOutput class, a tensor...
    ref = _first_float(want)
    with torch.no_grad():
        out32 = _first_float(_middle_split(cm, 32)(*x))
        out8 = _first_float(_middle_split(cm, 8)(*x))
    assert (out32 - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    free = Problem(cm.dag, NET, "throughput", cm.settings.bits, cm.settings.input_width)
    if cm.dag.count_closed_sets(20_000) <= 20_000:
        assert coach(free).score == pytest.approx(brute_force(free).score, rel=1e-9)
    error = ((out8 - ref).norm() / ref.norm()).item()
    # a token tensor travels with a scale per token: ViT's class token, ~100x smaller than the
    # patch tokens it is concatenated with, keeps its precision (one scale: 0.077)
    assert error <= 0.03, f"8-bit middle split: relative L2 {error:.4f}"

def test_a_decoder_is_planned_for_one_pass_and_says_so():
    model, x = gpt2()
    cm = coach_fx.compile(model, x, costs="analytic", network=NET, progress=False)
    assert "use_cache=False" in cm.gm.meta["coach_note"]
    assert model.config.use_cache is True     # the user's model is left as it was
    with torch.no_grad():
        assert torch.allclose(cm(*x).logits, model(*x, use_cache=False).logits, atol=1e-5)


class CachesItsBias(torch.nn.Module):
    """As timm's LeViT: in eval mode a tensor computed in forward is kept in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.table = torch.nn.Parameter(torch.randn(8))
        self.cache: dict = {}

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.table * 2
        return self.fc(x) + self.cache["bias"]


def test_the_same_model_compiles_twice():
    m, x = CachesItsBias().eval(), torch.randn(2, 8)
    for _ in range(2):
        cm = coach_fx.compile(m, (x,), costs="analytic", progress=False)
        with torch.no_grad():
            assert torch.allclose(cm(x), m.fc(x) + m.table * 2, atol=1e-5)
    assert m.cache == {}                  # the tracer's proxies were not left behind
