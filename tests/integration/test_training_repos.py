"""Training repositories with one line changed: the PyTorch MNIST example (its last batch is
smaller) and the ImageNet example (``--dummy -a resnet18``), with ``coach_fx.compile`` and
with ``torch.compile(backend="coach")``. Loss falls, checkpoints speak the plain model's keys,
and compiling leaves batch-norm statistics as they were."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import coach_fx

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):  # noqa: ANN202
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))   # as `python examples/NAME.py` has it
    spec = importlib.util.spec_from_file_location(f"coach_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("how", ["compile", "backend"])
def test_the_mnist_example_trains_through_its_last_smaller_batch_and_checkpoints(how, tmp_path):
    mnist = _example("mnist")
    ckpt = tmp_path / "mnist.safetensors"
    model, losses, test_losses, _ = mnist.main(["--coach", how, "--epochs", "2", "--log-interval", "100",
                                                "--save-model", str(ckpt)])
    assert len(losses) == 2 * 16                      # 1000 samples: 15 batches of 64 and one of 40
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert test_losses[-1] < test_losses[0] or test_losses[-1] < 2.0
    from safetensors.torch import load_file
    saved = load_file(ckpt)
    if how == "backend":
        # torch.compile's wrapper (not coach) prefixes every key: torch's own helper drops it
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(saved, "_orig_mod.")
    plain = mnist.Net()
    plain.load_state_dict(saved)                      # the compiled model's checkpoint, plain keys
    model.eval()
    plain.eval()
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(plain(x).exp(), model(x).exp(), atol=0.02)
    fresh = mnist.Net()
    if how == "compile":                              # and back into a compiled model
        back = coach_fx.compile(fresh, (x,), network=coach_fx.Network(10), costs="analytic",
                                progress=False)
        back.load_state_dict(plain.state_dict())
        back.eval()
        with torch.no_grad():
            assert torch.allclose(back(x).exp(), plain(x).exp(), atol=0.02)


@pytest.mark.parametrize("how", ["compile", "backend"])
def test_the_imagenet_example_trains_and_compiling_leaves_batch_norm_as_it_was(how):
    imagenet = _example("imagenet")
    model, losses, _ = imagenet.main(["--dummy", "-a", "resnet18", "--steps", "4", "--coach", how,
                                      "--lr", "0.01"])
    assert losses[-1] < losses[0]
    # one compiled step moves the statistics exactly as one eager step does
    import torchvision
    torch.manual_seed(3)
    eager = torchvision.models.resnet18(num_classes=10).train()
    torch.manual_seed(3)
    plain = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(4, 3, 64, 64)
    compiled = imagenet.with_coach(plain, how, x)
    if how == "compile":
        assert int(plain.bn1.num_batches_tracked) == 0 and plain.training
        assert torch.equal(plain.bn1.running_mean, eager.bn1.running_mean)
    compiled(x)
    eager(x)
    assert int(plain.bn1.num_batches_tracked) == 1
    # the boundary quantizes (straight through): statistics after it move a little differently
    assert torch.allclose(plain.layer4[1].bn2.running_var, eager.layer4[1].bn2.running_var, rtol=0.05, atol=1e-3)
