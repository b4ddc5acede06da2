"""Model specs for the CLI and benchmarks: ``torchvision:NAME``, ``digits`` (``digits:32``: camera-sized
frames) or ``package.module:callable``.

Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

#: Constructor options that keep torchvision models download-free and deterministic to trace.
_TV_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": False},
               "inception_v3": {"aux_logits": False, "init_weights": False}}


def load_model(spec: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """(model in eval mode, input shape without batch) for ``spec``."""
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
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise SystemExit(f"{spec}: the model needs an `input_shape` attribute (without batch)")
    return model.eval(), tuple(shape)
