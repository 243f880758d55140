"""``alignez eval`` and the local judge, on the tiny random model as answerer AND judge (fast; what the
judge says means nothing here, only the mechanics are checked): report structure, both pairwise
orders, bootstrap intervals, the tie rule, refusal rates, the sweep, Ctrl-C, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignez_local.settings import RuntimeSettings
from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.evaluation.answers import scale_steering
from alignez_local.evaluation.config import EvalConfig
from alignez_local.specs import parse_strengths
from alignez_local.evaluation.evaluate import EvalInterrupted, run_eval
from alignez_local.measures.statistics import bootstrap_ci, net_win_rate, outcome_stats
from alignez_local.evaluation.judge import Judge
from alignez_local.measures.verdicts import outcome_from_margin, pairwise_outcome, verdicts_from_scores
from alignez_local.align.steering import Steering

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "eval"]
# One thread: on a busy shared machine llama.cpp's spinning worker threads make tiny decodes crawl.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
SAMPLING = Sampling(max_tokens=6)


@pytest.fixture(scope="module")
def vector_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-direction control vector with a large norm: it surely changes the tiny model's answers."""
    rng = np.random.default_rng(1)
    dirs = {layer: (rng.standard_normal(64) * 30).astype(np.float32) for layer in (1, 2, 3)}
    return write_control_vector(tmp_path_factory.mktemp("vec") / "v.gguf", ControlVector(dirs, model_hint="llama"))


