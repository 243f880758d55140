"""Does an answer show the behaviour its axis names? The one owner of that question.

Every axis maps to one ``Measure`` (``measure_for``): ``steer``'s screening and calibration, the
behaviour report of ``steer`` and ``alignez eval``, and the experiments all score answers through
``scoring.Scorer``, which reads the measure from here: there is no second evaluation path.

A measure gives each answer a behaviour score in 0..1 (1: it shows the behaviour):

- objective checkers where one exists: the language (``py3langid``, a trained language
  identifier, not a stopword list), brevity (words), a style's marker words, capital letters,
  refusal (the keyword detector of ``refusal.py``) and a concept's keywords (``mentions:``, the
  topic axes); a custom axis whose positive persona is a
  language gets the language checker, and ``--measure KEY`` gives any custom axis a checker;
- for any other behaviour, the judge's P(Yes) to "Is this answer written in a <positive> way?"
  against its P(Yes) for the negative persona, read from next-token probabilities
  (``JudgeMeasure``, ``judge.Judge.yes_probability``).

How good the answer is beside its behaviour (relevance, fluency, the combined score) is
``scoring.py``'s question.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.measures.refusal import is_refusal

BEHAVIOUR_THRESHOLD = 0.5
"""An answer "shows the behaviour" when its score is at least this (a checker's 1, a judge's p >= 0.5)."""

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
class MentionMeasure(Measure):
    """1 when the answer names the concept: one of its ``words`` as a whole word, or that word with a
    plural ending ("wave" counts "waves"). Whole words only: a stem would let "sea" count "search"
    and "season". The checker of the topic axes (``axes.topic_axis``)."""

    words: tuple[str, ...] = ()

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        pattern = mention_pattern(self.words)
        return np.array([float(bool(pattern.search(a))) for a in answers])


def mention_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """Return the case-blind whole-word pattern of ``words``, each with an optional plural ending."""
    alternatives = "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?:s|es)?(?!\w)", re.IGNORECASE)


def mention_words(text: str) -> tuple[str, ...]:
    """Return the words of a ``mentions:`` key or a --keywords list ("ocean, sea,waves"), lower-case,
    in order, without repeats; AlignezError when there is none or one is not a word."""
    words = tuple(dict.fromkeys(w.strip().lower() for w in text.split(",") if w.strip()))
    if not words:
        raise AlignezError("give the concept's keywords as a comma-separated list, e.g. ocean,sea,waves")
    bad = [w for w in words if not re.fullmatch(r"[\w' -]{1,40}", w)]
    if bad:
        raise AlignezError(f"keyword {bad[0]!r} is not a word or short phrase; give words separated by commas")
    return words


EMOJI = re.compile("[\U0001F300-\U0001FAFF\U0001F1E6-\U0001F1FF\u2600-\u27BF\u2B50\u2B55]")
"""Pictographic emoji: the pictograph, emoticon, transport and supplemental blocks, flags' regional
indicators, the miscellaneous symbols and dingbats (sun, check mark) and the star and circle. Not
letters of any script, not the degree sign or arrows of plain text."""


@dataclass(frozen=True)
class EmojiMeasure(Measure):
    """1 when the answer uses at least ``min_hits`` emoji (``EMOJI``): a style Qwen 0.5B hardly takes
    from a system prompt (0 of 6 answers told "You always use lots of emoji", 1 of 8 told "You always
    write in emoji") but writes when a request asks for it, so it can be fitted from texts (the
    ``texts`` recipe, ``--style emoji --measure emoji``; docs/results.md, "Concepts and styles")."""

    min_hits: int = 1

    def scores(self, questions: Sequence[str], answers: Sequence[str], judge: YesNoJudge | None) -> np.ndarray:
        return np.array([float(len(EMOJI.findall(a)) >= self.min_hits) for a in answers])


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
    "emoji": EmojiMeasure("emoji", "answers that use emoji"),
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
    return ", ".join([*MEASURES, "language:CODE (ISO 639-1, e.g. language:es)", "brevity:N",
                      "mentions:WORD,WORD,... (answers naming a concept)", "judge"])


def _listed(words: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(words[:most])
    return shown + (", ..." if len(words) > most else "")


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
    if kind == "mentions" and arg:
        words = mention_words(arg)
        return MentionMeasure(f"mentions:{','.join(words)}", f"answers that mention {_listed(words)}", words=words)
    if kind == "brevity" and arg.isdigit() and int(arg) > 0:
        return BrevityMeasure(measure_key, f"answers of at most {int(arg)} words", max_words=int(arg))
    raise AlignezError(f"unknown behaviour measure {measure_key!r}; use one of: {measure_keys_help()}")
