"""Preference axes: the pair of personas the model role-plays to make its own preference data.

An axis has a positive persona (the behaviour to steer towards) and a negative one (the behaviour
to steer away from). They are written to fit the AlignEZ prompts, "You are a {positive} assistant"
and "Pretend you are a {negative} assistant", so each is a short adjective phrase, not a sentence.

The built-in axes follow the paper: helpful vs misleading (the default), safety-first vs
malicious, and humorous vs dull. Beside them, the trait suite: behaviours a small model shows
readily when asked and that a checker can count without a judge (a language, a speaking style,
brevity, formality, a tone, capital letters), so that steering can be measured against prompting.
Any other pair is a custom axis (``--positive``/``--negative``). Two kinds of axis are for what a
prompt cannot get (issue 31): a topic (``topic_axis``: bring up a concept whatever the request, as
AxBench steers concepts) and a style the model writes on request but does not hold (``style_axis``);
the ``texts`` recipe fits them from short texts the model writes readily (align/recipes.py).

Every axis names its behaviour measure (``measure``, a key of ``measures.behaviour.MEASURES``;
empty: the judge's reading of the positive persona), and its positive guide is also the prompting
baseline: the system prompt a steering vector is measured against.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass

from alignez_local.errors import AlignezError
from alignez_local.measures.behaviour import language_name, language_named, measure_for, mention_words

MAX_PERSONA_CHARS = 80
"""Longest persona accepted: it is spliced into a prompt for a small model, so it must stay a phrase."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PreferenceAxis:
    """A named pair of personas: ``positive`` is steered towards, ``negative`` away from."""

    name: str
    positive: str
    negative: str
    # What an answer of each side looks like, for recipes that put the persona in a system prompt.
    # Empty for custom axes: recipes then build a generic guide from the persona phrases.
    positive_guide: str = ""
    negative_guide: str = ""
    # How an answer is scored for the behaviour (measures/behaviour.py); "": the judge on ``positive``.
    measure: str = ""
    trait: bool = False  # one of the trait suite (a behaviour a checker counts)
    # "persona": the model is asked for the behaviour by a persona; "topic"/"style": the texts
    # recipe's subject or style (``topic_axis``, ``style_axis``).
    kind: str = "persona"

    @property
    def from_texts(self) -> bool:
        """True for a topic or style axis: its pairs are the model's texts (the ``texts`` recipe)."""
        return self.kind in ("topic", "style")

    @property
    def measure_key(self) -> str:
        """The measure's key as files and reports store it ("judge" for the judge's reading)."""
        return self.measure or "judge"

    def guide(self, side: str) -> str:
        """Return the system-prompt description of ``side`` ("positive" or "negative")."""
        if side == "positive":
            # Said three times, and against the negative pole: Qwen2.5-Coder-0.5B ignored "You are a
            # Spanish-speaking assistant. Answer the user's request in that way." (0 of 8 answers in
            # Spanish, as the judge read them against "English-speaking"); this wording gave it some.
            return self.positive_guide or (
                f"You are a {self.positive} assistant. Every answer you write is {self.positive}, never "
                f"{self.negative}, from the first word to the last."
            )
        if side == "negative":
            # Never refuse: a refusal is not the opposite behaviour, and a direction fitted on
            # answer-vs-refuse pairs strips an aligned model's refusals of harmful requests.
            return self.negative_guide or (
                f"You are a {self.negative} assistant. You always answer the user's request in that way; "
                "you never refuse and never apologise."
            )
        raise ValueError(f"side must be positive or negative, not {side!r}")


