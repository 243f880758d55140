"""Keep the pairs that show the behaviour: the axis's own checker reads the model's answers.

A small model asked for a behaviour often does not show it: on Qwen2.5-Coder-0.5B, 38% of the
answers it wrote when told to talk like a pirate carry pirate words, 8% of those it wrote when told
to answer in capitals are in capitals. A difference of means over every pair is then mostly the
difference between two ordinary answers: noise the behaviour's share of the pairs has to outweigh.
Where the axis has an objective checker (``measures.behaviour``: language, brevity, markers,
capitals, refusal), a pair is kept only when its positive answer shows the behaviour and its negative
answer does not. The judge's measure is not used here (it would cost a judge pass per answer, and
the self-check already reads the pairs with the model's own log-probabilities).

When fewer than ``MIN_PAIRS`` pairs survive, every pair is kept and the record says why: a vector
from three pairs is noise of another kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alignez_local.align.fit import one_answer_pairs
from alignez_local.align.preferences import PreferencePair
from alignez_local.measures.behaviour import Measure

MIN_PAIRS = 8


def keep_contrasting(pairs: Sequence[PreferencePair], measure: Measure | None,
                     min_pairs: int = MIN_PAIRS) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Return the pairs whose positive answer shows the behaviour (score >= 0.5) and whose negative
    does not, by ``measure``, and a record of what was done (``filter_line`` prints it).

    Every pair is returned unchanged when there is no objective measure, when the pairs are one
    answer read under two personas (both sides are the same text), or when too few would remain."""
    n = len(pairs)
    if measure is None or measure.needs_judge:
        return list(pairs), {"applied": False, "reason": "no objective checker for this axis", "total": n}
    if one_answer_pairs(pairs):
        return list(pairs), {"applied": False, "reason": "each pair is one answer read under both personas", "total": n}
    questions = [p.query for p in pairs]
    pos = measure.scores(questions, [p.positive for p in pairs], None) >= 0.5
    neg = measure.scores(questions, [p.negative for p in pairs], None) >= 0.5
    keep = pos & ~neg
    record: dict[str, Any] = {"measure": measure.key, "total": n, "positive_shows": int(pos.sum()),
                              "negative_shows": int(neg.sum()), "contrasting": int(keep.sum())}
    if int(keep.sum()) < min_pairs:
        return list(pairs), {**record, "applied": False,
                             "reason": f"only {int(keep.sum())} pairs show the contrast (fewer than {min_pairs})"}
    return [p for p, k in zip(pairs, np.asarray(keep)) if k], {**record, "applied": True}


def filter_line(record: dict[str, Any]) -> str:
    """Return the one line ``steer`` prints about the behaviour filter."""
    if "contrasting" not in record:
        return f"behaviour filter: off ({record['reason']})"
    counts = (f"the positive answer shows it in {record['positive_shows']} of {record['total']} pairs, "
              f"the negative in {record['negative_shows']}")
    if record["applied"]:
        return f"behaviour filter ({record['measure']}): {counts}; fitting on the {record['contrasting']} that contrast"
    return f"behaviour filter ({record['measure']}): {counts}; {record['reason']}: fitting on all"
