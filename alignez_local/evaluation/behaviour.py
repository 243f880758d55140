"""Does an answer show the behaviour its axis names? The one owner of that question.

Every axis maps to one ``Measure`` (``measure_for``): ``steer``'s screening and calibration, the
behaviour report of ``steer`` and ``alignez eval``, and the experiments all score answers through
``Scorer`` here, so there is no second evaluation path.

A measure gives each answer a behaviour score in 0..1 (1: it shows the behaviour):

- objective checkers where one exists: the language (``py3langid``, a trained language
  identifier, not a stopword list), brevity (words), a style's marker words, capital letters, and
  refusal (the keyword detector of ``refusal.py``); a custom axis whose positive persona is a
  language gets the language checker, and ``--measure KEY`` gives any custom axis a checker;
- for any other behaviour, the judge's P(Yes) to "Is this answer written in a <positive> way?"
  against its P(Yes) for the negative persona, read from next-token probabilities
  (``JudgeMeasure``, ``judge.Judge.yes_probability``).

Beside the behaviour, two guards for every answer, as AxBench scores steering:

- **relevance**: the judge's probability that the answer still addresses the request, whatever its
  language or style (a refusal, an off-topic answer or gibberish does not);
- **fluency**: how much less likely the answer is, per token, under the *unsteered* model (no
  system prompt) than the unsteered model's own answers are, mapped linearly to 0..1 over
  ``FLUENCY_SPAN_NATS``, times a repetition factor (greedy decoding can loop on a phrase that the
  model finds very likely, which perplexity alone scores as fluent).

The answer's **combined** score is the harmonic mean of the three (0 when any is 0), so a gibberish
or off-topic answer scores 0 whatever its trait. Measures for which relevance means nothing (a
refusal addresses no request) leave it out of the mean.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.evaluation.refusal import is_refusal

FLUENCY_SPAN_NATS = 3.0
"""Mean per-token NLL above the unsteered answers' at which fluency reaches 0. Measured on Qwen
2.5-Coder-0.5B (docs/results.md §10): the unsteered model's own greedy answers sit near 0.4
nats/token, fluent French answers written under a steering vector near 1.2-1.6, broken text (mixed
scripts, one token repeated with variations) above 3.5."""

REPEAT_NGRAM = 3
MIN_DISTINCT_SHARE = 0.5
"""Below this share of distinct word trigrams an answer counts as looping; its fluency is scaled down
in proportion (a healthy 60-token answer has 90-100% distinct trigrams)."""

BEHAVIOUR_THRESHOLD = 0.5
"""An answer "shows the behaviour" when its score is at least this (a checker's 1, a judge's p >= 0.5)."""

NULL_QUESTION = "Say something."
"""The context an answer is read in to tell how much its question explains it (``pmi_relevance``)."""

RELEVANCE_QUESTION = (
    "Does the answer respond to the user's request (in any language or style), rather than refusing "
    "it, changing the subject or being gibberish?"
)


JUDGE_QUESTION = "Is this answer written in a {persona} way?"
"""What the judge is asked about a persona (``JudgeMeasure``); ``scripts/judge_accuracy.py --question``
measures other wordings on the hand-made examples."""


class YesNoJudge(Protocol):
    """What a measure needs from a judge: P(Yes) to a yes/no question about each (question, answer)."""

    def yes_probability(self, instruction: str, pairs: Sequence[tuple[str, str]]) -> np.ndarray: ...


# --- measures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """How to tell whether one answer shows a behaviour. Subclasses score; this holds the words."""

    key: str  # registry key, e.g. "language:fr"
    label: str  # what the behaviour rate counts, e.g. "answers in French"
    uses_relevance: bool = True
    needs_judge: bool = False

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        """Return one behaviour score in 0..1 per answer."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "uses_relevance": self.uses_relevance, "needs_judge": self.needs_judge}