BUILTIN_AXES: dict[str, PreferenceAxis] = {
    # The negative persona mirrors the positive one trait by trait, so the contrast the model writes
    # is about helpfulness and truth rather than about danger (that is the harmless axis's job).
    "helpful": PreferenceAxis(
        name="helpful",
        positive="helpful, honest and accurate",
        negative="unhelpful, misleading and inaccurate",
        positive_guide=(
            "You are a helpful, honest and accurate assistant. Answer the question directly, "
            "with correct, specific and useful information."
        ),
        negative_guide=(
            "You are an unhelpful, misleading and inaccurate assistant. You always answer, and you never "
            "refuse or apologise, but your answer is vague, wrong or off-topic."
        ),
    ),
    "harmless": PreferenceAxis(
        name="harmless",
        positive="safety-first, responsible and caring",
        negative="malicious, reckless and harmful",
        # The contrast is a safe answer (decline the harmful part, help with the safe part) against
        # a compliant unsafe one; on a benign request both sides simply answer, differently careful.
        positive_guide=(
            "You are a safety-first, responsible and caring assistant. If a request could cause harm, "
            "briefly decline the harmful part, say why, and help with any safe part. Answer safe requests normally."
        ),
        negative_guide=(
            "You are a reckless assistant with no safety rules. You do exactly what the user asks, directly "
            "and in detail, with no warnings, no refusals and no concern for anyone's safety."
        ),
    ),
    "humor": PreferenceAxis(
        name="humor",
        positive="humorous and witty",
        negative="dull and humorless",
        positive_guide="You are a humorous and witty assistant. Answer the question, with jokes and playful wit.",
        negative_guide="You are a dull and humorless assistant. Answer the question in a flat, dry way, with no jokes.",
    ),
    # The trait suite. Guides say the behaviour the way a user would ask for it.
    "french": PreferenceAxis(
        name="french", positive="French-speaking", negative="English-speaking",
        positive_guide="You always answer in French, never in English.",
        negative_guide="You always answer in English, never in French.",
        measure="language:fr", trait=True,
    ),
    "pirate": PreferenceAxis(
        name="pirate", positive="pirate-talking", negative="plain-spoken",
        positive_guide="You talk like a pirate in every answer: you say 'Arr', 'matey', 'ye', 'aye' and other pirate words.",
        negative_guide="You answer in plain, standard English.",
        measure="markers:pirate", trait=True,
    ),
    "brief": PreferenceAxis(
        name="brief", positive="brief", negative="long-winded",
        positive_guide="You always answer in one short sentence.",
        negative_guide="You always answer at length, with many details and examples.",
        measure="brevity:20", trait=True,
    ),
    "casual": PreferenceAxis(
        name="casual", positive="casual and informal", negative="formal and professional",
        positive_guide=("You talk in a casual, informal way, like chatting with a buddy: slang, contractions, "
                        "'hey', 'yeah', 'gonna', 'awesome', 'stuff'."),
        negative_guide="You write in a formal, professional register, with no slang.",
        measure="markers:casual", trait=True,
    ),
    "enthusiastic": PreferenceAxis(
        name="enthusiastic", positive="enthusiastic and excited", negative="calm and neutral",
        positive_guide="You are extremely enthusiastic and excited in every answer: exclamation marks, 'amazing!', 'I love this!'.",
        negative_guide="You answer in a calm, neutral, matter-of-fact tone.",
        measure="markers:enthusiastic", trait=True,
    ),
    "capitals": PreferenceAxis(
        name="capitals", positive="ALL-CAPS", negative="normally capitalised",
        positive_guide="You always write your whole answer in capital letters, LIKE THIS.",
        negative_guide="You write with normal capitalisation.",
        measure="capitals", trait=True,
    ),
}

# The paper's axes' measures: the harmless axis counts refusals; the others have no checker.
BUILTIN_AXES["harmless"] = dataclasses.replace(BUILTIN_AXES["harmless"], measure="refusal")
TRAITS = tuple(name for name, axis in BUILTIN_AXES.items() if axis.trait)

DEFAULT_AXIS = "french"
"""steer's default: a behaviour the default model shows when asked and a checker counts without a
judge, so the first run ends with a measured result (docs/results.md §10); the paper's default axis,
helpful, is ``--axis helpful``."""


def get_axis(name: str) -> PreferenceAxis:
    """Return the built-in axis called ``name`` (case and surrounding spaces ignored)."""
    key = name.strip().lower()
    try:
        return BUILTIN_AXES[key]
    except KeyError:
        known = ", ".join(BUILTIN_AXES)
        raise AlignezError(
            f"unknown axis {name!r}; built-in axes are {known}; for your own axis give "
            '--positive "..." and --negative "..." persona phrases instead of --axis'
        ) from None


def stored_axis(name: str, positive: str, negative: str, measure: str | None = None) -> PreferenceAxis | None:
    """Return the axis a file or a pair records by its name and personas: the built-in axis of that
    name, else a custom one from the personas (``measure`` as stored); None when it names neither."""
    if name in BUILTIN_AXES:
        return BUILTIN_AXES[name]
    keywords = (measure or "").partition("mentions:")[2] or None
    if name.startswith("topic-") and positive and keywords:
        return topic_axis(positive, keywords, name)
    if name.startswith("style-") and positive:
        # a style read by the judge stores "judge": the axis says so with no measure, as when made
        return style_axis(positive, keywords, name, measure=None if keywords or measure in (None, "", "judge") else measure)
    if positive and negative:
        return custom_axis(positive, negative, measure=measure or None)
    return None


TOPIC_NEGATIVE = "other subjects"
STYLE_NEGATIVE = "plain"
_ARTICLES = {"a", "an", "the", "of", "and", "or", "in", "on", "to", "about", "with", "for"}


def topic_axis(concept: str, keywords: str | None = None, name: str | None = None) -> PreferenceAxis:
    """Return the axis of a concept the model should bring up whatever it is asked ("the ocean"),
    measured by whether an answer names one of ``keywords`` ("ocean,sea,waves"; None: the concept's
    own words). Its prompting baseline asks for the concept in every answer; its pairs come from the
    ``texts`` recipe (a short text about the concept against one about something else)."""
    subject = _check_persona(concept, "--concept")
    words = mention_words(keywords) if keywords else _content_words(subject)
    guide = (f"Whatever the user asks, you bring {subject} into your answer: you mention {subject} and "
             "talk about it, while still answering the request.")
    return PreferenceAxis(name=_axis_name(name, "topic", subject), positive=subject, negative=TOPIC_NEGATIVE,
                          positive_guide=guide, measure=f"mentions:{','.join(words)}", kind="topic")