def _cfg(model: Path, vector: Path, **kw: Any) -> EvalConfig:
    base = {"model": str(model), "vectors": (str(vector),), "judge": str(model), "limit": 6, "sampling": SAMPLING,
                "runtime": RuntimeSettings(threads=1, n_ctx=1024, parallel=4), "judge_ctx": 2048, "judge_parallel": 4, "top_n": 2}
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def score_run(tiny_model_path: Path, vector_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval-score")
    report = run_eval(_cfg(tiny_model_path, vector_path, strengths=(0.0, 1.0), reference=str(tiny_model_path)),
                      out, log=lambda _m: None)
    return report, out


@pytest.fixture(scope="module")
def pairwise_run(tiny_model_path: Path, vector_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval-pairwise")
    report = run_eval(_cfg(tiny_model_path, vector_path, mode="pairwise", limit=4), out, log=lambda _m: None)
    return report, out


# --- the report -----------------------------------------------------------------------------------


def test_report_structure(score_run: tuple[dict, Path]) -> None:
    _report, out = score_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["complete"] is True and on_disk["format"] == "alignez-eval/1"
    for key in ("settings", "models", "steering", "judge", "unsteered", "results", "reference", "timing", "prompts"):
        assert key in on_disk, key
    for role in ("answer", "judge", "reference"):
        assert len(on_disk["models"][role]["sha256"]) == 64
    assert on_disk["steering"]["files"][0]["sha256"]
    assert on_disk["settings"]["sampling"]["seed"] == 0 and on_disk["settings"]["mode"] == "score"
    assert len(on_disk["prompts"]) == 6
    for p in on_disk["prompts"]:
        assert p["kind"] in ("helpful", "harmful", "benign")
        assert isinstance(p["unsteered"]["answer"], str) and "score" in p["unsteered"]
        assert [s["strength"] for s in p["steered"]] == [0.0, 1.0]
        for s in p["steered"] + [p["reference"]]:
            assert s["verdict"]["outcome"] in ("win", "tie", "loss")
            assert {"score_candidate", "score_baseline"} <= set(s["verdict"])
    row = on_disk["results"][1]
    assert row["judge"]["wins"] + row["judge"]["ties"] + row["judge"]["losses"] == row["judge"]["n"] == 6
    assert set(row["lengths"]) == {"tokens_mean", "tokens_median", "chars_mean", "chars_median"}
    assert set(row["refusal"]) <= {"helpful", "harmful", "benign"}
    assert row["perplexity"]["n_scored"] >= 1
    summary = (out / "summary.md").read_text()
    assert "95% interval" in summary and "What this judge can and cannot tell" in summary
    assert "| x0 |" in summary and "| x1 |" in summary
    assert "sweep.png skipped" in summary or "sweep.png written" in summary


def test_sweep_one_row_per_strength_and_zero_is_unsteered(score_run: tuple[dict, Path]) -> None:
    report, _ = score_run
    assert [r["strength"] for r in report["results"]] == [0.0, 1.0]
    for p in report["prompts"]:
        zero = p["steered"][0]
        assert zero["answer"] == p["unsteered"]["answer"]  # exactly: same seed, settings and batch
        assert zero["n_tokens"] == p["unsteered"]["n_tokens"]
        assert zero["verdict"]["outcome"] == "tie"
    assert report["results"][0]["identical_to_unsteered"] == 6
    # The large random vector must change something, or the test proves nothing.
    assert report["results"][1]["identical_to_unsteered"] < 6
    # Perplexity is measured per strength under the unsteered model.
    assert report["results"][0]["perplexity"]["pooled"] == pytest.approx(report["unsteered"]["perplexity"]["pooled"])


def test_refusals_by_keywords_and_judge(score_run: tuple[dict, Path]) -> None:
    report, out = score_run
    asked = 0
    for p in report["prompts"]:
        for ans in [p["unsteered"], p["reference"], *p["steered"]]:
            assert isinstance(ans["refusal"], bool)
            assert ("judge_refusal" in ans) == (p["kind"] in ("harmful", "benign"))
            asked += "judge_refusal" in ans
    assert asked > 0
    for kind, r in report["unsteered"]["refusal"].items():
        if kind in ("harmful", "benign"):
            assert r["judge_n"] == r["n"] and 0 <= r["judge_rate"] <= 1 and isinstance(r["disagree"], list)
    assert "## Refusals" in (out / "summary.md").read_text()


def test_each_distinct_answer_is_judged_once(score_run: tuple[dict, Path]) -> None:
    report, _ = score_run
    answers = [(p["prompt"], a["answer"]) for p in report["prompts"] for a in [p["unsteered"], p["reference"], *p["steered"]]]
    # x0 and the reference (the same model) repeat the unsteered answers: each text is scored once.
    assert report["judge"]["prompts_decoded"] == len(set(answers)) < len(answers)
    risky = {(p["prompt"], a["answer"]) for p in report["prompts"] if p["kind"] in ("harmful", "benign")
             for a in [p["unsteered"], p["reference"], *p["steered"]]}
    assert report["judge"]["refusal_prompts_decoded"] == len(risky)


def test_reference_gap_reported(score_run: tuple[dict, Path]) -> None:
    report, _ = score_run
    # The reference is the unsteered model itself: its net win is 0, so the gap is undefined and said so.
    assert report["reference"]["judge"]["net_win_rate"] == 0.0
    for row in report["results"]:
        assert row["gap_closed"]["value"] is None and "about zero" in row["gap_closed"]["note"]


def test_intervals_contain_point_estimate(score_run: tuple[dict, Path]) -> None:
    report, _ = score_run
    for row in report["results"]:
        j = row["judge"]
        assert j["net_win_ci95"][0] - 1e-12 <= j["net_win_rate"] <= j["net_win_ci95"][1] + 1e-12
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30, 200):
        for _ in range(5):
            outcomes = list(rng.choice(["win", "tie", "loss"], size=n, p=[0.5, 0.3, 0.2]))
            st = outcome_stats(outcomes, seed=3)
            assert st["net_win_ci95"][0] <= st["net_win_rate"] <= st["net_win_ci95"][1]
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert bootstrap_ci([1, -1, 0, 1], seed=5) == bootstrap_ci([1, -1, 0, 1], seed=5)  # seeded


# --- the judge ------------------------------------------------------------------------------------


def test_tie_rule() -> None:
    assert outcome_from_margin(0.49, 0.5) == "tie"
    assert outcome_from_margin(-0.49, 0.5) == "tie"
    assert outcome_from_margin(0.5, 0.5) == "win"
    assert outcome_from_margin(-3.0, 0.5) == "loss"
    assert [v.outcome for v in verdicts_from_scores([2.0, 0.3, -1.0], [1.0, 0.0, 1.0], 0.5)] == ["win", "tie", "loss"]
    # Pairwise: both orders must agree AND the averaged preference must reach the margin.
    assert pairwise_outcome(2.0, 1.0, 0.5) == ("win", 1.5)
    assert pairwise_outcome(-2.0, -1.0, 0.5) == ("loss", -1.5)
    assert pairwise_outcome(3.0, -0.1, 0.5)[0] == "tie"  # disagree (position bias), despite a big mean
    assert pairwise_outcome(0.4, 0.4, 0.5)[0] == "tie"  # agree but too close
    assert net_win_rate(["win", "win", "tie", "loss"]) == 0.25


def test_pairwise_judges_both_orders(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    judge = Judge(tiny_engine, mode="pairwise")
    seen: list[tuple[str, str, str]] = []
    real = judge.ab_margins

    def spy(triples, on_progress=None):  # type: ignore[no-untyped-def]
        seen.extend(triples)
        return real(triples, on_progress)

    monkeypatch.setattr(judge, "ab_margins", spy)
    qs = ["What is 2+2?", "Name a colour.", "Say hi."]
    cands, bases = ["four", "red", "same"], ["five", "blue", "same"]
    verdicts = judge.compare(qs, cands, bases)
    for q, c, b in zip(qs[:2], cands[:2], bases[:2]):
        assert (q, c, b) in seen and (q, b, c) in seen
    assert len(seen) == 4 and judge.calls == 4  # identical answers are a tie without asking
    assert verdicts[2].outcome == "tie" and verdicts[2].details["identical"]
    for v in verdicts[:2]:
        assert {"pref_candidate_as_a", "pref_candidate_as_b"} <= set(v.details)
        assert v.margin == pytest.approx((v.details["pref_candidate_as_a"] + v.details["pref_candidate_as_b"]) / 2, abs=1e-3)


def test_pairwise_run_records_both_orders(pairwise_run: tuple[dict, Path]) -> None:
    report, out = pairwise_run
    assert (out / "report.json").is_file() and (out / "summary.md").is_file()
    judged = 0
    for p in report["prompts"]:
        v = p["steered"][0]["verdict"]
        if p["steered"][0]["answer"] != p["unsteered"]["answer"]:
            assert "pref_candidate_as_a" in v and "pref_candidate_as_b" in v
            judged += 1
    assert judged >= 1
    assert report["judge"]["prompts_decoded"] == 2 * judged


def test_score_mode_verdict_tokens(tiny_engine: Engine) -> None:
    judge = Judge(tiny_engine)
    toks = judge.verdict_tokens
    assert not set(toks["Yes"]) & set(toks["No"]) and not set(toks["A"]) & set(toks["B"])
    scores = judge.scores([("q", "an answer"), ("q", "another"), ("q", "an answer")])
    assert scores.shape == (3,) and np.isfinite(scores).all() and scores[0] == scores[2]
    assert judge.calls == 2  # the duplicate pair is judged once
    with pytest.raises(AlignezError):
        Judge(tiny_engine, mode="vibes")


# --- pieces ---------------------------------------------------------------------------------------


def test_scale_steering(tiny_engine: Engine, vector_path: Path) -> None:
    st = Steering.from_specs(tiny_engine, [f"{vector_path}:2"], top_n=2)
    scaled = scale_steering(st, 0.5)
    assert scaled.vectors[0].strength == 1.0 and st.vectors[0].strength == 2.0
    assert not scale_steering(st, 0.0).active


def test_parse_strengths() -> None:
    assert parse_strengths("0, 0.5,1,2,1", "--sweep") == (0.0, 0.5, 1.0, 2.0)
    for bad in ("abc", "", "1,nan", "1e9"):
        with pytest.raises(AlignezError):
            parse_strengths(bad, "--sweep")


def test_ctrl_c_saves_what_was_done(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    def log(msg: str) -> None:
        if msg.startswith("[judge]"):
            raise KeyboardInterrupt

    with pytest.raises(EvalInterrupted) as info:
        run_eval(_cfg(tiny_model_path, vector_path, limit=3), tmp_path, log=log)
    assert "saved" in info.value.message and "\n" not in info.value.message
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False and report["stage_reached"] == "judging"
    assert all("answer" in p["unsteered"] for p in report["prompts"])
    assert "Unfinished" in (summary := (tmp_path / "summary.md").read_text()) and "--resume" in summary


# --- the command ----------------------------------------------------------------------------------


def _cli(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], check=False, capture_output=True, text=True, env=ENV, timeout=timeout)


def test_cli_writes_report(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _cli("-m", tiny_model_path, "--judge", tiny_model_path, "--vector", f"{vector_path}:1", "--limit", 3,
             "--max-tokens", 4, "--threads", 1, "--top-n", 2, "--judge-ctx", 2048, "--sweep", "0,1", "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and len(report["results"]) == 2
    assert (out / "summary.md").read_text().startswith("# alignez eval")
    assert "x1:" in r.stdout and "ETA" in r.stderr


def test_cli_harmbench_plain_text_as_harmful(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    harmbench = REPO.parent / "shared" / "data" / "harmbench_prompts.txt"
    if not harmbench.is_file():
        pytest.skip(f"{harmbench} is not on this machine")
    out = tmp_path / "hb"
    r = _cli("-m", tiny_model_path, "--judge", tiny_model_path, "--vector", vector_path, "--prompts", harmbench,
             "--prompt-kind", "harmful", "--limit", 2, "--max-tokens", 4, "--threads", 1, "--top-n", 2,
             "--judge-ctx", 2048, "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_kinds"] == {"harmful": 2} and report["settings"]["prompt_kind"] == "harmful"
    assert report["unsteered"]["refusal"]["harmful"]["judge_n"] == 2
    assert "unsteered: refusals harmful" in r.stdout and "by the judge" in r.stdout


def test_no_quality_judge_counts_refusals_only(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    # A safety run on many harmful prompts needs refusals, not helpfulness verdicts: the judge only
    # answers "does it refuse?", and a run with no harmful or benign prompt never opens the judge.
    report = run_eval(_cfg(tiny_model_path, vector_path, kinds=("harmful",), quality_judge=False), tmp_path / "a",
                      log=lambda _m: None)
    assert "judge" not in report["results"][0] and report["settings"]["quality_judge"] is False
    assert report["unsteered"]["refusal"]["harmful"]["judge_n"] == 6
    assert "--no-quality-judge: refusals only" in (tmp_path / "a" / "summary.md").read_text()
    report = run_eval(_cfg(tiny_model_path, vector_path, kinds=("helpful",), quality_judge=False,
                           judge=str(tiny_model_path)), tmp_path / "b", log=lambda _m: None)
    assert "judge" not in report.get("models", {}) and "judge" not in report["results"][0]


@pytest.mark.parametrize(
    "args",
    [
        ["--vector", "{v}", "--prompts", "/nonexistent/prompts.jsonl"],
        ["--vector", "{v}", "--sweep", "abc"],
        [],
    ],
    ids=["missing-prompts", "bad-sweep", "no-steering"],
)
def test_cli_bad_input_one_line(args: list[str], tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    r = _cli("-m", tiny_model_path, "--judge", tiny_model_path, "--out", tmp_path / "o",
             *[a.format(v=vector_path) for a in args], timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "o" / "report.json").exists()