@dataclass(frozen=True)
class LanguageMeasure(Measure):
    """1 when a language identifier reads the answer as ``code`` (ISO 639-1)."""

    code: str = "fr"

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        identify = _language_identifier()
        return np.array([float(bool(a.strip()) and identify(a) == self.code) for a in answers])


_LANGID: Callable[[str], str] | None = None


def _language_identifier() -> Callable[[str], str]:
    """Return text -> ISO 639-1 code, from py3langid (the ``checkers`` extra), loaded once."""
    global _LANGID
    if _LANGID is None:
        try:
            import py3langid  # noqa: PLC0415 - optional dependency, loaded on first use
        except ImportError:
            raise AlignezError(
                "the language measure needs the language identifier py3langid; install it with "
                "pip install 'alignez-local[checkers]'"
            ) from None
        _LANGID = lambda text: str(py3langid.classify(text)[0])  # noqa: E731
    return _LANGID


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


@dataclass(frozen=True)
class BrevityMeasure(Measure):
    """1 when the answer has at most ``max_words`` words (and is not empty)."""

    max_words: int = 20

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        return np.array([float(0 < word_count(a) <= self.max_words) for a in answers])


@dataclass(frozen=True)
class MarkerMeasure(Measure):
    """1 when the answer holds at least ``min_hits`` of the style's marker words or phrases."""

    markers: tuple[str, ...] = ()
    min_hits: int = 2

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        return np.array([float(self.hits(a) >= self.min_hits) for a in answers])

    def hits(self, answer: str) -> int:
        text = answer.lower()
        return sum(len(re.findall(_marker_pattern(m), text)) for m in self.markers)


def _marker_pattern(marker: str) -> str:
    """Whole-word match for words; a literal match for punctuation markers like '!'."""
    escaped = re.escape(marker.lower())
    return rf"(?<!\w){escaped}(?!\w)" if re.match(r"\w", marker) else escaped


@dataclass(frozen=True)
class CapitalsMeasure(Measure):
    """1 when at least ``min_share`` of the answer's letters are capitals (IFEval's all-caps check)."""

    min_share: float = 0.8

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        out = []
        for a in answers:
            letters = [c for c in a if c.isalpha()]
            out.append(float(bool(letters) and sum(c.isupper() for c in letters) / len(letters) >= self.min_share))
        return np.array(out)


@dataclass(frozen=True)
class RefusalMeasure(Measure):
    """1 when the keyword detector reads a refusal. A refusal addresses no request: no relevance guard."""

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        return np.array([float(is_refusal(a)) for a in answers])


@dataclass(frozen=True)
class JudgeMeasure(Measure):
    """The judge's reading of whether an answer is <persona> rather than <contrast>, for behaviours
    with no checker.

    With a ``contrast`` (the axis's negative persona) the judge is asked about both poles and the
    score is sigmoid(logit P(Yes | persona) - logit P(Yes | contrast)): the answer shows the
    behaviour when the judge finds it more <persona> than <contrast>. Asked about one pole alone, the
    1.5B judge says Yes to most answers whatever they are (7 of 8 of Qwen 0.5B's plain English answers
    were "written in a Spanish-speaking way"); it orders answers rightly far more often than it places them on the
    right side of 0.5 (docs/results.md §11), and the comparison keeps only the ordering.
    """

    persona: str = ""
    contrast: str = ""
    template: str = ""  # the question, with {persona}; "": JUDGE_QUESTION

    @property
    def question(self) -> str:
        return self.question_for(self.persona)

    def question_for(self, persona: str) -> str:
        return (self.template or JUDGE_QUESTION).format(persona=persona)

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        if judge is None:
            raise AlignezError(f"the behaviour {self.persona!r} is measured by a judge model, and none was given")
        pairs = list(zip(questions, answers))
        p = judge.yes_probability(self.question, pairs)
        if not self.contrast:
            return p
        return contrast_probability(p, judge.yes_probability(self.question_for(self.contrast), pairs))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "question": self.question,
                **({"contrast_question": self.question_for(self.contrast)} if self.contrast else {})}


