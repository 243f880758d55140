"""What an evaluation run has produced so far: the state ``evaluate.run_eval`` fills, checkpoints
after every piece and ``report.build_report`` turns into report.json."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from alignez_local.evaluation.answers import Answer
from alignez_local.evaluation.config import EvalConfig
from alignez_local.evaluation.judge_cache import JudgeCache
from alignez_local.prompt_sets import EvalPrompt

JUDGE_CACHE = "judge_cache.jsonl"
"""A remote judge's finished judgments, in the run's folder (--resume reuses them)."""


@dataclass
class RunState:
    """What the run has produced so far (saved as is after every piece and when interrupted)."""

    cfg: EvalConfig
    prompts: list[EvalPrompt]
    stage: str = "starting"
    models: dict[str, Any] = field(default_factory=dict)
    steering_files: list[dict[str, Any]] = field(default_factory=list)
    steering_desc: list[str] = field(default_factory=list)
    unsteered: list[Answer] = field(default_factory=list)
    steered: dict[float, list[Answer]] = field(default_factory=dict)
    reference: list[Answer] = field(default_factory=list)
    judge: dict[str, Any] = field(default_factory=dict)
    judged: bool = False
    timing: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    resumed: dict[str, Any] = field(default_factory=dict)  # what --resume reused (in the report when set)
    judge_cache: JudgeCache | None = None  # a remote judge's finished judgments (OUT/judge_cache.jsonl)
    checkpointed: bool = False  # a checkpoint of this run is in report.json

    @property
    def texts(self) -> list[str]:
        """Return the prompt texts."""
        return [p.text for p in self.prompts]

    def groups(self) -> list[list[Answer]]:
        """Return every set of answers: unsteered, each strength, then the reference (when any)."""
        return ([self.unsteered] + [self.steered[s] for s in self.cfg.strengths if s in self.steered]
                + ([self.reference] if self.reference else []))

    @contextmanager
    def stage_timer(self, stage: str, key: str) -> Iterator[None]:
        """Return a context that marks ``stage`` as running and records its wall time as ``key``."""
        self.stage = stage
        t0 = time.monotonic()
        yield
        self.timing[key] = round(time.monotonic() - t0, 2)
