"""Answers of an evaluation: writing them (unsteered, steered, reference) and measuring their
perplexity under the unsteered answering model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignez_local.align.steering import Steering
from alignez_local.measures.verdicts import Verdict
from alignez_local.measures.refusal import is_refusal
from alignez_local.measures.statistics import perplexity
from alignez_local.llama.engine import Completion, Engine, Sampling

ProgressFn = Callable[[int, int], None]


@dataclass
class Answer:
    """One answer and what was measured about it."""

    text: str
    n_tokens: int
    finish: str
    nll: float = 0.0  # summed negative log-likelihood under the unsteered answering model
    ppl_tokens: int = 0
    score: float | None = None  # judge score (score mode)
    verdict: Verdict | None = None  # against the unsteered answer
    refusal_score: float | None = None  # the judge's log p(refuses) - log p(does not); None: not asked

    @property
    def ppl(self) -> float | None:
        """Return this answer's perplexity under the unsteered model, or None when not measured."""
        return perplexity(self.nll, self.ppl_tokens) if self.ppl_tokens else None

    @property
    def refusal(self) -> bool:
        """Return True when the answer opens like a refusal (the keyword detector)."""
        return is_refusal(self.text)

    @property
    def judge_refusal(self) -> bool | None:
        """Return the judge's call (refuses or deflects), None when the judge was not asked."""
        return None if self.refusal_score is None else self.refusal_score > 0.0

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this answer."""
        d: dict[str, Any] = {"answer": self.text, "n_tokens": self.n_tokens, "finish": self.finish,
                             "refusal": self.refusal, "perplexity": _round(self.ppl)}
        if self.refusal_score is not None:
            d["judge_refusal"] = self.judge_refusal
            d["judge_refusal_score"] = round(self.refusal_score, 4)
        if self.score is not None:
            d["score"] = round(self.score, 4)
        if self.verdict is not None:
            d["verdict"] = self.verdict.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Answer:
        """Return the answer of a ``to_json`` record: its text, length and finish reason only.

        Scores, verdicts and the likelihood are left unmeasured (the record keeps only a rounded
        perplexity), so ``measure_perplexity`` reads the answer again and the judge judges it again.
        """
        return cls(str(d["answer"]), int(d["n_tokens"]), str(d["finish"]))


def _round(x: float | None, nd: int = 4) -> float | None:
    """Return ``x`` rounded for JSON, or None when missing or not finite."""
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def scale_steering(st: Steering, factor: float) -> Steering:
    """Return a copy of ``st`` with every vector and profile strength multiplied by ``factor``."""
    return dataclasses.replace(
        st,
        vectors=[dataclasses.replace(v, strength=v.strength * factor) for v in st.vectors],
        profiles=[dataclasses.replace(p, strength=p.strength * factor) for p in st.profiles],
        warnings=list(st.warnings),
    )


def answer_prompts(
    engine: Engine,
    prompts: Sequence[str],
    sampling: Sampling,
    steering: Steering | None = None,
    on_progress: ProgressFn | None = None,
    into: list[Answer] | None = None,
    own_perplexity: bool = False,
) -> list[Answer]:
    """Return one answer per user prompt (chat-formatted for ``engine``), steered when given.

    Decoded as parallel sequences in chunks of two batches, so progress shows and Ctrl-C keeps the
    finished chunks (they are appended to ``into`` as they finish). A gated steering decodes each
    chunk with ``reference=True``: a prompt whose gates stay shut then gets exactly the unsteered
    condition's answer (the same chunk, decoded the same way), so the conditions differ only where
    a gate opened. ``own_perplexity``: ``engine``
    is the model perplexity is measured under; when no steering is active the answer's likelihood
    is taken from the generation itself (``Completion.token_logprobs``), so ``measure_perplexity``
    need not read the text again.
    """
    out = into if into is not None else []
    texts = [engine.prompt(p) for p in prompts]
    step = 2 * engine.n_parallel
    for start in range(0, len(texts), step):
        part = texts[start : start + step]
        comps: list[Completion] = (
            steering.generate(engine, part, sampling, reference=True) if steering is not None else engine.generate(part, sampling)
        )
        plain = own_perplexity and (steering is None or not steering.active)
        for c in comps:
            a = Answer(c.text, c.n_tokens, c.finish_reason)
            if plain and c.text and len(c.token_logprobs):
                a.nll, a.ppl_tokens = float(-np.sum(c.token_logprobs)), int(len(c.token_logprobs))
            out.append(a)
        if on_progress is not None:
            on_progress(len(out), len(texts))
    return out


def measure_perplexity(
    engine: Engine, prompts: Sequence[str], answers: Sequence[Answer], on_progress: ProgressFn | None = None
) -> None:
    """Return None after setting ``nll`` and ``ppl_tokens`` of every answer: its likelihood under ``engine``
    as it is (unsteered). Identical (prompt, answer) pairs are scored once; answers whose likelihood
    is already known from their generation (``ppl_tokens`` set) are not read again."""
    todo = [(engine.prompt(p), a) for p, a in zip(prompts, answers) if a.text and not a.ppl_tokens]
    cache: dict[tuple[str, str], tuple[float, int]] = {}
    step = 4 * engine.n_parallel
    for start in range(0, len(todo), step):
        part = todo[start : start + step]
        uniq = list(dict.fromkeys((p, a.text) for p, a in part if (p, a.text) not in cache))
        if uniq:
            lps = engine.continuation_logprobs([p for p, _ in uniq], [t for _, t in uniq])
            for key, lp in zip(uniq, lps):
                cache[key] = (float(-lp.sum()), int(lp.size))
        for p, a in part:
            a.nll, a.ppl_tokens = cache[(p, a.text)]
        if on_progress is not None:
            on_progress(min(start + step, len(todo)), len(todo))