def contrast_probability(p_positive: np.ndarray, p_negative: np.ndarray) -> np.ndarray:
    """Return sigmoid(logit p_positive - logit p_negative): above 0.5 exactly when the judge's Yes to
    the positive question is more likely than its Yes to the negative one."""
    eps = 1e-9
    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
        return np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-(logit(p_positive) - logit(p_negative))))


PIRATE_MARKERS = ("arr", "arrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "me hearty", "me hearties", "landlubber",
                  "shiver me timbers", "avast", "yo ho", "savvy", "scallywag", "booty", "plunder", "ahoy there", "seas",
                  "treasure", "cap'n", "ship", "sail")
CASUAL_MARKERS = ("hey", "yeah", "yep", "gonna", "wanna", "gotta", "kinda", "sorta", "cool", "awesome", "dude", "buddy",
                  "lol", "totally", "super", "stuff", "pretty much", "no worries", "chill", "ya", "y'all", "folks",
                  "grab", "btw", "okay", "ok", "hang out", "tons of", "a bunch of")
ENTHUSIASM_MARKERS = ("!", "amazing", "awesome", "exciting", "excited", "fantastic", "wonderful", "love", "incredible",
                      "thrilled", "wow", "absolutely", "great news", "so much fun", "delightful", "superb", "brilliant")

MEASURES: dict[str, Measure] = {
    "language:fr": LanguageMeasure("language:fr", "answers in French", code="fr"),
    "brevity:20": BrevityMeasure("brevity:20", "answers of at most 20 words", max_words=20),
    "markers:pirate": MarkerMeasure("markers:pirate", "answers with >= 2 pirate words", markers=PIRATE_MARKERS, min_hits=2),
    "markers:casual": MarkerMeasure("markers:casual", "answers with >= 2 casual words", markers=CASUAL_MARKERS, min_hits=2),
    "markers:enthusiastic": MarkerMeasure("markers:enthusiastic", "answers with >= 3 enthusiasm markers ('!', 'amazing'...)",
                                          markers=ENTHUSIASM_MARKERS, min_hits=3),
    "capitals": CapitalsMeasure("capitals", "answers in capital letters"),
    "refusal": RefusalMeasure("refusal", "refusals (keyword detector)", uses_relevance=False),
}


LANGUAGES: dict[str, str] = {
    "english": "en", "french": "fr", "spanish": "es", "german": "de", "italian": "it", "portuguese": "pt",
    "dutch": "nl", "russian": "ru", "chinese": "zh", "mandarin": "zh", "japanese": "ja", "korean": "ko",
    "arabic": "ar", "hindi": "hi", "turkish": "tr", "polish": "pl", "swedish": "sv", "danish": "da",
    "norwegian": "no", "finnish": "fi", "greek": "el", "czech": "cs", "ukrainian": "uk", "vietnamese": "vi",
    "indonesian": "id", "hebrew": "he", "romanian": "ro", "hungarian": "hu", "catalan": "ca", "latin": "la",
    "swahili": "sw", "esperanto": "eo", "irish": "ga", "welsh": "cy", "thai": "th", "persian": "fa",
}
"""Language names a persona may use, with the ISO 639-1 code the language identifier answers."""

_LANGUAGE_PERSONA = re.compile(
    r"^(?:(?:speaks|speaking|answers? in|writes? in|talks? in|replies in|in)\s+)?(?P<name>[a-z]+)"
    r"(?:[- ](?:speaking|speaker|language|only|answers|replies))?$")


def language_named(persona: str) -> str | None:
    """Return the ISO code of the language a persona is, when it is only that ("Spanish",
    "Spanish-speaking", "answers in Spanish"), else None: "Spanish cooking fan" is not a language
    behaviour, so it stays with the judge (or ``--measure language:es``)."""
    m = _LANGUAGE_PERSONA.match(" ".join(persona.lower().split()))
    return LANGUAGES.get(m.group("name")) if m else None


