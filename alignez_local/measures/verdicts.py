"""From a judge's margins (nats) to verdicts: win, tie or loss for a candidate answer against a
baseline answer. Numbers in, outcomes out; the judge that reads the margins is ``evaluation/judge.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """One candidate-vs-baseline judgment.

    ``outcome`` is "win", "tie" or "loss" for the candidate; ``margin`` the candidate's advantage in
    nats (score mode: score difference; pairwise: the order-averaged preference). ``details`` holds
    the raw numbers: scores (score mode) or the per-order preferences (pairwise).
    """

    outcome: str
    margin: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this verdict."""
        return {"outcome": self.outcome, "margin": round(float(self.margin), 4), **self.details}


def outcome_from_margin(diff: float, margin: float) -> str:
    """Return "win", "loss" or "tie" for a candidate advantage ``diff`` (tie when |diff| < margin)."""
    if diff >= margin:
        return "win"
    if diff <= -margin:
        return "loss"
    return "tie"


def verdicts_from_scores(candidate: Sequence[float], baseline: Sequence[float], margin: float) -> list[Verdict]:
    """Return score-mode verdicts: candidate score minus baseline score, tie when |diff| < margin."""
    return [
        Verdict(outcome_from_margin(float(c) - float(b), margin), float(c) - float(b),
                {"score_candidate": round(float(c), 4), "score_baseline": round(float(b), 4)})
        for c, b in zip(candidate, baseline)
    ]


def pairwise_outcome(pref_first: float, pref_second: float, margin: float) -> tuple[str, float]:
    """Return (outcome, averaged preference) from the candidate's preference in both orders.

    Win only when both orders prefer the candidate and their mean is at least ``margin``; loss in
    the mirror case; otherwise tie.
    """
    mean = (pref_first + pref_second) / 2.0
    if pref_first > 0 and pref_second > 0 and mean >= margin:
        return "win", mean
    if pref_first < 0 and pref_second < 0 and mean <= -margin:
        return "loss", mean
    return "tie", mean
