"""Built-in and custom preference axes."""

from __future__ import annotations

import dataclasses

import pytest

from alignez_local.align.axes import (
    BUILTIN_AXES, MAX_PERSONA_CHARS, TRAITS, PreferenceAxis, custom_axis, get_axis, stored_axis, style_axis, topic_axis,
)
from alignez_local.errors import AlignezError


def test_builtin_axes_are_the_papers_three_and_the_trait_suite() -> None:
    assert {"helpful", "harmless", "humor"} <= set(BUILTIN_AXES)
    assert set(BUILTIN_AXES) - {"helpful", "harmless", "humor"} == set(TRAITS)
    for key, axis in BUILTIN_AXES.items():
        assert axis.name == key
        assert axis.positive and axis.negative and axis.positive != axis.negative
        # Personas are spliced into "You are a {positive} assistant": a phrase, one line, short.
        for persona in (axis.positive, axis.negative):
            assert "\n" not in persona and len(persona) <= MAX_PERSONA_CHARS
            assert not persona.lower().startswith(("a ", "an ", "you "))


def test_builtin_personas_read_well_in_the_prompts() -> None:
    helpful = get_axis("helpful")
    assert f"You are a {helpful.positive} assistant" == "You are a helpful, honest and accurate assistant"
    assert "misleading" in helpful.negative
    assert "malicious" in get_axis("harmless").negative
    assert get_axis("humor").positive == "humorous and witty"


def test_get_axis_ignores_case_and_spaces() -> None:
    assert get_axis("  Harmless ") is BUILTIN_AXES["harmless"]


def test_unknown_axis_lists_builtins_and_custom_options() -> None:
    with pytest.raises(AlignezError) as info:
        get_axis("chef")
    msg = str(info.value)
    assert "chef" in msg and "helpful, harmless, humor, french" in msg
    assert "--positive" in msg and "--negative" in msg
    assert "\n" not in msg


def test_axis_is_frozen() -> None:
    axis = get_axis("helpful")
    with pytest.raises(dataclasses.FrozenInstanceError):
        axis.positive = "rude"  # type: ignore[misc]


def test_custom_axis_default_name_is_a_slug_of_positive() -> None:
    axis = custom_axis("pirate-like", "plain-spoken")
    assert axis == PreferenceAxis(name="custom-pirate-like", positive="pirate-like", negative="plain-spoken")
    assert custom_axis("  Patient  and\tEncouraging!! ", "impatient").name == "custom-patient-and-encouraging"
    assert custom_axis("  Patient  and\tEncouraging ", "impatient").positive == "Patient and Encouraging"
    assert custom_axis("café-style", "bland").name == "custom-cafe-style"
    assert custom_axis("日本風", "bland").name == "custom"


def test_custom_axis_long_slug_is_cut_at_a_word() -> None:
    name = custom_axis("extremely concise and remarkably precise technical", "vague").name
    assert name.startswith("custom-extremely-concise") and len(name) <= len("custom-") + 40
    assert not name.endswith("-")


def test_custom_axis_explicit_name() -> None:
    assert custom_axis("formal", "casual", name="Formality").name == "formality"


@pytest.mark.parametrize(
    ("positive", "negative", "name", "expected"),
    [
        ("", "rude", None, "--positive is empty"),
        ("polite", "   ", None, "--negative is empty"),
        ("polite\nand kind", "rude", None, "several lines"),
        ("x" * (MAX_PERSONA_CHARS + 1), "rude", None, "characters"),
        ("polite", "Polite", None, "same persona"),
        ("polite", "rude", "has space", "not usable"),
        ("polite", "rude", "helpful", "built-in"),
    ],
)
def test_custom_axis_rejects_bad_input(positive: str, negative: str, name: str | None, expected: str) -> None:
    with pytest.raises(AlignezError) as info:
        custom_axis(positive, negative, name=name)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_topic_axis_is_read_by_its_keywords_and_asked_for_in_every_answer() -> None:
    ocean = topic_axis("the ocean", "Ocean, sea,waves")
    assert (ocean.name, ocean.kind, ocean.measure) == ("topic-the-ocean", "topic", "mentions:ocean,sea,waves")
    assert ocean.from_texts and style_axis("pirate speech").from_texts and not get_axis("french").from_texts
    assert "the ocean" in ocean.guide("positive") and "still answering the request" in ocean.guide("positive")
    # Without keywords the concept's own words read it; the articles are not words of the concept.
    assert topic_axis("the deep sea").measure == "mentions:deep,sea"
    # A file records the name, the personas and the measure: the same axis comes back.
    assert stored_axis(ocean.name, ocean.positive, ocean.negative, ocean.measure) == ocean
    bard = style_axis("Shakespearean English")
    assert (bard.name, bard.kind, bard.measure_key) == ("style-shakespearean-english", "style", "judge")
    assert stored_axis(bard.name, bard.positive, bard.negative, "") == bard
    with pytest.raises(AlignezError, match="--concept is empty"):
        topic_axis("  ")
    with pytest.raises(AlignezError, match="comma-separated"):
        topic_axis("cats", " , ")


def test_resolve_axis_takes_one_behaviour() -> None:
    from alignez_local.api import resolve_axis

    assert resolve_axis(concept="cats", keywords="cat,kitten").measure == "mentions:cat,kitten"
    assert resolve_axis(style="pirate speech").kind == "style"
    with pytest.raises(AlignezError, match="give one of them"):
        resolve_axis(concept="cats", positive="a", negative="b")
    with pytest.raises(AlignezError, match="give one of them"):
        resolve_axis(concept="cats", positive="")  # an empty persona is still a second behaviour given
    with pytest.raises(AlignezError, match="--keywords is for --concept"):
        resolve_axis("french", keywords="oui")
    with pytest.raises(AlignezError, match="a --concept is measured by its --keywords"):
        resolve_axis(concept="cats", measure="capitals")
    # A style may name a measure instead of keywords (emoji are no words), not both.
    emoji = resolve_axis(style="emoji", measure="emoji")
    assert (emoji.name, emoji.kind, emoji.measure_key) == ("style-emoji", "style", "emoji")
    assert stored_axis(emoji.name, emoji.positive, emoji.negative, emoji.measure_key) == emoji
    with pytest.raises(AlignezError, match="give one of them"):
        resolve_axis(style="emoji", measure="emoji", keywords="smile")
    with pytest.raises(AlignezError, match="unknown behaviour measure 'emojis'"):
        resolve_axis(style="emoji", measure="emojis")
