"""Issue 31's second rule: a strength whose answers stop addressing the request (a refusal, the
question said back, or, where a judge reads relevance, an answer it reads as not relevant) more
often than prompting's does not win the calibration; the share, the flag and the search on the
tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from alignez_local.align.behaviour_bench import BehaviourBench, split_heldout, unsteered_nll
from alignez_local.align.directions import random_like
from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.align.strength_by_behaviour import (
    UNANSWERED_MARGIN, BehaviourTrial, calibrate_behaviour, choose_way, chosen, trial_status, way_lead, way_rank,
)
from alignez_local.formats.control_vector import ANSWER_ONLY, EVERY_TOKEN, ControlVector
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.measures.behaviour import MEASURES, MarkerMeasure
from alignez_local.measures.scoring import ScoredAnswers, Scorer

QS = ["Why do we have leap years?", "How do I boil an egg?", "Why is the sky blue?", "Name a fruit."]
ANS = ["We have leap years.", "I'm sorry, but I can't assist with that.",
       "Sunlight scatters off air molecules, and blue scatters most.", "The sea."]


class Judge:
    """Stands in for the judge model's reading: the last answer ("The sea.") is not relevant."""

    def yes_probability(self, instruction, pairs):
        return np.array([0.2 if "sea" in a else 0.9 for _, a in pairs])


def _scorer(measure=MEASURES["capitals"], judge=None) -> Scorer:
    scorer = Scorer(measure, lambda qs, ans: np.full(len(ans), 0.4), judge)
    scorer.reference_nll, scorer.reference_pmi = 0.4, 0.0  # PMI relevance reads 1 below MIN_REFERENCE_PMI
    return scorer


def test_the_unanswered_share_counts_refusals_restatements_and_the_judges_no() -> None:
    plain = _scorer().score(QS, ANS)
    assert plain.unanswered.tolist() == [True, True, False, False]  # no judge: "The sea." counts as an answer
    assert plain.mean("unanswered_share") == 0.5
    judged = _scorer(judge=Judge()).score(QS, ANS)
    assert judged.unanswered.tolist() == [True, True, False, True]
    s = judged.summary()
    assert s["unanswered_share"]["mean"] == 0.75 and len(s["unanswered_share"]["ci95"]) == 2
    assert s["unanswered_share"]["mean"] == 1 - s["relevant_share"]["mean"]
    # two halves of one condition keep each answer's reading, in order
    both = plain.joined(_scorer().score(QS[:1], ["The calendar drifts a quarter day a year."]))
    assert both.unanswered.tolist() == [True, True, False, False, False] and both.mean("unanswered_share") == 0.4
    # a refusal measure: refusing is the behaviour, not a failure to answer
    assert _scorer(MEASURES["refusal"]).score(QS, ANS).mean("unanswered_share") == 0.0
    # scores made without the questions (no reading) count nothing
    bare = ScoredAnswers(*(np.zeros(4) for _ in range(4)), answers=ANS)
    assert bare.mean("unanswered_share") == 0.0 and bare.joined(plain).unanswered.tolist() == [False] * 4 + [True, True, False, False]


def _trial(strength: float, combined: float, unanswered: bool = False) -> BehaviourTrial:
    return BehaviourTrial(strength, 1.0, 0.9, 0.9, combined, False, unanswered_share=0.25 if unanswered else 0.0,
                          unanswered_too_often=unanswered)


def test_a_trial_that_answers_the_request_less_often_is_not_chosen_though_its_score_is_best() -> None:
    trials = [_trial(0.125, 0.54, unanswered=True), _trial(0.25, 0.52), _trial(0.5, 0.3)]
    assert chosen(trials).strength == 0.25 and not trials[0].eligible
    assert trial_status("vector", trials[0]).endswith("(answers the request less often than prompting)")
    assert "prompting" not in trial_status("vector", trials[1])
    record = dataclasses.asdict(trials[0])
    assert record["unanswered_share"] == 0.25 and record["unanswered_too_often"] is True
    # a record written before the rule (no such keys) still reads back, as eligible as it was
    old = {k: v for k, v in record.items() if not k.startswith("unanswered")}
    assert BehaviourTrial(**old).eligible


def test_a_way_without_an_eligible_trial_loses_to_one_with_and_else_the_better_score_wins() -> None:
    """calibrate_ways: when every trial of both ways is flagged, the better score wins, not the way
    listed first (brief, both placements flagged: every-token x0.5, 0.47, won over answer-only x0.7071, 0.59)."""
    every, answer_only = [_trial(0.5, 0.47, unanswered=True)], [_trial(0.7071, 0.59, unanswered=True)]
    assert way_rank(answer_only) > way_rank(every)
    assert way_rank([_trial(0.5, 0.2)]) > way_rank(answer_only)  # eligible first, whatever its score


def _each(strength: float, scores: list[float], unanswered: bool = False) -> BehaviourTrial:
    return dataclasses.replace(_trial(strength, float(np.mean(scores)), unanswered), combined_each=tuple(scores))


