"""torch.compile(backend="coach") through the installed entry point."""

from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

import coach_fx
from coach_fx import backend


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(h.mean((2, 3)))


OPTS = {"network": coach_fx.Network(10), "costs": "analytic", "progress": False}


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    backend.COMPILED.clear()
    yield
    torch._dynamo.reset()


def test_entry_point_registered():
    eps = entry_points(group="torch_dynamo_backends")
    assert "coach" in eps.names
    assert eps["coach"].load() is backend.coach_backend


def test_torch_compile_gives_eager_result():
    m = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    cm = torch.compile(m, backend="coach", options={**OPTS, "strategy": "manual",
                                                   "end_nodes": [], "manual_bits": 32})
    with torch.no_grad():
        y = cm(x)
    assert torch.allclose(y, m(x), atol=1e-6)
    assert len(backend.COMPILED) == 1
    split = backend.COMPILED[0]
    # weights became attributes of the halves, not inputs that would cross the network
    assert split.plan.cut and all(c in split.dag.inputs for c in split.plan.cut)
    assert sum(p.numel() for p in split.cloud_module.parameters()) == sum(
        p.numel() for p in m.parameters())


def test_torch_compile_coach_strategy_within_tolerance():
    m = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    cm = torch.compile(m, backend="coach", options=OPTS)
    with torch.no_grad():
        y = cm(x)
    assert ((y - m(x)).norm() / m(x).norm()).item() <= 0.02 + 1e-6


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_break_plans_each_graph():
    m = Breaks().eval()
    x = torch.randn(3, 4)
    cm = torch.compile(m, backend="coach", options=OPTS)
    with torch.no_grad():
        y = cm(x)
    assert len(backend.COMPILED) == 2
    assert ((y - m(x)).norm() / m(x).norm()).item() <= 0.05


def test_training_step_through_backend():
    m = Net().train()
    x = torch.randn(4, 3, 8, 8)
    names = None
    cm = torch.compile(m, backend="coach", options={**OPTS, "strategy": "manual",
                                                   "end_nodes": names or [], "manual_bits": 8})
    loss = cm(x).square().mean()
    loss.backward()
    assert m.c1.weight.grad is not None and m.c1.weight.grad.abs().sum() > 0
    assert m.fc.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0


class InPlace(nn.Module):
    """In-place ops (relu_, +=) that dynamo keeps as such: the accuracy oracle must not be
    fooled by activations modified after they were produced."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.nn.functional.relu(self.c1(x), inplace=True)
        out = self.c2(h)
        out += h
        return self.fc(torch.nn.functional.relu(out, inplace=True).mean((2, 3)))


def test_oracle_sees_through_in_place_ops():
    from coach_fx.accuracy import AccuracyOracle
    from coach_fx.passes.partition import partition
    from coach_fx.settings import Settings

    m = InPlace().eval()
    x = torch.randn(1, 3, 8, 8)
    cm = torch.compile(m, backend="coach", options={**OPTS, "strategy": "end-only"})
    with torch.no_grad():
        cm(x)
        ref = m(x)
    split = backend.COMPILED[-1]
    gm, dag = split.gm, split.dag
    assert any("iadd" in str(n.target) for n in gm.graph.nodes)   # dynamo kept `out += h`
    # dynamo names c2's output "out"; with it on the end, the cloud runs `out += h` in place
    end = dag.ancestors(["out"])
    bits = {c: 2 for c in dag.crossing(end)}
    oracle = AccuracyOracle(gm, dag, Settings.of(costs="analytic"), split.example_inputs)
    e, c, _ = partition(gm, end, bits)
    with torch.no_grad():
        y = c(*e(x))
    y = y[0] if isinstance(y, (tuple, list)) else y
    err = ((y - ref).norm() / ref.norm()).item()
    # the oracle checks the example and inputs drawn like it: the worst of them, the example's included
    assert oracle.metric(end, bits) >= err * (1 - 1e-4) > 0


def test_a_train_mode_graph_is_checked_as_deployed_and_trains_as_it_was():
    """dynamo bakes train mode into the graph (``F.dropout(x, p, True, ...)``, batch norm on
    batch statistics): the accuracy check runs those calls in eval mode (two dropout draws
    differ more than any quantization, and every cut would fail), and the split halves keep
    them as captured, so training still drops out."""
    torch.manual_seed(0)
    # a narrow middle after the first dropout: the cut worth making, if its check passes
    model = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 512), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)).train()
    x = torch.randn(8, 512)
    opts = dict(OPTS, network=coach_fx.Network(1.0), end=coach_fx.Device("end", 10.0))
    compiled = torch.compile(model, backend="coach", options=opts)
    compiled(x)
    cm = backend.COMPILED[-1]
    code = cm.gm.code
    assert "dropout" in code and "True" in code       # the graph as captured, train mode
    assert cm.plan.cut and min(cm.plan.bits.values()) < 32, cm.plan.cut     # quantized cuts pass
    assert cm.plan.accuracy is not None and cm.plan.accuracy_ok
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)                      # still dropping out while training
    model.eval()
    assert torch.allclose(model(x), model(x))


def test_outputs_that_do_not_follow_the_batch_are_checked_whole():
    """A detector returns per-image scores beside its anchors (torchvision's ssdlite through
    torch.compile crashed in the accuracy check): the example is checked as one request."""

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)
            self.register_buffer("anchors", torch.rand(7, 4))

        def forward(self, x):
            scores = self.head(torch.relu(self.conv(x)).mean((2, 3)))
            return scores, self.anchors * x.shape[-1]

    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="coach", options=OPTS)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-2, rtol=1e-2)
    assert backend.COMPILED and backend.COMPILED[-1].oracle.whole


def test_a_detector_s_graphs_that_cannot_be_split_run_as_its_own_code():
    """torchvision's fasterrcnn: the graphs between dynamo's breaks that coach can plan are split;
    one whose shapes depend on the data (the box pooler) cannot be, and runs unsplit as the
    model's own code, with a warning naming it. With lossless crossings the result equals eager."""
    torchvision = pytest.importorskip("torchvision")
    import warnings
    from coach_fx.backend import FALLBACKS
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5).eval()
    x = [torch.rand(3, 160, 160)]
    compiled = torch.compile(m, backend="coach", options={"costs": "analytic", "progress": False, "bits": (32,)})
    before = len(FALLBACKS)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = compiled(x), m(x)
    assert len(FALLBACKS) > before
    assert any("runs unsplit, as the model's own code" in str(w.message) for w in caught)
    assert set(got[0]) == set(want[0]) == {"boxes", "labels", "scores"}
    for k in want[0]:
        assert torch.equal(got[0][k], want[0][k]) or torch.allclose(got[0][k].float(), want[0][k].float(), atol=1e-5)