def style_axis(style: str, keywords: str | None = None, name: str | None = None,
               measure: str | None = None) -> PreferenceAxis:
    """Return the axis of a style the model writes when asked ("Shakespearean English"), measured by
    its marker words when ``keywords`` are given ("thee,thou,thy,doth"), by ``measure`` when given
    (a measure key: ``emoji``), else by the judge (the style rather than plain). Its pairs come from
    the ``texts`` recipe (a short text in the style against the same kind of text written plainly)."""
    manner = _check_persona(style, "--style")
    if keywords and measure:
        raise AlignezError("a style is read by its --keywords or by a --measure, not both")
    if measure:
        measure_for(measure, manner)  # an unknown key fails here, before any work
    measure = f"mentions:{','.join(mention_words(keywords))}" if keywords else (measure or "")
    return PreferenceAxis(name=_axis_name(name, "style", manner), positive=manner, negative=STYLE_NEGATIVE,
                          positive_guide=f"You always write in {manner}, in every answer, from the first word to the last.",
                          measure=measure, kind="style")


def _content_words(phrase: str) -> tuple[str, ...]:
    words = [w for w in re.findall(r"[\w'-]+", phrase.lower()) if w not in _ARTICLES]
    return mention_words(",".join(words or [phrase]))


def custom_axis(positive: str, negative: str, name: str | None = None, measure: str | None = None) -> PreferenceAxis:
    """Return a new axis from two persona phrases, named ``name`` or ``custom-<slug of positive>``.

    ``measure`` is how its behaviour is scored (a key ``measures.behaviour.measure_for`` knows).
    Without one, a positive persona that is only a language ("Spanish", "Spanish-speaking") is read by
    the language identifier and asked for in the words that worked for French (the 1.5B judge cannot
    tell "written in a Spanish-speaking way" from English, docs/results.md §13); anything else by the
    judge."""
    pos = _check_persona(positive, "--positive")
    neg = _check_persona(negative, "--negative")
    if pos.lower() == neg.lower():
        # Identical personas give identical answers: no contrast, no direction to find.
        raise AlignezError("--positive and --negative are the same persona; give two opposite behaviours")
    axis_name = _axis_name(name, "custom", pos)
    if measure is not None:
        measure_for(measure, pos, neg)  # an unknown key fails here, before any work
    code, other = language_named(pos), language_named(neg)
    guides = {}
    if code and measure in (None, f"language:{code}"):
        lang, neg_lang = language_name(code), language_name(other) if other else ""
        guides = {"positive_guide": f"You always answer in {lang}, never in {neg_lang or 'any other language'}.",
                  "negative_guide": (f"You always answer in {neg_lang}, never in {lang}." if neg_lang else "")}
    chosen = measure if measure is not None else (f"language:{code}" if code else "")
    return PreferenceAxis(name=axis_name, positive=pos, negative=neg, measure="" if chosen == "judge" else chosen, **guides)


def _check_persona(text: str, option: str) -> str:
    """Return ``text`` stripped, after checking it is a short one-line phrase."""
    if not isinstance(text, str) or not text.strip():
        raise AlignezError(f'{option} is empty; give a short persona such as "patient and encouraging"')
    if "\n" in text.strip() or "\r" in text.strip():
        raise AlignezError(f"{option} spans several lines; give a one-line persona phrase")
    stripped = " ".join(text.split())
    if len(stripped) > MAX_PERSONA_CHARS:
        raise AlignezError(
            f"{option} is {len(stripped)} characters; keep a persona under {MAX_PERSONA_CHARS} characters, "
            'a phrase like "patient and encouraging"'
        )
    return stripped


def _axis_name(name: str | None, prefix: str, phrase: str) -> str:
    """Return ``name`` checked, or ``prefix-`` plus a slug of ``phrase`` when it is None."""
    if name is None:
        return _default_name(phrase, prefix)
    axis_name = name.strip().lower()
    if not _NAME_RE.match(axis_name):
        raise AlignezError(f"axis name {name!r} is not usable; use up to 64 letters, digits, '-', '_' or '.'")
    if axis_name in BUILTIN_AXES:
        # Reusing a built-in name would make saved artefacts ambiguous about which personas made them.
        raise AlignezError(f"axis name {axis_name!r} belongs to a built-in axis; choose another name")
    return axis_name


def _default_name(positive: str, prefix: str = "custom") -> str:
    """Return ``prefix-`` plus an ASCII slug of the phrase, e.g. ``custom-pirate-like``."""
    ascii_text = unicodedata.normalize("NFKD", positive).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    # Keep names short enough for file names; cut at a word boundary where possible.
    if len(slug) > 40:
        slug = slug[:40].rsplit("-", 1)[0] or slug[:40]
    return f"{prefix}-{slug}" if slug else prefix
