"""``coach_fx.train_cut``: a bottleneck trained at a cut of a small digits CNN crosses far fewer
bytes at the held-out accuracy of the untrained cut; the compiled halves compute the student;
training is deterministic and resumes from its safetensors checkpoint."""
import pytest
import torch
from torch import nn

import coach_fx
from coach_fx.cut_training import CutTraining, choose_cuts
from coach_fx.passes.bottleneck import bottlenecks

pytest.importorskip("sklearn", reason="the digits are scikit-learn's")

from coach_fx.zoo.digits import digits_splits  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.b(self.a(x))


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    (xtr, ytr), (xc, yc), (xt, yt) = digits_splits()
    m = Net()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(m(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    batches = [xtr[i:i + 64] for i in range(0, len(ytr), 64)]
    return m, batches, (xc, yc), (xt, yt)


def top1(f, x, y):
    with torch.no_grad():
        return (f(x).argmax(1) == y).float().mean().item()


OPTIONS = dict(cuts=["a_1"], reduction=4, epochs=60, progress=False)


@pytest.fixture(scope="module")
def student(digits):
    m, batches, _, _ = digits
    return coach_fx.train_cut(m, batches, **OPTIONS)


def test_a_trained_cut_sends_4x_fewer_bytes_at_the_untrained_cut_s_held_out_accuracy(digits, student):
    m, _, _, (xt, yt) = digits
    x = xt[:1]
    untrained = coach_fx.compile(m, (x,), strategy="manual", end_nodes=["a_0", "a_1"], bits=8,
                                 costs="analytic", progress=False)
    (cut,) = student.meta["coach_cuts"]
    assert cut.after == "a_1" and cut.code_shape == (1, 8, 8, 8)
    code = "coach_cut_0_enc"
    trained = coach_fx.compile(student, (x,), strategy="manual", end_nodes=["a_0", "a_1", code], bits=8,
                               costs="analytic", progress=False)
    assert trained.plan.cut == (code,) and untrained.plan.cut == ("a_1",)
    sent = {name: cm.dag.info[cm.plan.cut[0]].numel * cm.plan.bits[cm.plan.cut[0]] / 8
            for name, cm in (("untrained", untrained), ("trained", trained))}
    assert sent["untrained"] / sent["trained"] >= 4
    acc_u, acc_t, acc_m = top1(untrained, xt, yt), top1(trained, xt, yt), top1(m, xt, yt)
    print(f"\nheld-out top-1: model {acc_m:.4f}, untrained cut at 8 bits {acc_u:.4f} ({sent['untrained']:.0f} B), "
          f"trained cut at 8 bits {acc_t:.4f} ({sent['trained']:.0f} B)")
    assert acc_t >= acc_u - 0.02    # 540 test digits: within 11 of the untrained cut's answers


def test_the_compiled_halves_compute_the_student(digits, student):
    _, _, _, (xt, _) = digits
    cm = coach_fx.compile(student, (xt[:1],), strategy="manual", end_nodes=["a_0", "a_1", "coach_cut_0_enc"],
                          bits=32, costs="analytic", progress=False)
    with torch.no_grad():
        for k in range(5):
            assert torch.allclose(cm(xt[k:k + 1]), student(xt[k:k + 1]), atol=1e-5)


def test_the_planner_prices_the_code_and_measures_against_the_original_model(digits, student):
    """Compiled with ``reference=`` the teacher, every plan of the student is checked against the
    teacher's answers; planned where the link is narrow, the code (not the wide cut) crosses."""
    m, _, (xc, yc), (xt, yt) = digits
    cm = coach_fx.compile(student, (xt[:1],), calibration=(xc, yc), reference=m, accuracy_confidence=None,
                          accuracy_budget=0.05, network=coach_fx.Network(0.5), end=coach_fx.Device("end", 2),
                          costs="analytic", progress=False)
    assert cm.oracle.reference is m
    assert cm.plan.accuracy is not None and cm.plan.accuracy <= 0.05
    # the drop is the teacher's accuracy minus the plan's, on the calibration split
    assert abs(cm.plan.accuracy - (top1(m, xc, yc) - top1(cm, xc, yc))) < 1e-6


@pytest.mark.parametrize("finetune", [False, True], ids=["bottlenecks", "finetuned"])
def test_training_is_deterministic_and_resumes_from_its_checkpoint(digits, tmp_path, finetune):
    # finetuned: two parameter groups, numbered by the optimizer in group order
    m, batches, _, _ = digits
    opts = dict(cuts=["a_1"], reduction=4, epochs=3, progress=False, checkpoint_every=5, finetune=finetune)
    a = coach_fx.train_cut(m, batches, **opts)
    b = coach_fx.train_cut(m, batches, **opts)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    class Stops:
        """The data, interrupted after ``at`` batches on its first pass (a killed run)."""

        def __init__(self, at):
            self.at, self.seen = at, 0

        def __len__(self):
            return len(batches)

        def __iter__(self):
            for x in batches:
                self.seen += 1
                if self.seen == self.at:
                    raise KeyboardInterrupt
                yield x

    ck = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        coach_fx.train_cut(m, Stops(17), checkpoint=ck, **opts)
    assert ck.is_file()
    resumed = coach_fx.train_cut(m, batches, checkpoint=ck, **opts)
    for (name, p), q in zip(a.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    with pytest.warns(RuntimeWarning, match="another recipe"):
        coach_fx.train_cut(m, batches, checkpoint=ck, **{**opts, "reduction": 8})


def test_a_compiled_model_is_trained_and_planned_again_with_its_settings(digits):
    m, batches, (xc, yc), (xt, _) = digits
    cm = coach_fx.compile(m, (xt[:1],), calibration=(xc, yc), accuracy_confidence=None, accuracy_budget=0.05,
                          network=coach_fx.Network(0.5), costs="analytic", progress=False)
    again = coach_fx.train_cut(cm, batches, cuts=["a_1"], reduction=4, epochs=5, progress=False)
    assert isinstance(again, coach_fx.CompiledModel)
    assert again.settings.reference is cm.gm and again.settings.network == cm.settings.network
    assert len(bottlenecks(again.gm)) == 1


def test_cuts_are_chosen_at_an_image_input_and_apart(digits):
    import torchvision
    from coach_fx.driver import traced
    from coach_fx.settings import Settings
    gm, _ = traced(torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 64, 64),),
                   Settings.of(costs="analytic", progress=False))
    from coach_fx.passes.annotate import meta
    points = choose_cuts(gm, CutTraining(candidates=3, span=0.6))
    names = list(points)
    assert names[0] == "x" and points["x"].stride == 4 and points["x"].channels == 8
    shape = {n.name: meta(n).shape for n in gm.graph.nodes}
    codes = {v: points[v].code_shape(shape[v]) for v in names}
    assert len(names) == 3
    assert len({shape[v][2:] for v in names[1:]}) == 2       # at two resolutions, not one layer apart
    for v in names[1:]:
        assert points[v].channels == max(2, points[v].in_channels // 16)
        assert torch.Size(codes[v]).numel() < torch.Size(codes["x"]).numel()   # smaller than the image's code
    with pytest.raises(ValueError, match="needs a \\(N, C, H, W\\)"):
        choose_cuts(gm, CutTraining(cuts=["fc"]))
