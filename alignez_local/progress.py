"""A progress line with an ETA on stderr (one line per update when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time


def _fmt(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Report ``done/total`` with elapsed time and an ETA from the rate so far."""

    def __init__(self, total: int, label: str, done: int = 0, quiet: bool = False) -> None:
        self.total, self.label, self.start_done = total, label, done
        self.done = done
        self.t0 = time.monotonic()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self.update(0)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.quiet:
            return
        now = time.monotonic()
        final = self.done >= self.total
        if not final and now - self._last < (0.5 if self.tty else 10.0) and n:
            return
        self._last = now
        elapsed = now - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = _fmt(eta) if eta == eta else "--"
        line = f"{self.label}: {self.done}/{self.total} ({pct:3.0f}%) elapsed {_fmt(elapsed)} ETA {eta_s}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def __call__(self, done: int, total: int | None = None) -> None:
        """Report an absolute count (the ``on_progress(done, total)`` callback shape)."""
        if total is not None:
            self.total = total
        self.update(done - self.done)

    def close(self) -> None:
        if self.tty and not self.quiet and self.done < self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()
