"""A small progress bar on stderr (no extra dependency); silent when not a terminal or disabled."""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """``bar = Progress("profiling"); bar.update(3, 10); bar.close()``.

    Draws only after ``delay`` seconds, so quick work prints nothing; ``fn`` replaces the bar.
    """

    def __init__(self, label: str, enabled: bool = True, delay: float = 0.5,
                 fn: Callable[[int, int, str], None] | None = None) -> None:
        self.label, self.fn, self.delay = label, fn, delay
        self.enabled = enabled and (fn is not None or sys.stderr.isatty())
        self.start = time.monotonic()
        self.drawn = False

    def update(self, done: int, total: int, label: str | None = None) -> None:
        if not self.enabled:
            return
        label = label or self.label
        if self.fn is not None:
            self.fn(done, total, label)
            return
        if time.monotonic() - self.start < self.delay and done < total:
            return
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label:<12} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                         f"{time.monotonic() - self.start:5.1f}s")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False
