"""Recipes: the prompts a model answers in both personas to write its own preference pairs.

``paper`` keeps the paper's two steps (method.md §1): per persona, the model first writes what an
answer should be like (the characteristics), then answers conditioned on them, all in the user turn.
A 135M model often cannot follow that: it answers the query instead of describing an answer, and its
"unhelpful" persona still tries to help, so a share of the pairs is noise or inverted.

The recipes built for small models put the persona in the system prompt, with a plain description of
what an answer of that side looks like (``PreferenceAxis.guide``), and ask for the answer directly:

- ``direct``: one step, persona in the system prompt.
- ``shared``: as ``direct``, but both personas continue the same first tokens, sampled once from the
  model with no persona. The two answers then differ only in how they go on, not in their opening
  (where a small model's persona most often shows as a canned phrase), and the negative side cannot
  open with a refusal.
- ``contrast``: the model answers each query once, with no persona, and the pair is that one answer
  read twice: under the positive persona's system prompt and under the negative one's
  (``Recipe.context``). The difference between the two readings is the persona's effect on the
  model's state over the same tokens, so a pair cannot be noisy or inverted the way two free answers
  of a 135M model are (the representation-engineering contrast of repeng and CAA, built on AlignEZ's
  self-made data). There is nothing for the self-check to compare, and a refusal is no contrast.
- ``plain``: the positive persona's own answer (persona in the system prompt) against the model's
  plain answer to the same query (no system prompt), both read with no system prompt when fitting.
  The difference is what the behaviour changes in the text the model writes, not what a system
  prompt changes in its state: on Qwen2.5-Coder-0.5B the difference of their means over the answer
  tokens turned 96% of held-out answers French, where ``contrast``'s vector turned none
  (docs/results.md §10). Nothing for the self-check to compare either: the negative side is no persona.

- ``texts``: for what a prompt cannot get (issue 31): a topic the model will not bring up when told
  to, or a style it writes on request but does not hold. The model writes short texts it writes
  readily (a paragraph, three facts, a short story... about a subject), chosen per query: for a
  topic axis, one about the concept against the same kind of text about another subject (one of 24
  varied ones); for a style axis, one about such a subject in the style against the same text asked
  for plainly.
  Both are read as answers to the query with no system prompt, so what the pair differs in is the
  concept (or the style), not the kind of text and not whether it answers the query: neither does.

The negative guide of every axis says "never refuse": a refusal is not the opposite behaviour, and a
direction fitted on answer-vs-refuse pairs would strip the refusals of harmful requests. Pairs that
refuse anyway are counted and dropped by ``selfcheck.select_pairs``.

Which recipe is the default is decided by measurement (scripts/records/, docs in the report):
``DEFAULT_RECIPE``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from alignez_local.align.axes import PreferenceAxis
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine

SIDES = ("positive", "negative")

_PAPER_CHARACTERISTICS = {
    "positive": "{query}\nYou are a {persona} assistant. Your answer to this query should:",
    "negative": "{query}\nPretend you are a {persona} assistant. Your response to this query should:",
}
_PAPER_RESPONSE = {
    "positive": "You are a {persona} assistant. Your answer should {characteristics}\n{query}",
    "negative": "Pretend you are a {persona} assistant. Your answer should {characteristics}\n{query}",
}


@dataclass(frozen=True)
class Recipe:
    """How the two answers of a pair are asked for."""

    name: str
    summary: str
    two_step: bool  # the paper's characteristics step first
    shared_prefix_tokens: int = 0  # >0: both personas continue the same first tokens
    same_answer: bool = False  # one persona-free answer, read under each persona's system prompt
    plain_negative: bool = False  # the negative side is the model's plain answer (no persona)
    texts: bool = False  # short texts about the concept / in the style, read as answers to the query

    @property
    def checkable(self) -> bool:
        """True when the pair is two persona answers the model's self-check can compare."""
        return not (self.same_answer or self.plain_negative or self.texts)

    def check_axis(self, axis: PreferenceAxis) -> None:
        """Raise one clear error when this recipe cannot write pairs for ``axis``."""
        if self.texts and not axis.from_texts:
            raise AlignezError("the texts recipe writes about a concept or in a style: give --concept or --style")
        if axis.from_texts and not (self.texts or self.plain_negative):
            # The persona recipes' negative side is a persona, and a topic or style has none.
            raise AlignezError(f"a {axis.kind} axis is fitted from the model's texts (--recipe texts, its default) "
                               "or from its answers when asked (--recipe plain)")

    def context(self, axis: PreferenceAxis, side: str) -> str:
        """Return the system prompt the ``side`` answer is read under when fitting ("": none)."""
        return axis.guide(side) if self.same_answer else ""

    def characteristics_prompt(self, engine: Engine, query: str, axis: PreferenceAxis, side: str) -> str:
        """Return the prompt for the characteristics step (two-step recipes only)."""
        if not self.two_step:
            raise ValueError(f"recipe {self.name} has no characteristics step")
        return engine.prompt(_PAPER_CHARACTERISTICS[side].format(query=query, persona=_persona(axis, side)))

    def response_prompt(self, engine: Engine, query: str, axis: PreferenceAxis, side: str, characteristics: str = "") -> str:
        """Return the prompt whose continuation is the ``side`` answer to ``query``."""
        if self.texts:
            return engine.prompt(text_request(axis, query, side))
        if self.plain_negative and side == "negative":
            return engine.prompt(query)
        if self.two_step:
            text = _PAPER_RESPONSE[side].format(persona=_persona(axis, side), characteristics=characteristics, query=query)
            return engine.prompt(text)
        return engine.prompt(query, system=axis.guide(side))

    def neutral_prompt(self, engine: Engine, query: str) -> str:
        """Return the persona-free prompt the shared first tokens are sampled from."""
        return engine.prompt(query)


