"""The behaviour and relevance readings on hand-made examples (data/judge_examples.jsonl), with the
bundled models install.sh installs: how steer's default relevance (the model's own PMI reading) and
the judge's behaviour measure of custom axes do, as docs/results.md §10 reports them."""

from __future__ import annotations

import pytest

from alignez_local.align.behaviour_bench import unsteered_nll
from alignez_local.errors import AlignezError
from alignez_local.measures.behaviour import MEASURES
from alignez_local.measures.scoring import Scorer
from alignez_local.evaluation.judge import Judge
from alignez_local.evaluation.judge_check import figures, judge_probabilities, load_examples, pmi_probabilities
from alignez_local.models import JUDGE_MODEL
from alignez_local.settings import RuntimeSettings, open_engine


def _open(name: str):
    try:
        return open_engine(name, RuntimeSettings(n_ctx=4096, parallel=4))
    except AlignezError as err:  # install.sh installs both; a bare pip install may not
        pytest.skip(str(err))


def test_examples_are_groups_with_answers_meant_to_pass_and_fail() -> None:
    for check in ("behaviour", "relevance"):
        rows = load_examples(check)
        assert rows and {r["check"] for r in rows} == {check}
        import numpy as np
        assert figures(rows, np.array([1.0 if r["expected"] else 0.0 for r in rows]), check)[2:] == (len(_pairs(rows)),) * 2


def _pairs(rows):
    return [(a, b) for a in rows for b in rows if a["question"] == b["question"] and a.get("persona") == b.get("persona")
            and a["expected"] and not b["expected"]]


@pytest.mark.slow
def test_pmi_relevance_orders_the_hand_made_answers() -> None:
    engine = _open("qwen2.5-coder-0.5b-instruct")
    try:
        rows = load_examples("relevance")
        p = pmi_probabilities(Scorer(MEASURES["capitals"], unsteered_nll(engine)), rows)
    finally:
        engine.close()
    right, n, ordered, pairs = figures(rows, p, "relevance")
    # measured 10/12 and 8/8 (docs/results.md §10): off-topic answers, gibberish and a refusal gain
    # less from their question than on-topic answers do, in English, French or pirate speech
    assert ordered >= pairs - 1 and right >= n - 3


@pytest.mark.slow
def test_the_judges_behaviour_measure_on_hand_made_examples() -> None:
    engine = _open(JUDGE_MODEL)
    try:
        rows = load_examples()
        p = judge_probabilities(Judge(engine), rows)
    finally:
        engine.close()
    b_right, b_n, b_ordered, b_pairs = figures(rows, p, "behaviour")
    r_right, r_n, r_ordered, r_pairs = figures(rows, p, "relevance")
    # measured with Qwen2.5-Coder-1.5B, each persona read against its negative pole (steer's reading):
    # behaviour 13/16 right and 8/8 ordered (the positive question alone: 12/16, 8/8), relevance 11/12 and 8/8
    assert b_ordered >= b_pairs - 1 and b_right >= b_n - 5
    assert r_ordered >= r_pairs - 1 and r_right >= r_n - 2
