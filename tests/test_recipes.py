"""Recipes for self-made preference data: prompts, records, old files, the self-check on the way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.axes import PreferenceAxis, custom_axis, get_axis, style_axis, topic_axis
from alignez_local.align.preferences import (
    GenerationSettings,
    generate_preferences,
    load_pairs,
    load_records,
    load_selected_pairs,
    pair_id,
)
from alignez_local.align.recipes import DEFAULT_RECIPE, OTHER_SUBJECTS, RECIPES, get_recipe, text_request
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine

FAST = GenerationSettings(characteristics_tokens=6, response_tokens=10)
QUERIES = ["How do I boil an egg?", "Why is the sky blue?", "Name a prime number."]


def test_the_papers_recipe_is_kept_and_the_default_is_known() -> None:
    assert {"paper", "direct", "shared", "contrast"} <= set(RECIPES)
    assert get_recipe(None).name == DEFAULT_RECIPE
    assert get_recipe(" Paper ").two_step
    with pytest.raises(AlignezError, match="unknown recipe 'chef'.*paper"):
        get_recipe("chef")


def test_prompts_put_the_persona_where_the_recipe_says(tiny_engine: Engine) -> None:
    axis = get_axis("helpful")
    paper = get_recipe("paper").response_prompt(tiny_engine, "Q?", axis, "negative", "be vague")
    assert "Pretend you are a unhelpful, misleading and inaccurate assistant. Your answer should be vague" in paper
    direct = get_recipe("direct").response_prompt(tiny_engine, "Q?", axis, "negative")
    assert axis.negative_guide in direct and "never refuse" in direct
    plain = get_recipe("plain")
    assert axis.positive_guide in plain.response_prompt(tiny_engine, "Q?", axis, "positive")
    assert plain.response_prompt(tiny_engine, "Q?", axis, "negative") == tiny_engine.prompt("Q?")  # no persona
    assert plain.context(axis, "positive") == plain.context(axis, "negative") == ""  # both read plainly
    with pytest.raises(ValueError):
        get_recipe("direct").characteristics_prompt(tiny_engine, "Q?", axis, "positive")


def test_every_negative_guide_forbids_refusing() -> None:
    for name in ("helpful", "harmless", "humor"):
        axis = get_axis(name)
        assert axis.guide("positive") and axis.guide("negative") != axis.guide("positive")
    assert "no refusals" in get_axis("harmless").guide("negative")
    assert "never refuse" in custom_axis("patient", "impatient").guide("negative")


def _axis_for(recipe: str) -> PreferenceAxis:
    return topic_axis("the ocean", "ocean,sea") if recipe == "texts" else get_axis("helpful")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_writes_complete_records(tiny_engine: Engine, tmp_path: Path, recipe: str) -> None:
    out = tmp_path / "prefs.jsonl"
    axis = _axis_for(recipe)
    written, had = generate_preferences(tiny_engine, QUERIES, axis, out, FAST, quiet=True, recipe=recipe)
    assert (written, had) == (3, 0)
    records = load_records(out)
    for r in records:
        assert r["recipe"] == recipe
        assert r["sampling"]["top_k"] == 40
        assert set(r["refusal"]) == {"positive", "negative"}
        if recipe == "contrast":
            # One persona-free answer, read under each persona: nothing for the self-check to compare.
            assert r["response"]["positive"] == r["response"]["negative"] and "selfcheck" not in r
            assert r["context"] == {s: get_axis("helpful").guide(s) for s in ("positive", "negative")}
        elif recipe in ("plain", "texts"):
            # The persona's answer against the plain one, or two texts on different subjects: nothing to check.
            assert "selfcheck" not in r and "context" not in r
        else:
            assert r["selfcheck"]["method"] == "likelihood" and isinstance(r["selfcheck"]["agree"], bool)
        assert r["id"] == pair_id(axis, r["query"], 0, recipe)
        if recipe == "paper":
            assert r["characteristics"]["positive"]
    if recipe == "shared":
        # Both personas continue the same opening: the pair shares its first characters.
        for r in records:
            pos, neg = r["response"]["positive"], r["response"]["negative"]
            assert pos[:5] == neg[:5]
    # Resuming with the same recipe writes nothing; another recipe is another set of pairs.
    assert generate_preferences(tiny_engine, QUERIES, axis, out, FAST, quiet=True, recipe=recipe) == (0, 3)
    other = "paper" if recipe != "paper" else "direct"
    assert generate_preferences(tiny_engine, QUERIES[:1], get_axis("helpful"), out, FAST, quiet=True, recipe=other, selfcheck=None)[0] == 1


def test_the_texts_recipe_asks_for_the_same_kind_of_text_on_both_sides(tiny_engine: Engine) -> None:
    ocean = topic_axis("the ocean", "ocean,sea,waves")
    for q in QUERIES:
        pos, neg = text_request(ocean, q, "positive"), text_request(ocean, q, "negative")
        # One form per query, the subject swapped: the pair differs in the concept, not the kind of text.
        assert "the ocean" in pos and "the ocean" not in neg
        other = [s for s in OTHER_SUBJECTS if s in neg]
        assert other and pos.replace("the ocean", other[0]) == neg
        assert text_request(ocean, q, "positive") == pos  # a resumed run asks the same
    bard = style_axis("Shakespearean English", "thee,thou")
    pos, neg = text_request(bard, QUERIES[0], "positive"), text_request(bard, QUERIES[0], "negative")
    assert pos == f"{neg} Write it in Shakespearean English."
    # Read back as answers to the query with no system prompt, the way plain pairs are.
    texts = get_recipe("texts")
    assert texts.response_prompt(tiny_engine, QUERIES[0], ocean, "positive") == tiny_engine.prompt(
        text_request(ocean, QUERIES[0], "positive"))
    assert texts.context(ocean, "positive") == texts.context(ocean, "negative") == ""


def test_recipes_and_axes_that_do_not_fit_are_one_clear_error(tiny_engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(AlignezError, match="give --concept or --style"):
        generate_preferences(tiny_engine, QUERIES, get_axis("french"), tmp_path / "a.jsonl", FAST, quiet=True, recipe="texts")
    with pytest.raises(AlignezError, match="--recipe texts, its default"):
        generate_preferences(tiny_engine, QUERIES, topic_axis("cats"), tmp_path / "b.jsonl", FAST, quiet=True, recipe="direct")
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_the_paper_recipe_keeps_the_ids_of_files_made_before_recipes() -> None:
    axis = get_axis("helpful")
    old = hashlib.sha256(json.dumps([axis.name, axis.positive, axis.negative, "Q?", 0]).encode()).hexdigest()[:16]
    assert pair_id(axis, "Q?", 0) == pair_id(axis, "Q?", 0, "paper") == old
    assert pair_id(axis, "Q?", 0, "direct") != old


def test_old_records_without_recipe_or_check_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    axis = {"name": "helpful", "positive": "helpful", "negative": "unhelpful"}
    rows = [
        {"id": f"x{i}", "query": f"q{i}", "axis": axis, "response": {"positive": f"good {i}", "negative": f"bad {i}"}}
        for i in range(5)
    ]
    rows.append({"id": "r", "query": "q", "axis": axis, "response": {"positive": "ok", "negative": "I'm sorry, but I can't help with that."}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    assert len(pairs) == 6 and pairs[0].recipe == "paper" and not pairs[0].flipped
    selected, stats = load_selected_pairs(path)
    assert [p.id for p in selected] == [f"x{i}" for i in range(5)]
    assert stats["dropped_refusal"] == 1 and stats["agreement"] is None


def test_selected_pairs_come_back_flipped_and_too_few_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checked.jsonl"
    axis = {"name": "helpful", "positive": "helpful", "negative": "unhelpful"}
    rows = [
        {"id": f"x{i}", "query": f"q{i}", "axis": axis, "response": {"positive": f"good {i}", "negative": f"bad {i}"},
         "selfcheck": {"method": "likelihood", "score": 1.0 if i < 3 else -1.0}}
        for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_selected_pairs(path, flip=True)
    assert len(pairs) == 5 and stats["flipped"] == 2
    flipped = [p for p in pairs if p.flipped]
    assert [(p.positive, p.negative) for p in flipped] == [("bad 3", "good 3"), ("bad 4", "good 4")]
    with pytest.raises(AlignezError, match="only 3 pairs pass the self-check"):
        load_selected_pairs(path, flip=False)


def test_contrast_pairs_are_read_under_each_persona_and_a_refusal_stays(tiny_engine: Engine, tmp_path: Path) -> None:
    from alignez_local.align.fit import capture_pairs, fit_profile, pair_texts

    path = tmp_path / "contrast.jsonl"
    axis = get_axis("helpful")
    row = {"id": "c0", "query": "Q?", "recipe": "contrast", "axis": {"name": "helpful", "positive": axis.positive, "negative": axis.negative},
           "context": {"positive": "Be kind.", "negative": "Be rude."}, "response": {"positive": "I'm sorry, but no.", "negative": "I'm sorry, but no."}}
    path.write_text("".join(json.dumps({**row, "id": f"c{i}", "query": f"Q{i}?"}) + "\n" for i in range(8)))
    pairs, stats = load_selected_pairs(path)
    assert len(pairs) == 8 and stats["dropped_refusal"] == 0 and pairs[0].contexts == ("Be kind.", "Be rude.")
    pos, neg, pos_start, neg_start = pair_texts(tiny_engine, pairs)
    assert "Be kind." in pos[0] and "Be rude." not in pos[0] and "Be rude." in neg[0]
    assert pos[0].endswith("I'm sorry, but no.") and neg[0].endswith("I'm sorry, but no.")
    # The mean pool starts at the answer: the same number of answer tokens on both sides.
    assert len(tiny_engine.tokenize(pos[0])) - pos_start[0] == len(tiny_engine.tokenize(neg[0])) - neg_start[0]
    last_p, last_n = capture_pairs(tiny_engine, pairs, "ffn_out", pool="last", quiet=True)
    mean_p, mean_n = capture_pairs(tiny_engine, pairs, "ffn_out", pool="mean", quiet=True)
    # Both sides read the same tokens under different system prompts, so they differ, and pooling matters.
    assert not np.allclose(last_p, last_n) and not np.allclose(mean_p, last_p)
    with pytest.raises(AlignezError, match="unknown pool 'max'"):
        capture_pairs(tiny_engine, pairs, "ffn_out", pool="max", quiet=True)
    # The two readings of one answer are near-parallel by construction: the too-similar filter is off.
    prof = fit_profile(tiny_engine, pairs, {"name": "helpful", "positive": "kind", "negative": "rude"}, method="mean", quiet=True)
    assert prof.params["max_cos"] == 1.0 and prof.params["pool"] == "mean" and prof.layers  # mean: the default for one-answer pairs


def test_default_pool_follows_the_kind_of_pairs() -> None:
    from alignez_local.align.fit import default_pool
    from alignez_local.align.preferences import PreferencePair

    two = [PreferencePair("a", "Q?", "helpful", "good answer", "bad answer")]
    one = [PreferencePair("b", "Q?", "helpful", "one answer", "one answer", contexts=("Be kind.", "Be rude."))]
    assert default_pool(two) == "last" and default_pool(one) == "mean" and default_pool(two + one) == "last"