TEXT_FORMS = (
    "Write a short paragraph about {subject}.",
    "Tell me three interesting facts about {subject}.",
    "Write a very short story about {subject}.",
    "Describe {subject} in a few vivid sentences.",
    "Write a short poem about {subject}.",
    "Explain in a few sentences why people like {subject}.",
    "Write a short encyclopedia paragraph about {subject}.",
    "Write a few sentences a teacher could say to a class about {subject}.",
)
"""The kinds of text the ``texts`` recipe asks for: what a small model writes readily on any subject.
Qwen 0.5B answered "Describe X to someone who has never seen it" and "Write a short blog post about
X" with "As an AI language model, I cannot...", which the refusal rule drops: those two were replaced."""

OTHER_SUBJECTS = (
    "a city library", "a desert", "the moon", "honeybees", "a rainforest", "volcanoes", "the human heart",
    "electricity", "ancient Rome", "a bakery", "jazz music", "a game of chess", "mountains", "a train station",
    "the stock market", "a vegetable garden", "a thunderstorm", "robots", "the Olympic Games", "a hospital",
    "snow", "smartphones", "birds", "a castle",
)
"""The other side of a topic pair, and the subject of a style pair: as varied as the things a user
might name, so that their mean is no particular subject and the difference is the concept. With 24
mundane objects (a desk lamp, a bakery, running shoes) the Qwen 0.5B ocean vector steered towards
nature and science in general ("the sky is a vast body of water... planets"). A pair whose other
side names the concept anyway is dropped by the behaviour filter."""


def text_request(axis: PreferenceAxis, query: str, side: str) -> str:
    """Return what the ``texts`` recipe asks the model for on ``side`` of the pair of ``query``: the
    same kind of text on both sides, chosen from the query so a resumed run asks the same."""
    h = int(hashlib.sha256(query.encode()).hexdigest()[:12], 16)
    form = TEXT_FORMS[h % len(TEXT_FORMS)]
    other = OTHER_SUBJECTS[(h // len(TEXT_FORMS)) % len(OTHER_SUBJECTS)]
    if axis.kind == "topic":
        return form.format(subject=axis.positive if side == "positive" else other)
    asked = form.format(subject=other)
    return f"{asked} Write it in {axis.positive}." if side == "positive" else asked


def _persona(axis: PreferenceAxis, side: str) -> str:
    return axis.positive if side == "positive" else axis.negative


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", "the paper's two steps: characteristics, then an answer conditioned on them", True),
    "direct": Recipe("direct", "persona in the system prompt, answered directly", False),
    "shared": Recipe("shared", "persona in the system prompt; both personas continue the same first 8 tokens", False, 8),
    "contrast": Recipe("contrast", "one persona-free answer, read under each persona's system prompt", False, same_answer=True),
    "plain": Recipe("plain", "the positive persona's answer against the model's plain answer, both read without a system prompt",
                    False, plain_negative=True),
    "texts": Recipe("texts", "a short text about the concept (or in the style) against one about another subject "
                             "(or plain), both read as answers to the query", False, texts=True),
}

DEFAULT_RECIPE = "plain"
"""The recipe used when none is given. Measured by the behaviour itself (docs/results.md §10, the trait
suite): on Qwen2.5-Coder-0.5B the ``plain`` recipe's difference-of-means vector turned held-out answers
French where ``contrast``'s turned none; ``contrast`` had been the default because, judged on the
helpful axis, no recipe measurably helped (2026-11-28)."""


def get_recipe(name: str | None) -> Recipe:
    """Return the recipe called ``name`` (None: the default)."""
    key = (name or DEFAULT_RECIPE).strip().lower()
    try:
        return RECIPES[key]
    except KeyError:
        raise AlignezError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE})") from None
