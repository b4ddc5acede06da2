"""``python -m coach_fx.zoo``: train (or load from the cache) the zoo and print it
(``--frames camera``: the camera-like digits, 64x64; ``--frames natural``: the natural-looking
ones, 96x96, ``coach_fx.zoo.natural``)."""

from __future__ import annotations

import argparse
import sys

from coach_fx.zoo.camera import CAMERA, TRAINED, _load_or_train


def main(argv: list[str] | None = None) -> int:
    """Train or load each model and print model, test top-1, train seconds, parameters."""
    p = argparse.ArgumentParser(prog="python -m coach_fx.zoo", description=main.__doc__)
    p.add_argument("--models", nargs="+", default=list(TRAINED))
    p.add_argument("--frame", type=int, default=None, help="frame size (default: the frame set's)")
    p.add_argument("--frames", choices=("camera", "natural"), default="camera")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    frames = CAMERA
    if a.frames == "natural":
        from coach_fx.zoo.natural import NATURAL as frames
    rows = []
    for name in a.models:
        model, meta = _load_or_train(name, a.frame, a.seed, None, None, frames)
        params = sum(t.numel() for t in model.parameters())
        rows.append((name, meta["recipe"]["epochs"], meta["test_top1"], meta["train_s"], params))
    print(f"{'model':<14} {'epochs':>6} {'test top-1':>10} {'train s':>8} {'params':>10}")
    for name, ep, acc, secs, params in rows:
        print(f"{name:<14} {ep:>6} {acc:>10.4f} {secs:>8.1f} {params:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
