"""Small configurations of models users bring, with random weights and an example input:
timm image models at 64x64 and transformers' GPT-2, BERT and ViT with two layers. For the
model tests (``tests/models``) and the planner benchmark; nothing is downloaded.

Example::

    >>> model, inputs = SMALL_MODELS["timm-convnext_nano"]()     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _timm(name: str, **kw: object) -> Callable[[], Built]:
    def build() -> Built:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval(), \
            (torch.randn(2, 3, 64, 64),)
    return build


def _torchvision(name: str) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision
        return getattr(torchvision.models, name)(num_classes=10).eval(), (torch.randn(2, 3, 64, 64),)
    return build


def gpt2() -> Built:
    import transformers
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 500, (2, 16)),)


def bert() -> Built:
    import transformers
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=500)
    return transformers.BertModel(cfg).eval(), (torch.randint(0, 500, (2, 16)),)


def vit() -> Built:
    import transformers
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                 intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(cfg).eval(), (torch.randn(2, 3, 32, 32),)


SMALL_MODELS: dict[str, Callable[[], Built]] = {
    "torchvision-resnet18": _torchvision("resnet18"),
    "torchvision-mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "timm-convnext_nano": _timm("convnext_nano"),
    "timm-levit_128s": _timm("levit_128s", img_size=64),
    "timm-resnet50d": _timm("resnet50d"),
    "timm-efficientnet_b0": _timm("efficientnet_b0"),
    "timm-vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", img_size=64),
    "transformers-gpt2": gpt2,
    "transformers-bert": bert,
    "transformers-vit": vit,
}
