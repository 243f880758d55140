"""What every strength search returns, whatever it chooses by.

Three searches choose a steering file's default strength, each named for what it chooses by:
``strength_by_behaviour`` (the default for ``steer``: the behaviour, with relevance and fluency
guards, beside prompting and a random direction), ``strength_by_refusals`` (the gated refusal
vector: refusals of risky requests within an over-refusal budget) and ``strength_by_kl`` (``alignez
export``: the largest strength that keeps perplexity and next-token KL in bounds). Their results
share one shape, declared here, so a file, a report or a line of output treats them alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar


class StrengthChoice(Protocol):
    """A chosen default strength and the evidence for it."""

    strength: float

    @property
    def rule(self) -> str:
        """What the strength was chosen by: "behaviour", "refusals" or "kl"."""
        ...

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready record (stored in the file's calibration and in report.json)."""
        ...

    def line(self, what: str) -> str:
        """Return one line about the choice for ``what`` ("vector", "profile")."""
        ...


Calibrated = TypeVar("Calibrated")


def with_strength(steering_file: Calibrated, choice: StrengthChoice) -> Calibrated:
    """Return a copy of a control vector or profile carrying ``choice`` as its default strength
    and calibration record."""
    return dataclasses.replace(steering_file, default_strength=choice.strength,  # type: ignore[type-var]
                               calibration=choice.as_dict())