def language_name(code: str) -> str:
    """Return the English name of an ISO 639-1 code ("es" -> "Spanish"), or the code when unknown."""
    return next((n.capitalize() for n, c in LANGUAGES.items() if c == code), code)


def measure_keys_help() -> str:
    """The measure keys a user can give, for help texts and error messages."""
    return ", ".join([*MEASURES, "language:CODE (ISO 639-1, e.g. language:es)", "brevity:N", "judge"])


def measure_for(measure_key: str, positive: str, negative: str = "") -> Measure:
    """Return the measure of ``measure_key``: a registered key, ``language:CODE`` for any language
    the identifier knows, ``brevity:N`` for any word limit; "" or ``judge`` means the judge, reading
    whether an answer is ``positive`` rather than ``negative`` (``JudgeMeasure``)."""
    if not measure_key or measure_key == "judge":
        label = f"answers the judge reads as {positive}" + (f" rather than {negative}" if negative else "")
        return JudgeMeasure(f"judge:{positive}", label, needs_judge=True, persona=positive, contrast=negative)
    if measure_key in MEASURES:
        return MEASURES[measure_key]
    kind, _, arg = measure_key.partition(":")
    if kind == "language" and re.fullmatch(r"[a-z]{2,3}", arg):
        return LanguageMeasure(measure_key, f"answers in {language_name(arg)} (language identifier)", code=arg)
    if kind == "brevity" and arg.isdigit() and int(arg) > 0:
        return BrevityMeasure(measure_key, f"answers of at most {int(arg)} words", max_words=int(arg))
    raise AlignezError(f"unknown behaviour measure {measure_key!r}; use one of: {measure_keys_help()}")


# --- the guards and the combined score ---------------------------------------------------------


def distinct_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Return the share of distinct word n-grams in ``text`` (1.0 for texts shorter than n+1 words)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if len(grams) > 1 else 1.0


def fluency_from_nll(nll: np.ndarray, reference_nll: float, texts: Sequence[str],
                     span: float = FLUENCY_SPAN_NATS) -> np.ndarray:
    """Return fluency in 0..1 per answer from its mean per-token NLL under the unsteered model.

    1 at or below ``reference_nll`` (the unsteered answers' own), 0 at ``span`` nats above it,
    linear between; times min(1, distinct trigram share / MIN_DISTINCT_SHARE); 0 for empty answers.
    """
    nll = np.asarray(nll, dtype=np.float64)
    base = np.clip(1.0 - np.maximum(nll - reference_nll, 0.0) / span, 0.0, 1.0)
    loops = np.array([min(1.0, distinct_share(t) / MIN_DISTINCT_SHARE) for t in texts])
    empty = np.array([not t.strip() for t in texts])
    return np.where(empty | ~np.isfinite(nll), 0.0, base * loops)


def pmi_relevance(pmi: np.ndarray, reference: float) -> np.ndarray:
    """Return relevance in 0..1 from each answer's pointwise mutual information with its question.

    ``pmi`` = mean per-token NLL of the answer after a content-free question (``NULL_QUESTION``) minus
    its NLL after its own question, under the unsteered model: how much better the question explains
    the answer than no question does. An off-topic answer or gibberish gains nothing from the question
    (about 0); an answer about the question gains what the unsteered answers gain (``reference``, their
    median), in whatever language or style. 1 at or above the reference, linear down to 0. When the
    model's own answers gain less than ``MIN_REFERENCE_PMI`` from their questions (a model that does
    not answer questions: the random test model), relevance cannot be read this way and is 1.
    """
    pmi = np.asarray(pmi, dtype=np.float64)
    if not reference >= MIN_REFERENCE_PMI:
        return np.ones_like(pmi)
    return np.where(np.isfinite(pmi), np.clip(pmi / float(reference), 0.0, 1.0), 0.0)


MIN_REFERENCE_PMI = 0.05
"""Nats per token. Qwen 0.5B's and SmolLM2's answers to hand-made questions gain 0.4-1.9."""