def test_another_way_must_lead_the_default_by_more_than_one_standard_error() -> None:
    """choose_way: a lead within the noise of 8 answers keeps the default (the way llama.cpp applies);
    a lead past it wins; eligibility still comes first; the per-answer scores are never written."""
    default = [0.6, 0.5, 0.7, 0.4, 0.6, 0.5, 0.7, 0.4]
    noisy = [0.9, 0.1, 0.9, 0.2, 0.9, 0.3, 0.9, 0.4]  # mean 0.575 vs 0.55: a lead of 0.025, SE about 0.09
    lead, se = way_lead(_each(1, noisy), _each(1, default))
    assert lead == pytest.approx(0.025) and se > lead
    win, why = choose_way({EVERY_TOKEN: [_each(0.5, default)], ANSWER_ONLY: [_each(1, noisy)]})
    assert win == EVERY_TOKEN and why.startswith(f"{EVERY_TOKEN}: {ANSWER_ONLY} led by 0.02")
    clear = [c + 0.3 for c in default]  # every answer better by 0.3: the paired SE is 0
    assert choose_way({EVERY_TOKEN: [_each(0.5, default)], ANSWER_ONLY: [_each(1, clear)]}) == (ANSWER_ONLY, "")
    # an eligible way beats a flagged default whatever the noise; a flagged one never beats an eligible default
    assert choose_way({EVERY_TOKEN: [_each(0.5, clear, unanswered=True)], ANSWER_ONLY: [_each(1, noisy)]})[0] == ANSWER_ONLY
    assert choose_way({EVERY_TOKEN: [_each(0.5, default)], ANSWER_ONLY: [_each(1, clear, unanswered=True)]})[0] == EVERY_TOKEN
    # unequal answer counts (one trial stopped at half the queries): the two means' independent SE
    assert way_lead(_each(1, noisy[:4]), _each(1, default))[1] > 0
    assert "combined_each" not in _each(1, noisy).record()


def test_a_strength_that_does_nothing_is_no_choice() -> None:
    """A trial with combined 0 breaks no rule, but it is not eligible: a way (or strength) that changed
    nothing must not win over one that shows the behaviour with a flag (brief, 2026-12-07: the
    pool:last variant's x0.0625, combined 0.00, won over answer-only x0.7071, 0.59, flagged)."""
    nothing = _trial(0.0625, 0.0)
    assert not nothing.eligible
    assert way_rank([_trial(0.7071, 0.59, unanswered=True)]) > way_rank([nothing])
    assert chosen([nothing, _trial(0.7071, 0.59, unanswered=True)]).strength == 0.7071
    assert chosen([nothing, _trial(0.125, 0.0, unanswered=True)]).strength == 0.0625  # nothing shows: the weaker


# --- the search on the tiny model ---------------------------------------------------------------

QUERIES = ["hello there", "tell me a story", "what is two plus two", "name a color", "a b c", "you and the sea",
           "is it in", "of the day", "red", "blue", "green", "to be", "in the end", "go", "stop", "why"]
GRID = (4, 16, 32, 128)


class TheJudge:
    """Stands in for the judge model: an answer that is mostly " the" is no answer (P(yes) 0.3)."""

    def yes_probability(self, instruction, pairs):
        return np.array([0.3 if a.split().count("the") >= 3 else 0.9 for _, a in pairs])


def _planted(engine: Engine, path: Path) -> ControlVector:
    """The last layer, along the output embedding of " the": adding it makes the model say " the"."""
    weights = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "output.weight").data
    token = next(t for t in range(engine.n_vocab) if engine.detokenize([t]) == " the")
    w = np.asarray(weights[token], dtype=np.float32)
    return ControlVector({engine.n_layer - 1: w / np.linalg.norm(w)}, model_hint=engine.arch)


def _calibrate(engine: Engine, cv: ControlVector, unanswered_margin: float):
    measure = MarkerMeasure("planted", "answers saying 'the' twice", markers=("the",), min_hits=2)
    choose, report = split_heldout(QUERIES, 8, 8)
    bench = BehaviourBench(engine, Scorer(measure, unsteered_nll(engine), TheJudge()), "Say the word the.", choose,
                           report, sampling=Sampling(temperature=0.0, max_tokens=16))
    noise = ControlVector(random_like(dict(cv.directions), seed=1), model_hint=engine.arch)
    return calibrate_behaviour(bench, lambda s: Steering(vectors=[VectorSlot("v", cv, s)]),
                               lambda s: Steering(vectors=[VectorSlot("r", noise, s)]), strengths=GRID,
                               loop_margin=1.0, unanswered_margin=unanswered_margin)


def test_the_search_leaves_out_a_strength_whose_answers_stop_addressing_the_request(
        tiny_engine: Engine, tiny_model_path: Path) -> None:
    """Where the planted " the" takes over, the judge stand-in reads the answers as no answers: with
    the default margin that strength cannot win, although its combined score is the best."""
    cv = _planted(tiny_engine, tiny_model_path)
    free, ruled = _calibrate(tiny_engine, cv, 1.0), _calibrate(tiny_engine, cv, UNANSWERED_MARGIN)
    flagged = [t for t in ruled.trials if t.unanswered_too_often and not t.broken]
    assert flagged, "no strength left the request unanswered: the rule was not exercised"
    assert ruled.strength not in {t.strength for t in flagged}
    assert free.strength in {t.strength for t in flagged}  # the best combined score was a flagged one
    assert next(t for t in ruled.trials if t.strength == ruled.strength).eligible
    assert not any(t.unanswered_too_often for t in free.trials)


def test_when_every_strength_is_flagged_the_verdict_says_so(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """The best flagged strength is still chosen (there is nothing better to write), but the verdict,
    which steer prints and the file keeps, does not read as a clean result."""
    cv = _planted(tiny_engine, tiny_model_path)
    every = _calibrate(tiny_engine, cv, -1.0)  # a ceiling below zero flags every trial
    assert all(t.unanswered_too_often for t in every.trials if not t.broken)
    assert every.verdict.endswith("; every unbroken strength tried answers the request less often than prompting "
                                  "on the choose queries")
    assert "every unbroken strength" not in _calibrate(tiny_engine, cv, UNANSWERED_MARGIN).verdict
