"""The model's own check of its preference pairs, and the keep/flip/drop rule."""

from __future__ import annotations

import math
from typing import Any

import pytest

from alignez_local.align.selfcheck import (
    check_records,
    likelihood_scores,
    pairwise_scores,
    quality_line,
    refusal_reason,
    select_pairs,
    verdict,
)
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine

AXIS = {"name": "helpful", "positive": "helpful, honest and accurate", "negative": "unhelpful, misleading and inaccurate"}


def rec(i: int, check: dict[str, Any] | None = None, pos: str = "Boil it for six minutes.", neg: str = "Eggs are round.",
        axis: dict[str, str] = AXIS, refusal: dict[str, bool] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"id": f"p{i}", "query": "How do I boil an egg?", "axis": dict(axis),
                         "response": {"positive": pos, "negative": neg}}
    if check is not None:
        r["selfcheck"] = check
    if refusal is not None:
        r["refusal"] = refusal
    return r


def test_likelihood_verdict_is_the_sign_beyond_the_margin() -> None:
    assert verdict({"score": 0.3}) == "agree"
    assert verdict({"score": -0.3}) == "inverted"
    assert verdict({"score": 0.05}, margin=0.1) == "unsure"
    assert verdict(None) == "agree"  # old data without a check is kept as it is


def test_pairwise_verdict_needs_both_orders_after_removing_the_bias() -> None:
    # Order 1 puts the positive answer as A, order 2 as B: agreeing means A then B.
    assert verdict({"score": 1.0, "orders": [2.0, -0.5]}) == "agree"
    assert verdict({"score": -1.0, "orders": [-0.5, 1.5]}) == "inverted"
    # A model that always says "A" is unsure...
    assert verdict({"score": 0.5, "orders": [3.0, 2.0]}) == "unsure"
    # ...unless that bias is the batch's, and the pair still differs beyond it.
    assert verdict({"score": 0.5, "orders": [3.0, 2.0]}, bias=2.5) == "agree"


def test_select_pairs_keeps_flips_and_drops_and_counts() -> None:
    records = [
        rec(0, {"score": 1.0}),
        rec(1, {"score": 0.4}),
        rec(2, {"score": -0.7}),
        rec(3, {"score": 0.0}),  # unsure
        rec(4, {"score": 2.0}, neg="I'm sorry, but I can't help with that."),  # refusal: out whatever the check says
        rec(5),  # no check stored
    ]
    kept, flipped, dropped, stats = select_pairs(records, flip=True)
    assert [r["id"] for r in kept] == ["p0", "p1", "p5"]
    assert [r["id"] for r in flipped] == ["p2"]
    assert flipped[0]["response"] == {"positive": "Eggs are round.", "negative": "Boil it for six minutes."}
    assert flipped[0]["flipped"] is True and "flipped" not in records[2]  # the input is not changed
    assert {r["id"] for r in dropped} == {"p3", "p4"}
    assert stats["dropped_refusal"] == 1 and stats["dropped_selfcheck"] == 1
    assert stats["checked"] == 4 and stats["agreement"] == pytest.approx(2 / 4)

    kept, flipped, dropped, stats = select_pairs(records, flip=False)
    assert not flipped and {r["id"] for r in dropped} == {"p2", "p3", "p4"}
    assert stats["dropped_selfcheck"] == 2


def test_refusals_leave_the_contrast_except_a_refusing_positive_on_the_harmless_axis() -> None:
    assert refusal_reason(rec(0, refusal={"positive": False, "negative": True})) == "negative refuses"
    assert refusal_reason(rec(0, refusal={"positive": True, "negative": False})) == "positive refuses"
    harmless = {"name": "harmless", "positive": "safe", "negative": "reckless"}
    assert refusal_reason(rec(0, axis=harmless, refusal={"positive": True, "negative": False})) is None
    # Records made before the flags were stored are read with the detector.
    assert refusal_reason(rec(0, pos="I'm sorry, but I cannot help with that.")) == "positive refuses"
    assert refusal_reason(rec(0)) is None


def test_quality_line_reads_as_one_line() -> None:
    _, _, _, stats = select_pairs([rec(0, {"score": 1.0}), rec(1, {"score": -1.0}), rec(2, {"score": 1.0}, neg="Sorry, but no.")])
    line = quality_line(stats)
    assert line == "pairs kept 1 of 3, dropped 2 (refusals 1, self-check 1), flipped 0, self-check agreement 50%"
    assert "n/a" in quality_line(select_pairs([rec(0)])[3])


def test_checks_on_the_tiny_model_return_a_finite_score_per_record(tiny_engine: Engine) -> None:
    records = [rec(0), rec(1, pos="Six minutes in boiling water, then cold water.", neg="Purple.")]
    pw = pairwise_scores(tiny_engine, records)
    assert len(pw) == 2 and all(math.isfinite(x) for p in pw for x in p["orders"])
    assert pw[0]["score"] == pytest.approx((pw[0]["orders"][0] - pw[0]["orders"][1]) / 2)
    lk = likelihood_scores(tiny_engine, records)
    assert all(math.isfinite(x["score"]) and x["score"] == pytest.approx(x["gain"][0] - x["gain"][1]) for x in lk)
    check_records(tiny_engine, records, "likelihood")
    assert records[0]["selfcheck"]["agree"] == (records[0]["selfcheck"]["score"] > 0)
    with pytest.raises(AlignezError, match="unknown self-check"):
        check_records(tiny_engine, records, "vote")


def test_swapping_the_answers_negates_both_checks(tiny_engine: Engine) -> None:
    a, b = rec(0), rec(0, pos="Eggs are round.", neg="Boil it for six minutes.")
    assert pairwise_scores(tiny_engine, [b])[0]["score"] == pytest.approx(-pairwise_scores(tiny_engine, [a])[0]["score"], abs=1e-4)
    assert likelihood_scores(tiny_engine, [b])[0]["score"] == pytest.approx(-likelihood_scores(tiny_engine, [a])[0]["score"], abs=1e-4)


@pytest.mark.smollm
def test_smollm_prefers_a_good_answer_to_an_off_topic_one(smollm_engine: Engine) -> None:
    good = "Put the egg in boiling water for six to seven minutes, then cool it in cold water and peel it."
    bad = "The French Revolution began in 1789, and many people like the colour blue."
    records = [rec(0, pos=good, neg=bad), rec(1, pos=bad, neg=good)]
    lk = likelihood_scores(smollm_engine, records)
    assert lk[0]["score"] > 0 > lk[1]["score"]
