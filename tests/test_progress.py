"""The progress line and its ETA, replayed on a recorded trace (no timing in the tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignez_local.progress import Progress, estimate_remaining, token_work

TRACES = Path(__file__).resolve().parent / "data"  # traces recorded by scripts/records/gen_recipe.py


def recorded_traces() -> list[Path]:
    return sorted(TRACES.glob("progress-trace-*.json"))


def test_estimate_is_unknown_at_the_start_and_zero_at_the_end() -> None:
    assert math.isnan(estimate_remaining(0.0, 0, 10, 0.0))
    assert math.isnan(estimate_remaining(5.0, 0, 10, 0.0))
    assert estimate_remaining(50.0, 10, 10, 900.0) == 0.0


def test_estimate_uses_the_cost_of_finished_items_at_the_rate_since_the_first_batch() -> None:
    # 2 of 10 items took 200 tokens in 20 s: 8 more items at 100 tokens, 10 tokens/s -> 80 s.
    assert estimate_remaining(20.0, 2, 10, 200.0) == pytest.approx(80.0)
    # Items of different size: 2 items took 600 tokens, so 8 more are expected to take 2400.
    assert estimate_remaining(20.0, 2, 10, 600.0) == pytest.approx(80.0)
    # Measured from the first batch (done at 12 s, 100 tokens): 100 tokens in 8 s, 800 left -> 64 s.
    assert estimate_remaining(20.0, 2, 10, 200.0, anchor=(12.0, 100.0)) == pytest.approx(64.0)
    assert math.isnan(estimate_remaining(12.0, 1, 10, 100.0, anchor=(12.0, 100.0)))


def test_token_work_weighs_prompt_tokens_below_generated_ones() -> None:
    assert token_work(0, 10) == 10
    assert 0 < token_work(100, 0) < 100


@pytest.mark.parametrize("path", recorded_traces(), ids=lambda p: p.stem)
def test_eta_is_within_30_percent_once_a_tenth_is_done(path: Path) -> None:
    trace = json.loads(path.read_text())
    points = [p for p in trace["points"] if p[1] > 0]
    total, end = trace["items_total"], points[-1][0]
    assert points[-1][1] == total, "the recorded run finished"
    anchor = (points[0][0], points[0][2])  # what Progress keeps: the first finished batch
    checked = 0
    for t, items, work, budget in points:
        # From 10% done until the last item: with one item left, the "remaining time" is one item's
        # own noise (on the recorded trace, 1.5 s), which no rate-based estimate can be held to 30% of.
        if items < 0.1 * total or items >= total - 1:
            continue
        eta = estimate_remaining(t, items, total, work, anchor)
        real = end - t
        assert abs(eta - real) <= 0.3 * real, (path.name, t, items, eta, real)
        checked += 1
    assert checked >= 2


def test_a_trace_was_recorded() -> None:
    assert recorded_traces(), "run scripts/records/gen_recipe.py and copy its trace into tests/data/"


def test_progress_keeps_its_callback_interface(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(4, "capture")
    bar(2, 4)  # the on_progress(done, total) shape used by capture and eval
    bar.update()
    bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "capture: 4/4 (100%)" in err and "tokens" not in err
    assert [p[1] for p in bar.trace.points] == [0, 2, 3, 4]


def test_progress_counts_tokens_when_given(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(2, "generate helpful", budget=500.0)
    bar.update(1, work=120.0, budget_used=250.0)
    bar.update(1, work=130.0, budget_used=250.0)
    err = capsys.readouterr().err
    assert "generate helpful: 2/2 (100%, 250/250 tokens)" in err
    assert bar.budget == pytest.approx(0.0)
    quiet = Progress(3, "x", quiet=True)
    quiet.update(3)
    assert capsys.readouterr().err == "" and quiet.done == 3