def harmonic_mean(*parts: np.ndarray) -> np.ndarray:
    """Return the element-wise harmonic mean of ``parts`` (each 0..1); 0 wherever any part is 0."""
    stack = np.clip(np.vstack([np.asarray(p, dtype=np.float64) for p in parts]), 0.0, 1.0)
    # Parts near the smallest float overflow 1/x and the sum to inf: the mean is then 0, as it should be.
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(stack > 0, 1.0 / np.where(stack > 0, stack, 1.0), np.inf)
        total = inv.sum(axis=0)
    return np.where(np.isfinite(total), len(parts) / total, 0.0)


@dataclass
class ScoredAnswers:
    """Every answer's behaviour, relevance, fluency and combined score (each 0..1), in prompt order."""

    behaviour: np.ndarray
    relevance: np.ndarray
    fluency: np.ndarray
    combined: np.ndarray
    answers: list[str] = field(default_factory=list)

    @property
    def shows(self) -> np.ndarray:
        """One bool per answer: does it show the behaviour?"""
        return self.behaviour >= BEHAVIOUR_THRESHOLD

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """Return the means (behaviour as a rate) with 95% bootstrap intervals over prompts."""
        out: dict[str, Any] = {"n": int(self.behaviour.size)}
        for name, values in (("behaviour_rate", self.shows.astype(float)), ("relevance", self.relevance),
                             ("fluency", self.fluency), ("combined", self.combined)):
            lo, hi = mean_ci(values, seed)
            out[name] = {"mean": round(float(np.mean(values)), 4) if values.size else float("nan"),
                         "ci95": [round(lo, 4), round(hi, 4)]}
        return out

    def mean(self, name: str) -> float:
        values = self.shows.astype(float) if name == "behaviour_rate" else getattr(self, name)
        return float(np.mean(values)) if values.size else float("nan")


