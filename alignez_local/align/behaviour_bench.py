"""The bench a behaviour is measured on: held-out queries split into a choose half and a report
half, the scorer, and the answers of the fixed conditions (unsteered, prompting), measured once.

``steer``'s strength search (``strength_by_behaviour``) and ``alignez eval``'s behaviour table
(``evaluation/behaviour_eval``) both measure on a ``BehaviourBench`` built by ``axis_bench``, the
one place a behaviour scorer is set up. Reading answers back for their likelihood is most of the
calibration's cost: ``AnswerReader`` reads each (question, answer) once, and not at all for
answers the unsteered model wrote itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignez_local.align.axes import PreferenceAxis
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.align.steering import Steering
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.measures.behaviour import YesNoJudge, measure_for
from alignez_local.measures.scoring import ScoredAnswers, Scorer

ANSWER_TOKENS = 40
"""Greedy tokens per calibration answer (64 until issue 32). Every checker decides within the first
few dozen tokens (about 30 words here: a language, 20 words or fewer, capitals, a phrase looping
three times), and reading the answers back is most of the calibration's cost."""
CHOOSE_QUERIES = 8
REPORT_QUERIES = 16
SAMPLING = Sampling(temperature=0.0, max_tokens=ANSWER_TOKENS, repeat_penalty=1.1)


