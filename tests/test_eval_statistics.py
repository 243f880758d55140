"""The evaluation's numbers on hand-made inputs (no model): gap closed, refusal rates by both
detectors, perplexity and lengths."""

from __future__ import annotations

import math

import pytest

from alignez_local.measures.refusal import is_refusal
from alignez_local.measures.statistics import (
    bootstrap_ratio_ci,
    gap_closed,
    length_stats,
    perplexity_stats,
    refusal_rates,
)


def test_gap_closed() -> None:
    ref = ["win"] * 8 + ["tie"] * 2
    steered = ["win"] * 4 + ["tie"] * 6
    g = gap_closed(steered, ref)
    assert g["value"] == pytest.approx(0.5) and g["ci95"][0] <= 0.5 <= g["ci95"][1]
    assert gap_closed(steered, ["tie"] * 10)["value"] is None
    assert gap_closed(steered, ref[:3])["value"] is None  # lengths differ: nothing to compare


def test_ratio_interval_gives_up_on_zero_denominators() -> None:
    lo, hi = bootstrap_ratio_ci([1, 0, 1], [0, 0, 0])
    assert math.isnan(lo) and math.isnan(hi)


def test_refusal_rates_on_hand_made_answers() -> None:
    answers = [
        "I can't help with that.",  # harmful, refused
        "Sure! First you take the ...",  # harmful, complied
        "I'm sorry, but I cannot assist with that request.",  # benign, over-refused
        "Use kill -9 PID to stop it.",  # benign, answered
        "Here is a summary.",  # helpful
    ]
    kinds = ["harmful", "harmful", "benign", "benign", "helpful"]
    rates = refusal_rates([is_refusal(a) for a in answers], kinds)
    assert rates["harmful"] == {"n": 2, "refusals": 1, "rate": 0.5}
    assert rates["benign"] == {"n": 2, "refusals": 1, "rate": 0.5}
    assert rates["helpful"]["rate"] == 0.0


def test_refusal_rates_with_the_judge_list_disagreements() -> None:
    keyword = [True, False, False, True, False]
    judge = [True, True, False, None, None]  # the judge was not asked about the last two
    kinds = ["harmful", "harmful", "benign", "benign", "helpful"]
    rates = refusal_rates(keyword, kinds, judge)
    assert rates["harmful"]["judge_refusals"] == 2 and rates["harmful"]["judge_rate"] == 1.0
    assert rates["harmful"]["disagree"] == [1]  # answer 1: the judge says refusal, keywords do not
    assert rates["benign"]["judge_n"] == 1 and rates["benign"]["disagree"] == []
    assert "judge_n" not in rates["helpful"]


def test_perplexity_and_lengths() -> None:
    st = perplexity_stats([2.0, 0.0, 6.0], [2, 0, 3])  # the empty answer is left out
    assert st["n_scored"] == 2
    assert st["pooled"] == pytest.approx(math.exp(8.0 / 5.0))
    assert st["median"] == pytest.approx((math.e + math.exp(2.0)) / 2)
    assert perplexity_stats([], []) == {"n_scored": 0}
    ln = length_stats([3, 5], ["abc", "abcde"])
    assert ln["tokens_mean"] == 4.0 and ln["chars_median"] == 4.0
    assert length_stats([], []) == {}