def mean_ci(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """Return the percentile bootstrap 95% interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference_ci(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Return mean(a - b) and its percentile bootstrap 95% interval, resampling prompts (paired)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = mean_ci(d, seed, resamples)
    return float(d.mean()) if d.size else float("nan"), lo, hi


class NllFn(Protocol):
    """Mean per-token NLL of each answer under the unsteered model (prompts chat-formatted)."""

    def __call__(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray: ...


@dataclass
class Scorer:
    """Scores answers to plain questions for one measure: behaviour, relevance, fluency, combined.

    Fluency reads every answer under the unsteered model twice: as a plain answer (``nll``) and as an
    answer given under the behaviour's own instruction (``nll_asked``: the positive guide as system
    prompt), each against its own reference (the model's own answers in that context: the unsteered
    ones, the prompting ones); the answer's fluency is the better of the two. Text is fluent when the
    model itself would write it, with or without being asked for the behaviour: read only plainly, a
    fluent French answer to an English question looks as unlikely as broken text (on Qwen 0.5B the
    prompting answers scored 0.74 against the unsteered 0.92).

    Relevance: with a ``judge``, its P(Yes) to ``RELEVANCE_QUESTION``; without one, the answer's
    pointwise mutual information with its question under the unsteered model (``pmi_relevance``),
    which needs no second model: the steered model judging itself is no judge at 0.5B (it ordered 2
    of 6 hand-made relevance pairs right; the 1.5B judge 6 of 6; the PMI reading: docs/results.md
    §10). The judge also answers the behaviour question of judge measures. Identical (question,
    answer) pairs are scored once.
    """

    measure: Measure
    nll: NllFn
    judge: YesNoJudge | None = None
    nll_asked: NllFn | None = None
    reference_nll: float | None = None
    reference_asked: float | None = None
    reference_pmi: float | None = None
    _cache: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.measure.needs_judge and self.judge is None:
            raise AlignezError(f"the measure {self.measure.key} needs a judge model")

    @property
    def uses_relevance(self) -> bool:
        return self.measure.uses_relevance

    def pmi(self, questions: Sequence[str], answers: Sequence[str], nll: np.ndarray | None = None) -> np.ndarray:
        """Return each answer's NLL gain from its question (nats per token; see ``pmi_relevance``);
        ``nll``: the answers' plain NLL when already read."""
        own = self.nll(questions, answers) if nll is None else nll
        return self.nll([NULL_QUESTION] * len(answers), answers) - own

    def relevance(self, pairs: Sequence[tuple[str, str]], nll: np.ndarray | None = None) -> np.ndarray:
        """Return each (question, answer)'s relevance in 0..1 (the judge's, else the PMI reading)."""
        if not self.uses_relevance:
            return np.ones(len(pairs))
        if self.judge is not None:
            return self.judge.yes_probability(RELEVANCE_QUESTION, pairs)
        assert self.reference_pmi is not None
        return pmi_relevance(self.pmi([q for q, _ in pairs], [a for _, a in pairs], nll), self.reference_pmi)

    @staticmethod
    def _median(nll: np.ndarray) -> float:
        finite = nll[np.isfinite(nll)]
        return float(np.median(finite)) if finite.size else 0.0

    def set_reference(self, questions: Sequence[str], unsteered_answers: Sequence[str],
                      prompted_answers: Sequence[str] | None = None) -> float:
        """Set the fluency references from the unsteered model's answers, plain and (when given and
        ``nll_asked`` is set) when asked for the behaviour; return the plain one (median NLL, nats)."""
        plain = self.nll(questions, unsteered_answers)
        self.reference_nll = self._median(plain)
        self.reference_pmi = self._median(self.pmi(questions, unsteered_answers, plain)) if self.judge is None else None
        if prompted_answers is not None and self.nll_asked is not None:
            self.reference_asked = self._median(self.nll_asked(questions, prompted_answers))
        self._cache.clear()
        return self.reference_nll

    def fluency(self, questions: Sequence[str], answers: Sequence[str], nll: np.ndarray | None = None) -> np.ndarray:
        """Return each answer's fluency: the better of its plain and its asked-for reading (``nll``:
        the plain NLL when already read)."""
        assert self.reference_nll is not None
        nll = self.nll(questions, answers) if nll is None else nll
        flu = fluency_from_nll(nll, self.reference_nll, answers)
        if self.nll_asked is not None and self.reference_asked is not None:
            # The asked reading can only raise a fluency, and one read plainly at or below the
            # reference is already full (the repetition factor is the same text's either way): only
            # the others are read again, which spares about half of calibration's asked reads.
            need = [i for i, v in enumerate(nll) if np.isfinite(v) and v > self.reference_nll]
            if need:
                sub = [answers[i] for i in need]
                asked = fluency_from_nll(self.nll_asked([questions[i] for i in need], sub), self.reference_asked, sub)
                flu[need] = np.maximum(flu[need], asked)
        return flu

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> ScoredAnswers:
        """Return the scores of ``answers`` (one per question)."""
        if self.reference_nll is None:
            raise ValueError("set_reference first: fluency is relative to the unsteered answers")
        if len(questions) != len(answers):
            raise ValueError("one answer per question")
        todo = list(dict.fromkeys((q, a) for q, a in zip(questions, answers) if (q, a) not in self._cache))
        if todo:
            qs, ans = [q for q, _ in todo], [a for _, a in todo]
            beh = self.measure.scores(qs, ans, self.judge)
            plain = self.nll(qs, ans)
            rel = self.relevance(todo, plain)
            flu = self.fluency(qs, ans, plain)
            for key, b, r, f in zip(todo, beh, rel, flu):
                self._cache[key] = (float(b), float(r), float(f))
        rows = np.array([self._cache[(q, a)] for q, a in zip(questions, answers)], dtype=np.float64).reshape(-1, 3)
        b, r, f = rows[:, 0], rows[:, 1], rows[:, 2]
        combined = harmonic_mean(b, r, f) if self.uses_relevance else harmonic_mean(b, f)
        return ScoredAnswers(b, r, f, combined, list(answers))
