"""How well a judge (or the model's own PMI reading) tells behaviours and relevance apart, on the
hand-made examples in ``data/judge_examples.jsonl`` (used by ``scripts/judge_accuracy.py`` and the tests).

The examples come in groups per question (and persona): answers meant to pass (show the persona,
address the question) and answers meant to fail. Two figures per check:
- accuracy: P(Yes) >= 0.5 exactly for the answers meant to pass;
- ordering: every answer meant to pass scores above every answer of the same group meant to fail
  (what steering's comparisons rely on: a biased but ordered reader still ranks conditions rightly).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from alignez_local.measures.scoring import RELEVANCE_QUESTION, Scorer, pmi_relevance
from alignez_local.measures.behaviour import JudgeMeasure
from alignez_local.evaluation.judge import Judge


def load_examples(check: str | None = None) -> list[dict[str, Any]]:
    """Return the hand-made examples (only those of ``check``, "behaviour" or "relevance", when given)."""
    text = resources.files("alignez_local").joinpath("data/judge_examples.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if check is None or r["check"] == check]


def judge_probabilities(judge: Judge, examples: Sequence[dict[str, Any]], contrast: bool = True,
                        template: str = "") -> np.ndarray:
    """Return the judge's reading per example: the behaviour measure ``steer`` uses for its persona
    (with ``contrast``, against the example's negative persona, as for an axis with both poles;
    without, P(Yes) to the persona's question alone), or P(Yes) to the relevance question.
    ``template``: another wording of the behaviour question ("" is ``JudgeMeasure``'s)."""
    out = np.zeros(len(examples))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(examples):
        key = (ex["persona"], ex.get("negative", "") if contrast else "") if ex["check"] == "behaviour" else ("", "")
        groups.setdefault(key, []).append(i)
    for (persona, negative), idx in groups.items():
        qs, ans = [examples[i]["question"] for i in idx], [examples[i]["answer"] for i in idx]
        if persona:
            out[idx] = JudgeMeasure("judge", "", persona=persona, contrast=negative, template=template).scores(qs, ans, judge)
        else:
            out[idx] = judge.yes_probability(RELEVANCE_QUESTION, list(zip(qs, ans)))
    return out


def pmi_probabilities(scorer: Scorer, examples: Sequence[dict[str, Any]]) -> np.ndarray:
    """Return the PMI relevance reading per (relevance) example, referenced to the median of the
    examples meant to be relevant (``steer`` references it to the unsteered answers)."""
    pmi = scorer.pmi([ex["question"] for ex in examples], [ex["answer"] for ex in examples])
    return pmi_relevance(pmi, float(np.median([v for v, ex in zip(pmi, examples) if ex["expected"]])))


def figures(examples: Sequence[dict[str, Any]], p: np.ndarray, check: str) -> tuple[int, int, int, int]:
    """Return (right, n, comparisons ordered right, comparisons) for ``check``."""
    idx = [i for i, ex in enumerate(examples) if ex["check"] == check]
    right = sum(bool(p[i] >= 0.5) == bool(examples[i]["expected"]) for i in idx)
    def key(i: int) -> tuple[str, Any]:
        return examples[i]["question"], examples[i].get("persona")
    pairs = [(a, b) for a in idx for b in idx if key(a) == key(b) and examples[a]["expected"] and not examples[b]["expected"]]
    return right, len(idx), sum(bool(p[a] > p[b]) for a, b in pairs), len(pairs)
