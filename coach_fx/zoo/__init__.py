"""A zoo of torchvision models trained here on camera-like frames of scikit-learn's digits
(no download): see :mod:`coach_fx.zoo.camera`.

    >>> from coach_fx.zoo import load_trained, camera_digits      # doctest: +SKIP
    >>> model, splits = load_trained("resnet18"), camera_digits()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["FRAME", "TRAINED", "EPOCHS", "LR", "Split", "Splits", "render", "camera_digits",
           "split_indices", "build", "train", "top1", "load_trained", "trained_accuracy"]

if TYPE_CHECKING:
    from coach_fx.zoo.camera import (EPOCHS, FRAME, LR, TRAINED, Split, Splits, build,  # noqa: F401
                                     camera_digits, load_trained, render, split_indices, top1,
                                     train, trained_accuracy)


def __getattr__(name: str) -> Any:
    # Imported on first use, not here: ``python -m coach_fx.zoo.camera`` would otherwise find
    # the module already imported by this package and runpy warns.
    if name in __all__:
        from coach_fx.zoo import camera
        return getattr(camera, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
