"""A progress line with an ETA on stderr (one line per update when stderr is not a terminal).

Work is counted in items (pairs, prompts) and, where the caller knows them, in tokens: prompt tokens
fed plus tokens generated, against a token budget (every prompt's tokens plus its ``max_tokens``).
Items alone give a poor ETA when they differ in size; tokens alone overestimate the remaining work,
because answers usually stop before their budget. ``estimate_remaining`` combines the two: once items
have finished, the remaining items are expected to cost what the finished ones cost on average, at
the token rate measured since the first finished batch (the first batch also pays for start-up).
The line shows the tokens done against the budget. The pure function is tested on a recorded trace.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol
from dataclasses import dataclass, field

PROMPT_TOKEN_COST = 0.15
"""Cost of feeding one prompt token relative to generating one token (batched prefill is cheaper:
measured on SmolLM2, 1 thread, about 1/6 to 1/8 of a generated token; the ETA only needs the order)."""


def _fmt(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def token_work(prompt_tokens: int, generated_tokens: int) -> float:
    """Return the work of feeding ``prompt_tokens`` and generating ``generated_tokens``, in generated-token units."""
    return PROMPT_TOKEN_COST * prompt_tokens + generated_tokens


def estimate_remaining(
    elapsed: float, items_done: int, items_total: int, work_done: float,
    anchor: tuple[float, float] | None = None,
) -> float:
    """Return the estimated seconds left (nan while there is nothing to go on).

    ``work_done`` is the work of the items done so far in this run (tokens, or items when the caller
    has no token counts). The token budget is not used as a cap: estimated from the prompts before
    they are run, it was off by a few percent, and near the end a few percent of the budget is most
    of what is left. ``anchor`` = (seconds, work) at the first finished batch: the rate is measured from there, because
    the first batch also pays for start-up (loading, the first prompts) and would make the rate look slow.
    """
    if items_done >= items_total:
        return 0.0
    t0, w0 = anchor if anchor is not None else (0.0, 0.0)
    if elapsed <= t0 or work_done <= w0 or items_done <= 0:
        return float("nan")
    remaining = work_done / items_done * (items_total - items_done)
    return remaining / ((work_done - w0) / (elapsed - t0))


@dataclass
class Trace:
    """What a Progress saw at every update: (seconds since start, items done, work done, budget left or None)."""

    points: list[tuple[float, int, float, float | None]] = field(default_factory=list)


class Progress:
    """Report ``done/total`` with elapsed time and an ETA; optionally count work in tokens.

    ``update(n)`` adds finished items. Callers that know token counts pass ``work=token_work(...)``
    with it and give ``budget`` (the work of all items at their token budget); the line then shows
    tokens beside items and the ETA comes from ``estimate_remaining``.
    """

    def __init__(self, total: int, label: str, done: int = 0, quiet: bool = False, budget: float | None = None) -> None:
        self.total, self.label, self.start_done = total, label, done
        self.done = done
        self.work = 0.0
        self.budget = budget
        self.t0 = time.monotonic()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._anchor: tuple[float, float] | None = None
        self.trace = Trace()
        self.update(0)

    def update(self, n: int = 1, work: float | None = None, budget_used: float | None = None) -> None:
        """Add ``n`` finished items, their ``work`` (default: n, one unit per item) and the budget
        they had been given (``budget_used``, default ``work``)."""
        self.done += n
        self.work += n if work is None else work
        if self.budget is not None:
            self.budget -= budget_used if budget_used is not None else (n if work is None else work)
        now = time.monotonic()
        if self._anchor is None and n > 0:
            self._anchor = (now - self.t0, self.work)
        self.trace.points.append((now - self.t0, self.done - self.start_done, self.work, self.budget))
        if self.quiet:
            return
        final = self.done >= self.total
        if not final and now - self._last < (0.5 if self.tty else 10.0) and n:
            return
        self._last = now
        self._write(now - self.t0, final)

    def eta(self, elapsed: float) -> float:
        """Return the estimated seconds left, ``elapsed`` seconds into the run."""
        return estimate_remaining(elapsed, self.done - self.start_done, self.total - self.start_done,
                                  self.work, self._anchor)

    def _write(self, elapsed: float, final: bool) -> None:
        eta = self.eta(elapsed)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = _fmt(eta) if eta == eta else "--"
        tokens = f", {self.work:,.0f}/{self.work + max(0.0, self.budget):,.0f} tokens" if self.budget is not None else ""
        line = f"{self.label}: {self.done}/{self.total} ({pct:3.0f}%{tokens}) elapsed {_fmt(elapsed)} ETA {eta_s}"
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


class StageBars:
    """One ``Progress`` line per stage of a job that reports ``(stage, done, total)`` (the calibration
    by refusals: its unsteered answers, then each strength's). A new stage closes the last one's
    line and opens its own at the count it first reports, so a stage taken whole from an earlier
    run shows as done at once and the ETA of each line counts only the work done now."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.label, self.quiet = label, quiet
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or stage != self.stage:
            self.close()
            self.stage, self.bar = stage, Progress(total, f"{self.label}{stage}", done=done, quiet=self.quiet)
        else:
            self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Counted(Protocol):
    """What StageClock reads from an engine: its running decode counts (``Engine.counts``)."""

    @property
    def counts(self) -> Any: ...


class StageClock:
    """Lap times of a run's stages and the total, and what each stage cost: the tokens the model
    read and sampled (and the judge read, when it is another model) and the peak resident memory
    at the stage's end. scripts/bench_cost.py turns these into per-token rates."""

    def __init__(self, *engines: Counted | None) -> None:
        self.start = self.last = time.monotonic()
        self.laps: dict[str, float] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self._engines = list(dict.fromkeys(e for e in engines if e is not None))
        self._before = [e.counts.snapshot() for e in self._engines]
        self._cpu = cpu_seconds()

    def lap(self, name: str) -> None:
        now, cpu = time.monotonic(), cpu_seconds()
        self.laps[name], self.last = now - self.last, now
        after = [e.counts.snapshot() for e in self._engines]
        spent = [a.since(b) for a, b in zip(after, self._before)]
        self._before = after
        # CPU seconds do not count the time other jobs held the cores: on a shared machine they are
        # the figure that compares across runs (with one llama.cpp thread, about the wall time alone).
        cost: dict[str, float] = {"cpu_s": round(cpu - self._cpu, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
        self._cpu = cpu
        if spent:
            cost.update(tokens_read=spent[0].tokens, tokens_sampled=spent[0].sampled, decode_calls=spent[0].calls)
        if len(spent) > 1:
            cost.update(judge_tokens_read=sum(d.tokens for d in spent[1:]))
        self.costs[name.removesuffix("_s")] = cost

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total_s": time.monotonic() - self.start}

def cpu_seconds() -> float:
    """Return the CPU time this process has used so far (user + system, all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def peak_rss_mb() -> float:
    """Return this process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


Notify = Callable[[str], None]
"""Where a step sends its status lines and warnings (the CLI prints them on stderr)."""


def quiet(_line: str) -> None:
    """Drop a status line: the default ``Notify`` of a step run from code."""