class AnswerReader:
    """(questions, answers) -> each answer's mean per-token NLL under ``engine`` (which must be
    unsteered when called) with the question as a chat prompt (``system``: under that system
    prompt); NaN for an empty answer.

    Every (question, answer) is read once: a calibration scores many answers that equal others
    (a weak strength or the random direction often leaves an answer unchanged, and the unsteered
    answers are read for the reference and again as a condition), and reading them is most of the
    calibration's work (three reads of every answer: plain, asked, and after the null question).
    Answers the unsteered engine itself wrote in this context are not read at all (``remember``):
    their generation's token log-probabilities are that reading already."""

    def __init__(self, engine: Engine, system: str | None = None) -> None:
        self.engine, self.system = engine, system
        self.seen: dict[tuple[str, str], float] = {}

    def __call__(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        keys = [(q, a) for q, a in zip(questions, answers)]
        todo = list(dict.fromkeys(k for k in keys if k[1].strip() and k not in self.seen))
        if todo:
            lps = self.engine.continuation_logprobs([self.engine.prompt(q, self.system) for q, _ in todo],
                                                    [a for _, a in todo])
            for k, lp in zip(todo, lps):
                self.seen[k] = float(-lp.mean()) if lp.size else np.nan
        return np.array([self.seen.get(k, np.nan) for k in keys], dtype=np.float64)

    def remember(self, questions: Sequence[str], completions: Sequence[Completion]) -> None:
        """Keep the NLL of answers ``engine`` wrote unsteered, under this reader's system prompt,
        from their own token log-probabilities (the raw distribution, before the repeat penalty:
        what a reading computes, up to llama.cpp's kernels: decoded a token per step rather than read
        in one batch, SmolLM2's per-token means moved by up to 0.022 nats, under 1% of a fluency).

        Only where the text tokenizes back to the tokens generated: a reading tokenizes the text, and
        a model can write a split its tokenizer would not make (the random test model mostly does),
        whose reading is then less likely than its writing; kept, such values would lower the
        fluency reference below what the steered answers, all read, are measured with."""
        for q, c in zip(questions, completions):
            key = (q, c.text)
            if (key not in self.seen and c.text.strip() and c.token_logprobs.size and c.finish_reason != "interrupted"
                    and self.engine.tokenize(c.text, add_bos=False) == list(c.tokens)):
                self.seen[key] = float(-np.mean(c.token_logprobs))


def unsteered_nll(engine: Engine, system: str | None = None) -> AnswerReader:
    """Return the reader of answers' NLL under ``engine`` (``AnswerReader``)."""
    return AnswerReader(engine, system)


def split_heldout(queries: Sequence[str], n_choose: int, n_report: int) -> tuple[list[str], list[str]]:
    """Return (choose, report): two disjoint lists of held-out queries, report taken from the end.

    Duplicates are dropped first, so no text is both chosen on and reported on.
    """
    unique = list(dict.fromkeys(queries))
    if len(unique) < 2:
        raise AlignezError("calibration needs at least two distinct held-out queries (one to choose on, one to report on)")
    n_report = min(n_report, len(unique) // 2)
    report = unique[len(unique) - n_report:]
    choose = unique[max(0, len(unique) - n_report - n_choose):len(unique) - n_report]
    return choose, report


@dataclass
class BehaviourBench:
    """Held-out queries, the scorer, and the answers of the fixed conditions (measured once).

    ``engine`` must be unsteered whenever the scorer reads (it rescores answers under the plain
    model, and the judge may be the same model). ``system`` is the prompting baseline's system
    prompt: the axis's positive guide. ``base``: the system prompt every other condition (unsteered,
    steered, the random direction) runs and is read under; None: the chat template's own (Qwen's
    and SmolLM2's templates write one of their own when none is given; issue 31 found the steered
    Qwen 0.5B refusing less under "You are a helpful assistant."). Prompting replaces it with the
    guide, as it replaces the template's. ``writer`` (``steer --generate-url``): the unsteered and
    prompting answers come from its servers (text only: the scorer reads them back locally), the
    steered ones from ``engine``.
    """

    engine: Engine
    scorer: Scorer
    system: str
    choose: list[str]
    report: list[str]
    sampling: Sampling = SAMPLING
    writer: RemoteWriter | None = None
    base: str | None = None
    _fixed: dict[tuple[str, str], ScoredAnswers] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if set(self.choose) & set(self.report):
            raise ValueError("the choose and report halves share a query")

    def completions(self, questions: Sequence[str], steering: Steering | None = None,
                    system: str | None = None) -> list[Completion]:
        """Return greedy completions of ``questions``, steered or with a system prompt (None: ``base``).

        The prompts' shared head (the system prompt, or the guide) is decoded once: on Qwen it is
        about 25 tokens of every prompt, 60 under the guide."""
        prompts = [self.engine.prompt(q, self.base if system is None else system) for q in questions]
        if steering is None and self.writer is not None:
            return self.writer.generate(prompts, self.sampling)
        return (steering or Steering()).generate(self.engine, prompts, self.sampling, share_prefix=True)

    def answers(self, questions: Sequence[str], steering: Steering | None = None, system: str | None = None) -> list[str]:
        """Return ``completions``' plain text."""
        return [c.text for c in self.completions(questions, steering, system)]

    def _unsteered(self, questions: Sequence[str], system: str | None) -> list[str]:
        """Return the unsteered answers under ``system`` (None: ``base``); the scorer's reader of that
        context keeps their NLL from the generation (``AnswerReader.remember``) instead of reading them again."""
        done = self.completions(questions, system=system)
        reader = self.scorer.nll if system is None else self.scorer.nll_asked
        context = self.base if system is None else system
        if isinstance(reader, AnswerReader) and reader.engine is self.engine and reader.system == context:
            reader.remember(questions, done)
        return [c.text for c in done]

    def fixed(self, condition: str, half: str) -> ScoredAnswers:
        """Return the scored ``unsteered`` or ``prompting`` answers on the ``choose`` or ``report``
        half, measured once."""
        if self.scorer.reference_nll is None:
            # Fluency is relative to the model's own answers, plain and when asked for the behaviour:
            # both are answered on the first half before anything is scored.
            first = "choose" if self.choose else "report"
            qs = self.choose if self.choose else self.report
            plain, asked = self._unsteered(qs, None), self._unsteered(qs, self.system)
            self.scorer.set_reference(qs, plain, asked)
            self._fixed[("unsteered", first)] = self.scorer.score(qs, plain)
            self._fixed[("prompting", first)] = self.scorer.score(qs, asked)
        key = (condition, half)
        if key not in self._fixed:
            qs = self.choose if half == "choose" else self.report
            ans = self._unsteered(qs, self.system if condition == "prompting" else None)
            self._fixed[key] = self.scorer.score(qs, ans)
        return self._fixed[key]

    def steered(self, questions: Sequence[str], steering: Steering) -> ScoredAnswers:
        return self.scorer.score(questions, self.answers(questions, steering))

    def side_by_side(self, steerings: Mapping[str, Steering], randoms: Mapping[str, Steering],
                     seed: int = 0) -> dict[str, dict[str, Any]]:
        """Return the report half's summaries: unsteered, prompting, then each random null and each
        steering (``alignez eval``'s behaviour table, built as steer's is)."""
        table = {"unsteered": self.fixed("unsteered", "report").summary(seed),
                 "prompting": self.fixed("prompting", "report").summary(seed)}
        for name, st in randoms.items():
            table[name] = self.steered(self.report, st).summary(seed)
        for name, st in steerings.items():
            table[name] = self.steered(self.report, st).summary(seed)
        return table


def axis_bench(engine: Engine, axis: PreferenceAxis, judge: YesNoJudge | None, choose: Sequence[str],
               report: Sequence[str], sampling: Sampling = SAMPLING, writer: RemoteWriter | None = None,
               base: str | None = None) -> BehaviourBench:
    """Return the bench that scores ``axis``'s behaviour on ``engine``: the axis's measure
    (``measures.behaviour.measure_for``), fluency read plainly (under ``base``, the system prompt of
    every condition but prompting; None: the template's own) and under the positive guide, the
    prompting baseline under that guide. The one place a behaviour scorer is set up (``steer``'s
    screen and calibration, ``alignez eval``'s behaviour table). ``writer``: where the unsteered
    and prompting answers are written (``BehaviourBench``)."""
    guide = axis.guide("positive")
    scorer = Scorer(measure_for(axis.measure, axis.positive, axis.negative), unsteered_nll(engine, base), judge,
                    nll_asked=unsteered_nll(engine, guide))
    return BehaviourBench(engine, scorer, guide, list(choose), list(report), sampling=sampling, writer=writer, base=base)
