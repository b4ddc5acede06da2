"""Model specs for the CLI and benchmarks: ``torchvision:NAME``, ``digits`` (``digits:32``: camera-sized
frames) or ``package.module:callable``.

Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import nn

#: Constructor options that keep torchvision models download-free and deterministic to trace.
_TV_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": False},
               "inception_v3": {"aux_logits": False, "init_weights": False}}


def load_model(spec: str, seed: int = 0, weights: str | None = None,
               input_shape: Sequence[int] | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """(model in eval mode, input shape without batch) for ``spec``; ``weights``: a
    ``.safetensors`` state dict to load into it (strictly); ``input_shape`` (without batch)
    overrides the model's own."""
    model, shape = _load(spec, seed, input_shape)
    if weights is not None:
        model.load_state_dict(read_weights(weights))
    return model, tuple(input_shape) if input_shape else shape


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file (never a pickle: no torch.load)."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"weights {path!r}: only .safetensors files are read (a pickled "
                         "checkpoint can run code when loaded); convert it with "
                         "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    from safetensors.torch import load_file
    return load_file(path)


def _load(spec: str, seed: int, input_shape: Sequence[int] | None) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    if spec in ("digits", "digits:"):
        spec = "digits:8"
    if ":" not in spec:
        spec = "torchvision:" + spec
    source, name = spec.split(":", 1)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise SystemExit("torchvision models need the 'vision' extra: pip install 'coach-fx[vision]'")
        try:
            model = torchvision.models.get_model(name, weights=None, **_TV_OPTIONS.get(name, {}))
        except ValueError as e:
            raise SystemExit(f"unknown torchvision model {name!r}: {e}")
        if name.startswith("vit_"):
            # torchvision zero-initialises the ViT head; give it weights so outputs are not all 0
            nn.init.normal_(model.heads.head.weight, std=0.02)
        size = 299 if name == "inception_v3" else 224
        return model.eval(), (3, size, size)
    if source == "digits":
        from coach_fx.zoo.digits import load_digits_model
        frame = int(name) if name.isdigit() else 8
        return load_digits_model(frame), (1, frame, frame)
    module = importlib.import_module(source)
    fn = getattr(module, name)
    model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise SystemExit(f"{spec}: give --input-shape (without batch, e.g. 3,224,224) or an "
                         "`input_shape` attribute on the model")
    return model.eval(), tuple(shape)
