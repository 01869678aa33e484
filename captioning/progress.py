"""The one progress helper: ``label: done/total unit, rate, elapsed, ETA`` for long work, a tqdm
bar on a terminal, else plain lines at most one per ``interval`` seconds plus the last."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Count work done against ``total``; ``update(n, note)`` after each piece (``note``, such as the
    loss, shown until replaced), ``close()`` at the end. ``initial``: work done before (a resumed
    run), shown as done but not in the rate and ETA. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, label: str, *, unit: str = "images", enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 0.0, initial: int = 0) -> None:
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done, self.new = initial, 0
        self.note: str | None = None
        self.start = self.last = time.perf_counter()
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=f" {unit}", file=self.stream,
                             dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """This run's work per second."""
        return self.new / max(self.elapsed, 1e-9)

    @property
    def eta(self) -> float:
        """Seconds left at this run's rate (0 before any of its work)."""
        return (self.total - self.done) / self.rate if self.rate > 0 else 0.0

    def update(self, count: int, note: str | None = None) -> None:
        self.done += count
        self.new += count
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(count)
            if self.done >= self.total:
                self.close()
            return
        now = time.perf_counter()
        if now - self.last < self.interval and self.done < self.total:
            return
        self.last = now
        print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        rate = self.rate
        rate_text = f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"
        return (f"{self.label}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / max(self.total, 1):.0f}%), {rate_text} {self.unit}/s, "
                f"elapsed {format_duration(self.elapsed)}, ETA {format_duration(self.eta)}"
                + (f", {self.note}" if self.note else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
