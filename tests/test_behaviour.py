"""The behaviour measures, the combined score, the random baseline, the choose/report split, and the
behaviour-chosen strength on the tiny model with a planted direction (issue 19)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignez_local.align.axes import BUILTIN_AXES, TRAITS, custom_axis
from alignez_local.align.behaviour_bench import BehaviourBench, split_heldout, unsteered_nll
from alignez_local.align.strength_by_behaviour import (
    LOOP_MARGIN, BehaviourTrial, calibrate_behaviour, lowest_is_best, midpoints,
)
from alignez_local.align.pair_filter import filter_line, keep_contrasting
from alignez_local.align.preferences import PreferencePair
from alignez_local.align.directions import random_like, random_subspaces_like
from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.errors import AlignezError
from alignez_local.measures.behaviour import MEASURES, JudgeMeasure, MarkerMeasure, contrast_probability, measure_for
from alignez_local.measures.scoring import (
    Scorer, answers_nothing, distinct_share, fluency_from_nll, harmonic_mean, loops, pmi_relevance,
)
from alignez_local.evaluation.behaviour_report import condition_lines
from alignez_local.formats.control_vector import ControlVector
from alignez_local.llama.engine import Engine, Sampling


# --- objective measures ------------------------------------------------------------------------


def _score(key: str, *answers: str) -> list[float]:
    return list(MEASURES[key].scores(["q"] * len(answers), list(answers), None))


def test_language_measure_reads_french_with_a_language_identifier() -> None:
    assert _score("language:fr",
                  "Pour faire bouillir un oeuf, mettez-le dans l'eau bouillante pendant neuf minutes.",
                  "To boil an egg, put it in boiling water for nine minutes.",
                  "") == [1.0, 0.0, 0.0]


def test_checkers_count_what_their_label_says() -> None:
    assert _score("brevity:20", "Yes.", " ".join(["word"] * 21), "") == [1.0, 0.0, 0.0]
    assert _score("markers:pirate", "Arr matey, ye be right!", "The ship sails today.", "Arrow heads") == [1.0, 0.0, 0.0]
    assert _score("capitals", "THIS IS LOUD, OK?", "This is not.") == [1.0, 0.0]
    assert _score("refusal", "I'm sorry, but I can't help with that.", "Sure, here is how.") == [1.0, 0.0]
    assert _score("markers:enthusiastic", "Wow! Amazing! I love it!", "It is fine.") == [1.0, 0.0]
    # Emoji: pictographs, flags and dingbats count; accented letters, CJK, the degree sign and arrows do not.
    assert _score("emoji", "Boil it for 9 minutes 🥚🔥", "Great job ✅", "🇫🇷 Bonjour", "☀ sunny",
                  "Heat to 100°C → done", "Café, naïve, 東京, déjà vu", "") == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_every_axis_has_a_measure_and_the_traits_have_checkers() -> None:
    assert {"french", "pirate", "brief", "casual", "enthusiastic"} <= set(TRAITS)
    for name, axis in BUILTIN_AXES.items():
        m = measure_for(axis.measure, axis.positive)
        assert m.key in MEASURES or isinstance(m, JudgeMeasure), name
        if axis.trait:
            assert not m.needs_judge, f"trait {name} must have an objective checker"
    assert BUILTIN_AXES["harmless"].measure == "refusal" and not MEASURES["refusal"].uses_relevance
    custom = custom_axis("sarcastic", "sincere")
    m = measure_for(custom.measure, custom.positive, custom.negative)
    assert isinstance(m, JudgeMeasure) and m.needs_judge and "sarcastic" in m.question
    # both poles are asked about: the judge's Yes to "sarcastic" is read against its Yes to "sincere"
    assert m.contrast == "sincere" and "sincere" in m.describe()["contrast_question"] and "rather than sincere" in m.label
    with pytest.raises(AlignezError, match="needs a judge"):
        Scorer(m, lambda q, a: np.zeros(len(a)))


def test_a_language_persona_is_read_by_the_language_identifier() -> None:
    """A custom axis that names a language is scored by py3langid, not by the judge (which cannot
    tell "written in a Spanish-speaking way" from English, docs/results.md §13), and asked for in
    the words that made Qwen answer in French."""
    for positive in ("Spanish", "Spanish-speaking", "answers in Spanish", "speaks  spanish"):
        axis = custom_axis(positive, "English-speaking")
        assert axis.measure == "language:es", positive
        assert axis.guide("positive") == "You always answer in Spanish, never in English."
        assert axis.guide("negative") == "You always answer in English, never in Spanish."
    m = measure_for(custom_axis("German", "plain").measure, "German")
    assert not m.needs_judge and "German" in m.label
    assert list(m.scores(["q"] * 2, ["Das Wetter ist heute sehr schön und warm.", "The weather is nice today."], None)) == [1.0, 0.0]
    # Not only a language: the judge, unless the user picks a checker.
    assert custom_axis("Spanish cooking fan", "bland").measure == ""
    assert custom_axis("sarcastic", "sincere", measure="brevity:12").measure == "brevity:12"
    assert custom_axis("Spanish", "English", measure="judge").measure == ""


def test_measure_keys_take_parameters_and_bad_keys_say_what_exists() -> None:
    assert measure_for("language:es", "x").scores(["q"], ["¿Dónde está la biblioteca de la ciudad?"], None)[0] == 1.0
    assert _score("brevity:20", "one two") == list(measure_for("brevity:3", "x").scores(["q"], ["one two"], None))
    assert isinstance(measure_for("judge", "sarcastic", "sincere"), JudgeMeasure)
    for bad in ("language:spanish", "brevity:0", "brevity:x", "tone"):
        with pytest.raises(AlignezError, match="unknown behaviour measure.*language:CODE"):
            measure_for(bad, "x")
    with pytest.raises(AlignezError, match="unknown behaviour measure"):
        custom_axis("sarcastic", "sincere", measure="sarcasm")


def test_a_concept_is_mentioned_by_its_whole_words_and_their_plurals() -> None:
    m = measure_for("mentions:ocean, sea,wave", "the ocean")
    assert (m.key, m.label) == ("mentions:ocean,sea,wave", "answers that mention ocean, sea, wave")
    answers = ["The SEA is calm.", "Waves crash on rocks.", "Oceans cover the earth.",
               "Search the season's seats.", "A wavelength in physics.", ""]
    # "sea" in "search"/"season"/"seats" and "wave" in "wavelength" are not mentions.
    assert m.scores([""] * len(answers), answers, None).tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(AlignezError, match="not a word"):
        measure_for("mentions:ocean,(sea|x)", "x")


def test_contrast_reading_is_above_half_exactly_when_the_positive_yes_is_likelier() -> None:
    pos = np.array([0.9, 0.9, 0.5, 0.2, 1.0, 0.0])
    neg = np.array([0.95, 0.1, 0.5, 0.1, 1.0, 0.0])
    p = contrast_probability(pos, neg)
    # a judge saying Yes to both questions (0.9 vs 0.95) reads the answer as the negative pole
    assert list(p > 0.5) == [False, True, False, True, False, False] and p[2] == pytest.approx(0.5)
    assert np.isfinite(p).all() and ((0 <= p) & (p <= 1)).all()  # certain judges do not overflow
    assert p[1] == pytest.approx(0.9 * 0.9 / (0.9 * 0.9 + 0.1 * 0.1))  # odds ratio 81


# --- guards and the combined score -------------------------------------------------------------


def test_pmi_relevance_reads_how_much_the_question_explains_the_answer() -> None:
    np.testing.assert_allclose(pmi_relevance(np.array([1.0, 0.5, 0.0, -0.4, np.nan]), 1.0), [1, 0.5, 0, 0, 0])
    np.testing.assert_allclose(pmi_relevance(np.array([2.0, 0.2]), 0.5), [1.0, 0.4])
    # a model whose own answers gain nothing from their questions: relevance cannot be read, so it is 1
    np.testing.assert_allclose(pmi_relevance(np.array([0.3, -2.0]), 0.0), [1.0, 1.0])


def test_harmonic_mean_is_zero_when_any_part_is_zero() -> None:
    out = harmonic_mean(np.array([1.0, 0.0, 0.5]), np.array([1.0, 1.0, 0.5]), np.array([1.0, 1.0, 0.5]))
    np.testing.assert_allclose(out, [1.0, 0.0, 0.5])


@given(st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_harmonic_mean_never_exceeds_the_smallest_part_by_much(parts: list[float]) -> None:
    h = float(harmonic_mean(*[np.array([p]) for p in parts])[0])
    assert min(parts) - 1e-12 <= h <= max(parts) + 1e-12
    assert h <= 3 * min(parts) + 1e-12  # the weakest guard dominates


def test_fluency_is_relative_to_the_unsteered_answers_and_punishes_loops() -> None:
    texts = ["a fine answer with many different words in it", "a fine answer with many different words in it",
             "the the the the the the the the the the the the", ""]
    f = fluency_from_nll(np.array([0.4, 3.4, 0.1, np.nan]), 0.4, texts, span=3.0)
    assert f[0] == pytest.approx(1.0) and f[1] == pytest.approx(0.0)
    assert f[2] < 0.3 and f[3] == 0.0
    assert distinct_share("one two three four five six") == 1.0


LOOPING = [
    "THE BIG BANG THEORY THE BIG BANG THEORY THE BIG BANG THEORY THE BIG BANG",
    "I AM HERE TO HELP YOU TO BECOME THE GUESTS OF THE EVENT. I AM HERE TO HELP YOU TO BECOME THE GUESTS "
    "OF THE EVENT. I AM HERE TO HELP YOU TO BECOME THE GUESTS",
    "Bonjour ! Je suis là pour vous aider. Je suis là pour vous aider. Je suis là pour vous aider.",
    "the the the the the the the the the the",
]
HEALTHY = [
    "To get better sleep on night shifts, keep the bedroom dark and cool, go to bed at the same time "
    "every morning, and avoid caffeine in the last hours of your shift.",
    "Pour mieux dormir, gardez la chambre sombre et fraîche, couchez-vous à la même heure et évitez le café.",
    "1. Drink water. 2. Sleep well. 3. Eat well. 4. Move every day. 5. See friends.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\nprint(add(3, 4))",
    "Paris.",
    "",
]


@pytest.mark.parametrize("text", LOOPING)
def test_a_phrase_said_again_and_again_loops(text: str) -> None:
    assert loops(text)


@pytest.mark.parametrize("text", HEALTHY)
def test_healthy_answers_do_not_loop(text: str) -> None:
    assert not loops(text)


def test_the_combined_score_is_zero_where_the_behaviour_is_absent() -> None:
    """AxBench's rule: a judge's P(yes) of 0.3 (behaviour absent) must not enter the mean, or the
    calibration ranks strengths that do nothing (every strength 0% behaviour, combined 0.5)."""
    class Judge:
        def yes_probability(self, question, pairs):
            return np.array([0.3 if "plain" in a else 0.8 for _, a in pairs])

    measure = JudgeMeasure("ocean", "mentions the ocean", needs_judge=True, persona="ocean-loving")
    scorer = Scorer(measure, lambda qs, ans: np.full(len(ans), 0.4), Judge())
    scorer.reference_nll = 0.4
    sc = scorer.score(["q1", "q2"], ["a plain answer", "the sea, the waves"])
    assert sc.combined[0] == 0.0 and sc.combined[1] > 0.5
    assert sc.summary()["loop_share"]["mean"] == 0.0


@pytest.mark.parametrize("question,answer,nothing", [
    ("Why do we have leap years?", "LEAP YEAR", True),
    ("Why do we have leap years?", "We have leap years.", True),
    ("What does the ozone layer protect us from?", "THE OZONE LAYER PROTECTS US FROM.", True),
    ("How do I boil an egg?", "I'm sorry, but I can't assist with that.", True),
    ("Why is the sky blue?", "The sky is blue because of Rayleigh scattering.", False),
    ("Why is the sky blue?", "Le ciel est bleu.", False),
    ("Can I get out of a gym contract I signed?", "Yes.", False),
    ("Write a Python function that reverses a list.", "def rev(xs): return xs[::-1]", False),
    ("Q?", "", False),  # empty: fluency's 0 already, not this rule's
])
def test_a_refusal_or_the_question_said_back_answers_nothing(question: str, answer: str, nothing: bool) -> None:
    assert answers_nothing(question, answer) is nothing


def test_relevance_is_zero_for_an_answer_that_answers_nothing_whatever_the_judge_says() -> None:
    """The 1.5B judge and the PMI reading both passed refusals and restatements (issue 31)."""
    class Judge:
        def yes_probability(self, question, pairs):
            return np.full(len(pairs), 0.9)

    scorer = Scorer(measure_for("capitals", "x"), lambda qs, ans: np.full(len(ans), 0.4), Judge())
    scorer.reference_nll = 0.4
    sc = scorer.score(["Why do we have leap years?"] * 2, ["WE HAVE LEAP YEARS.", "THE EARTH TAKES 365.25 DAYS."])
    assert sc.relevance.tolist() == [0.0, 0.9] and sc.combined[0] == 0.0 and sc.combined[1] > 0.5


def test_the_judges_yes_no_relevance_is_shown_only_where_a_judge_read_it() -> None:
    """Issue 31: beside the mean P(yes), the share of answers the judge reads as relevant (P >= 0.5),
    as a reader counts; a table whose relevance came from likelihoods alone has no such column."""
    class Judge:
        def yes_probability(self, question, pairs):
            return np.array([0.2 if "SEA" in a else 0.7 for _, a in pairs])

    nll = lambda qs, ans: np.full(len(ans), 0.4)  # noqa: E731
    judged = Scorer(measure_for("capitals", "x"), nll, Judge())
    judged.reference_nll = 0.4
    qs = ["Why is the sky blue?", "Name a fruit.", "Why do cats purr?", "What is rain?"]
    ans = ["RAYLEIGH SCATTERING.", "THE SEA.", "CONTENTMENT.", "WATER FROM CLOUDS."]
    summary = judged.score(qs, ans).summary()
    assert summary["relevant_share"]["mean"] == 0.75 and summary["relevance"]["mean"] == pytest.approx(0.575)
    assert "relevant_share" not in dataclasses.replace(judged.score(qs, ans), judged=False).summary()
    unjudged = {k: v for k, v in summary.items() if k != "relevant_share"}
    with_judge = condition_lines({"unsteered": summary, "vector x1": summary}, 12)
    without = condition_lines({"unsteered": unjudged}, 12)
    assert with_judge[0].split()[-1] == "relevant" and with_judge[1].rstrip().endswith("75%")
    assert "relevant" not in without[0]
    assert condition_lines({"old": unjudged, "new": summary}, 12)[1].rstrip().endswith("-")


def test_the_asked_reading_is_taken_only_where_it_can_raise_fluency() -> None:
    """Fluency is the better of the plain and the asked-for reading; an answer read plainly at or
    below the reference is already at 1, so only the others are read under the instruction."""
    plain = {"at reference": 0.4, "below": 0.2, "above": 2.0, "far above": 3.5}
    asked_log: list[list[str]] = []

    def nll(qs, ans):
        return np.array([plain[a] for a in ans])

    def nll_asked(qs, ans):
        asked_log.append(list(ans))
        return np.array([0.4 for _ in ans])

    scorer = Scorer(MEASURES["capitals"], nll, None, nll_asked=nll_asked)
    scorer.reference_nll, scorer.reference_asked = 0.4, 0.4
    answers = list(plain)
    f = scorer.fluency(["q"] * 4, answers)
    assert asked_log == [["above", "far above"]]
    assert f == pytest.approx([1.0, 1.0, 1.0, 1.0])  # the two above are fluent when read as asked for


# --- the random baseline and the split ---------------------------------------------------------


def test_random_baseline_matches_the_vectors_norms_per_layer() -> None:
    rng = np.random.default_rng(0)
    vec = {L: rng.standard_normal(32).astype(np.float32) * (L + 1) for L in (2, 5, 9)}
    rand = random_like(vec, seed=3)
    assert sorted(rand) == sorted(vec)
    for L in vec:
        assert np.linalg.norm(rand[L]) == pytest.approx(np.linalg.norm(vec[L]), rel=1e-5)
        assert abs(float(rand[L] @ vec[L]) / np.linalg.norm(vec[L]) ** 2) < 0.8  # not the vector itself
    np.testing.assert_array_equal(random_like(vec, 3)[2], rand[2])  # reproducible
    subs = random_subspaces_like({4: np.zeros((3, 32), np.float32)}, seed=1)
    np.testing.assert_allclose(subs[4] @ subs[4].T, np.eye(3), atol=1e-5)


@settings(max_examples=200)
@given(st.lists(st.text(min_size=1, max_size=5), min_size=2, max_size=40), st.integers(1, 20), st.integers(1, 20))
def test_choose_and_report_halves_never_share_a_query(queries: list[str], n_choose: int, n_report: int) -> None:
    if len(set(queries)) < 2:
        with pytest.raises(AlignezError):
            split_heldout(queries, n_choose, n_report)
        return
    choose, report = split_heldout(queries, n_choose, n_report)
    assert report and choose and not set(choose) & set(report)
    assert len(choose) <= n_choose and len(report) <= n_report


# --- the strength chosen by the behaviour, on the tiny model -----------------------------------

QUERIES = ["hello there", "tell me a story", "what is two plus two", "name a color", "a b c", "you and the sea",
           "is it in", "of the day", "red", "blue", "green", "to be", "in the end", "go", "stop", "why"]
GRID = (4, 16, 32, 128)  # on this model " the" appears from about 16 and takes over (fluency breaks) by 64


def _bench(engine: Engine) -> BehaviourBench:
    """The planted behaviour: answers that say " the" at least twice (counted by a marker measure)."""
    # No request is answered by a random model: the planted behaviour has no relevance guard.
    measure = MarkerMeasure("planted", "answers saying 'the' twice", uses_relevance=False, markers=("the",), min_hits=2)
    choose, report = split_heldout(QUERIES, 8, 8)
    return BehaviourBench(engine, Scorer(measure, unsteered_nll(engine)), "Say the word the.", choose, report,
                          sampling=Sampling(temperature=0.0, max_tokens=16))


def _planted(engine: Engine, path: Path, size: float) -> ControlVector:
    """A vector at the last layer along the output embedding of the piece " the": adding it makes the
    model say " the", more often the larger it is."""
    weights = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "output.weight").data
    token = next(t for t in range(engine.n_vocab) if engine.detokenize([t]) == " the")
    w = np.asarray(weights[token], dtype=np.float32)
    return ControlVector({engine.n_layer - 1: w / np.linalg.norm(w) * np.float32(size)}, model_hint=engine.arch)


def _calibrate(engine: Engine, cv: ControlVector, grid: tuple[float, ...] = GRID, loop_margin: float = 1.0):
    """The planted behaviour is a word said again ("the the the"): loops are allowed unless a test
    checks the loop rule itself."""
    noise = ControlVector(random_like(dict(cv.directions), seed=1), model_hint=engine.arch)
    return calibrate_behaviour(_bench(engine), lambda s: Steering(vectors=[VectorSlot("v", cv, s)]),
                               lambda s: Steering(vectors=[VectorSlot("r", noise, s)]), strengths=grid,
                               loop_margin=loop_margin)


def test_a_grid_that_starts_broken_is_halved_until_it_holds(tiny_engine: Engine, tiny_model_path: Path) -> None:
    cal = _calibrate(tiny_engine, _planted(tiny_engine, tiny_model_path, 1.0), grid=(128.0,))
    first, *lower = cal.trials
    assert first.strength == 128 and first.broken
    halvings = [t for t in lower if t.strength in (64, 32, 16)]
    assert halvings and not halvings[-1].broken and all(t.broken for t in halvings[:-1])
    assert cal.strength < 128 and not next(t for t in cal.trials if t.strength == cal.strength).broken


def test_calibration_finds_where_the_planted_behaviour_appears(tiny_engine: Engine, tiny_model_path: Path) -> None:
    cal = _calibrate(tiny_engine, _planted(tiny_engine, tiny_model_path, 1.0))
    assert cal.beats_random and "beats a random direction" in cal.verdict
    chosen = next(t for t in cal.trials if t.strength == cal.strength)
    assert chosen.behaviour_rate >= 0.5 and not chosen.broken
    # the search stopped where fluency broke, and chose below it
    coarse = [t for t in cal.trials if t.strength in GRID]
    assert coarse[-1].broken and cal.strength < coarse[-1].strength
    # then refined between the best strength and its neighbours, never past where it broke
    extra = [t.strength for t in cal.trials if t.strength not in GRID]
    assert extra and all(GRID[0] < s < coarse[-1].strength for s in extra)
    assert extra == midpoints(coarse)
    # a strength far below the break floor on the first half of the choose queries is not answered
    # on the second; every strength that held was measured on all of them
    assert any(t.broken and t.answers == 4 for t in cal.trials)
    assert all(t.answers == 8 for t in cal.trials if not t.broken)
    rep = cal.report
    assert rep["steered"]["behaviour_rate"]["mean"] >= 0.5
    assert rep["random"]["behaviour_rate"]["mean"] <= rep["unsteered"]["behaviour_rate"]["mean"] + 0.125
    assert rep["steered"]["n"] == 8 and cal.report_queries == 8 and cal.choose_queries == 8
    assert cal.vs_random["ci95_low"] > 0


def test_a_search_from_a_middle_strength_goes_down_only_while_the_weakest_is_best(
        tiny_engine: Engine, tiny_model_path: Path) -> None:
    """The default search starts at START, not at the smallest strength: what it finds on the planted
    behaviour is what the search from the bottom finds, and the weaker strengths are tried only
    while the weakest tried is the best (or broke)."""
    cv = _planted(tiny_engine, tiny_model_path, 1.0)
    noise = ControlVector(random_like(dict(cv.directions), seed=1), model_hint=tiny_engine.arch)
    full = _calibrate(tiny_engine, cv)
    for start in (16, 32, 128):
        cal = calibrate_behaviour(_bench(tiny_engine), lambda s: Steering(vectors=[VectorSlot("v", cv, s)]),
                                  lambda s: Steering(vectors=[VectorSlot("r", noise, s)]), strengths=GRID, start=start,
                                  loop_margin=1.0)
        assert cal.trials[0].strength == start
        below = [i for i, t in enumerate(cal.trials) if t.strength < start and t.strength in GRID]
        assert all(lowest_is_best(cal.trials[:i]) for i in below)  # (and the guards had fallen)
        assert cal.strength == full.strength


def test_weaker_strengths_are_tried_only_when_the_weakest_is_best_or_broke() -> None:
    assert lowest_is_best([_trial(0.125, 0.8), _trial(0.25, 0.5)])
    assert not lowest_is_best([_trial(0.125, 0.5), _trial(0.25, 0.8)])
    assert lowest_is_best([_trial(0.125, 0.0, broken=True)])
    assert not lowest_is_best([_trial(0.125, 0.0), _trial(0.25, 0.0)])  # nothing shows: weaker is no help
    # best and weakest, but its relevance and fluency (0.9) hold: a weaker strength could only lose behaviour
    assert not lowest_is_best([_trial(0.125, 0.8), _trial(0.25, 0.5)], guards=(0.8, 0.8))
    assert lowest_is_best([_trial(0.125, 0.8), _trial(0.25, 0.5)], guards=(0.95, 0.8))


def test_a_strength_whose_answers_loop_more_than_prompting_is_not_chosen(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """With the default margin, the strength where the planted " the" takes over ("the the the": a
    loop a reader sees, however likely each token) cannot win, although its combined score is best."""
    cv = _planted(tiny_engine, tiny_model_path, 1.0)
    free, ruled = _calibrate(tiny_engine, cv), _calibrate(tiny_engine, cv, loop_margin=LOOP_MARGIN)
    looping = [t for t in ruled.trials if t.loops_too_often and not t.broken]
    assert looping, "no strength looped: the rule was not exercised"
    assert ruled.strength not in {t.strength for t in looping}
    assert free.strength in {t.strength for t in looping}  # the best combined score was a looping one
    assert next(t for t in ruled.trials if t.strength == ruled.strength).eligible


def test_calibration_says_plainly_when_nothing_beats_random(tiny_engine: Engine, tiny_model_path: Path) -> None:
    cal = _calibrate(tiny_engine, _planted(tiny_engine, tiny_model_path, 1e-6))
    assert not cal.beats_random and "NO strength" in cal.verdict
    assert "NO strength" in cal.line("vector")
    assert cal.as_dict()["beats_random"] is False


def test_each_answer_is_read_once_for_its_fluency(tiny_engine: Engine) -> None:
    """A calibration scores many equal answers (weak strengths and the random direction often change
    nothing): the unsteered reading of each (question, answer) is decoded once and reused."""
    nll = unsteered_nll(tiny_engine)
    qs, ans = ["hello there", "red", "red"], ["the sea is blue", "a b c", "a b c"]
    before = tiny_engine.counts.snapshot()
    first = nll(qs, ans)
    read = tiny_engine.counts.since(before).tokens
    again = nll(qs[::-1], ans[::-1])
    assert tiny_engine.counts.since(before).tokens == read > 0  # nothing decoded the second time
    assert np.array_equal(first, again[::-1]) and np.isfinite(first).all()
    assert np.isnan(nll(["go"], [" "]))[0]  # an empty answer has no reading
    fresh = unsteered_nll(tiny_engine)(qs[:2], ans[:2])  # the same numbers as a first reading
    assert np.allclose(fresh, first[:2], atol=1e-4)


def test_answers_the_unsteered_model_wrote_are_not_read_again(smollm_engine: Engine) -> None:
    """The unsteered answers' generation holds their plain NLL (token log-probabilities of the raw
    distribution): the reader keeps it, equal to a fresh reading where the text tokenizes back to
    the same tokens, and decodes nothing for them (SmolLM2: the random test model's text rarely
    tokenizes back to what it generated)."""
    reader = unsteered_nll(smollm_engine)
    qs = ["Name a fruit.", "What colour is the sky?", "Say hello.", "What is two plus two?"]
    done = smollm_engine.generate([smollm_engine.prompt(q) for q in qs], Sampling(temperature=0.0, max_tokens=16))
    reader.remember(qs, done)
    same = [i for i, c in enumerate(done) if smollm_engine.tokenize(c.text, add_bos=False) == list(c.tokens)]
    assert same, "no answer tokenizes back to its own tokens: nothing compared"
    before = smollm_engine.counts.snapshot()
    kept = reader([qs[i] for i in same], [done[i].text for i in same])
    assert smollm_engine.counts.since(before).tokens == 0 and np.isfinite(kept).all()
    fresh = unsteered_nll(smollm_engine)([qs[i] for i in same], [done[i].text for i in same])
    # Decoded one token per step against read in one batch: llama.cpp's kernels differ (matrix-vector
    # against matrix-matrix), so the per-token means differ in the second decimal (0.022 at most here).
    np.testing.assert_allclose(kept, fresh, atol=0.05)
    # a text the tokenizer would split otherwise is read, not taken from its generation
    other = [i for i in range(len(done)) if i not in same and done[i].text.strip()]
    if other:
        before = smollm_engine.counts.snapshot()
        reader([qs[other[0]]], [done[other[0]].text])
        assert smollm_engine.counts.since(before).tokens > 0


def _trial(strength: float, combined: float, broken: bool = False) -> BehaviourTrial:
    return BehaviourTrial(strength, combined, 0.9, 0.9, combined, broken)


def test_the_grid_is_refined_around_the_best_strength_and_never_past_a_break() -> None:
    grid = [_trial(0.25, 0.1), _trial(0.5, 0.4), _trial(1.0, 0.42), _trial(2.0, 0.0, broken=True)]
    assert midpoints(grid) == [round(np.sqrt(0.5), 4)]  # towards the better neighbour: 0.5|1, not 1|2
    rising = [_trial(0.25, 0.1), _trial(0.5, 0.4), _trial(1.0, 0.42), _trial(2.0, 0.41)]
    assert midpoints(rising) == [round(np.sqrt(2.0), 4)]
    # nothing showed the behaviour: refine above the strongest unbroken strength, where it may begin
    flat = [_trial(0.25, 0.0), _trial(0.5, 0.0), _trial(1.0, 0.0, broken=True)]
    assert midpoints(flat) == [round(np.sqrt(0.5), 4)]
    # the best at the end of the grid has one neighbour; after a refinement, its nearer neighbours count
    assert midpoints([_trial(1.0, 0.1), _trial(2.0, 0.5)]) == [round(np.sqrt(2.0), 4)]
    assert midpoints([_trial(1.0, 0.1), _trial(2.0, 0.5), _trial(1.4142, 0.2)]) == [round(np.sqrt(2.0 * 1.4142), 4)]
    assert midpoints([_trial(1.0, 0.0, broken=True)]) == []


def _pair(i: int, positive: str, negative: str) -> PreferencePair:
    return PreferencePair(f"p{i}", f"question {i}?", "brief", positive, negative)


def test_pairs_are_kept_only_where_the_checker_sees_the_contrast() -> None:
    measure = measure_for("brevity:5", "brief")
    short, long = "Yes, it is.", "It is, and here is a long answer that goes on for well over five words."
    pairs = ([_pair(i, short, long) for i in range(10)] + [_pair(10, long, long), _pair(11, short, short),
                                                           _pair(12, long, short)])
    kept, rec = keep_contrasting(pairs, measure)
    assert [p.id for p in kept] == [f"p{i}" for i in range(10)]
    assert rec == {"measure": "brevity:5", "total": 13, "positive_shows": 11, "negative_shows": 2, "contrasting": 10,
                   "applied": True}
    assert "fitting on the 10 that contrast" in filter_line(rec)
    # too few contrasting pairs: every pair is kept, and the line says why
    kept, rec = keep_contrasting(pairs[8:], measure)
    assert len(kept) == 5 and not rec["applied"] and "only 2 pairs show the contrast" in filter_line(rec)
    # a judge-read axis, or one answer read under two personas: nothing to filter with
    kept, rec = keep_contrasting(pairs, measure_for("judge", "sarcastic"))
    assert kept == pairs and "no objective checker" in filter_line(rec)
    same = [_pair(i, short, short) for i in range(10)]
    assert keep_contrasting(same, measure)[0] == same


def test_the_screen_warns_of_a_low_ceiling_unless_the_pairs_come_from_texts() -> None:
    """A topic the model will not bring up when asked is what the texts recipe is for: its screen
    says where the pairs come from instead of "a vector is unlikely to do better"."""
    from alignez_local.align.strength_by_behaviour import screen_line
    from alignez_local.measures.scoring import ScoredAnswers

    none = ScoredAnswers(*(np.zeros(8) for _ in range(4)), answers=["a"] * 8)
    line, low = screen_line("m", "answers that mention ocean", none, none)
    assert low and "unlikely to do better" in line
    line, low = screen_line("m", "answers that mention ocean", none, none, from_texts=True)
    assert low and "texts the model writes" in line and "unlikely" not in line
