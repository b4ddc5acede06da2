"""``python -m coach_fx.zoo``: train (or load from the cache) the camera-digits zoo and print it."""

from __future__ import annotations

import argparse
import sys

from coach_fx.zoo.camera import FRAME, TRAINED, _load_or_train


def main(argv: list[str] | None = None) -> int:
    """Train or load each model and print model, test top-1, train seconds, parameters."""
    p = argparse.ArgumentParser(prog="python -m coach_fx.zoo", description=main.__doc__)
    p.add_argument("--models", nargs="+", default=list(TRAINED))
    p.add_argument("--frame", type=int, default=FRAME)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for name in a.models:
        model, meta = _load_or_train(name, a.frame, a.seed, None, None)
        params = sum(t.numel() for t in model.parameters())
        rows.append((name, meta["recipe"]["epochs"], meta["test_top1"], meta["train_s"], params))
    print(f"{'model':<14} {'epochs':>6} {'test top-1':>10} {'train s':>8} {'params':>10}")
    for name, ep, acc, secs, params in rows:
        print(f"{name:<14} {ep:>6} {acc:>10.4f} {secs:>8.1f} {params:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
