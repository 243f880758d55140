"""``alignez eval`` keeps finished work when it is stopped, and ``--resume`` continues it: checkpoints
after every piece, SIGTERM handled like Ctrl-C, and a resumed run that reuses the finished answer
groups and ends with the same answers as an uninterrupted run. On the tiny random model as answerer,
reference AND judge (as in test_evaluate.py: only the mechanics are checked). Runs are stopped for
real: a log callback raises KeyboardInterrupt, or sends SIGTERM to the process, when a stage starts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from alignez_local.settings import RuntimeSettings
from alignez_local.apps import cli_eval
from alignez_local.apps.cli import main as cli_main
from alignez_local.errors import AlignezError
from alignez_local.evaluation.answers import Answer
from alignez_local.evaluation.config import EvalConfig
from alignez_local.evaluation.evaluate import EvalInterrupted, run_eval
from alignez_local.llama.interrupt import sigterm_as_ctrl_c
from test_interrupt import sigterm_while_logging
from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.llama.engine import Sampling

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "eval"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
STRENGTHS = (1.0, 2.0)


def _write_vector(path: Path, seed: int) -> Path:
    """A random-direction control vector with a large norm: it surely changes the tiny model's answers."""
    rng = np.random.default_rng(seed)
    dirs = {layer: (rng.standard_normal(64) * 30).astype(np.float32) for layer in (1, 2, 3)}
    return write_control_vector(path, ControlVector(dirs, model_hint="llama"))


@pytest.fixture(scope="module")
def vector_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_vector(tmp_path_factory.mktemp("vec") / "v.gguf", seed=1)


def _cfg(model: Path, vector: Path, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = {
        "model": str(model), "vectors": (str(vector),), "judge": str(model), "reference": str(model), "limit": 4,
        "strengths": STRENGTHS, "sampling": Sampling(max_tokens=6), "runtime": RuntimeSettings(threads=1, n_ctx=1024, parallel=4),
        "judge_ctx": 2048, "judge_parallel": 4, "top_n": 2,
    }
    base.update(kw)
    return EvalConfig(**base)


def _stop_when(needle: str, out: Path, stop: Callable[[], None], seen: list[str],
               on_disk: list[dict[str, Any]]) -> Callable[[str], None]:
    """A log callback that records every line and, at the first line containing ``needle``, copies
    the report.json on disk (what a checkpoint left, before any interrupt handler runs) and calls ``stop``."""

    def log(msg: str) -> None:
        seen.append(msg)
        if needle in msg and not on_disk:
            on_disk.append(json.loads((out / "report.json").read_text()))
            stop()

    return log


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _answers(report: dict[str, Any], group: str, strength: float | None = None) -> list[tuple[str, int, str]]:
    """The (text, tokens, finish) of one answer group of a report, prompt by prompt."""
    out = []
    for p in report["prompts"]:
        a = p[group] if strength is None else next(s for s in p["steered"] if s["strength"] == strength)
        out.append((a["answer"], a["n_tokens"], a["finish"]))
    return out


def _folder(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def fresh(tiny_model_path: Path, vector_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run the resumed ones must agree with."""
    return run_eval(_cfg(tiny_model_path, vector_path), tmp_path_factory.mktemp("fresh"), log=lambda _m: None)


@pytest.fixture(scope="module")
def interrupted(tiny_model_path: Path, vector_path: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], EvalInterrupted]:
    """A run stopped by Ctrl-C as the first steered answers start: (folder, checkpoint seen then, the stop)."""
    out = tmp_path_factory.mktemp("interrupted")
    seen: list[str] = []
    on_disk: list[dict[str, Any]] = []
    with pytest.raises(EvalInterrupted) as info:
        run_eval(_cfg(tiny_model_path, vector_path), out, log=_stop_when("steered x1", out, _ctrl_c, seen, on_disk))
    return out, on_disk[0], info.value


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# --- checkpoints and stopping ---------------------------------------------------------------------


def test_checkpoint_holds_answers_before_the_stop(interrupted: tuple[Path, dict[str, Any], EvalInterrupted],
                                                  fresh: dict[str, Any]) -> None:
    out, checkpoint, stop = interrupted
    # Written by the checkpoint after the unsteered answers, before the KeyboardInterrupt.
    assert checkpoint["complete"] is False and checkpoint["stage_reached"] == "steered x1 answers"
    assert _answers(checkpoint, "unsteered") == _answers(fresh, "unsteered")
    assert _answers(checkpoint, "reference") == _answers(fresh, "reference")
    assert all(p["steered"] == [] for p in checkpoint["prompts"])
    # The interrupt saved the same again, and said so on one line.
    assert stop.exit_code == 130 and "\n" not in stop.message
    assert stop.message.startswith("interrupted during steered x1 answers: saved 8 answers")
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and _answers(report, "unsteered") == _answers(fresh, "unsteered")
    assert "stopped during steered x1 answers" in (out / "summary.md").read_text()


def test_resume_reuses_finished_answers(interrupted: tuple[Path, dict[str, Any], EvalInterrupted],
                                        fresh: dict[str, Any], tiny_model_path: Path, vector_path: Path,
                                        tmp_path: Path) -> None:
    out = _copy(interrupted[0], tmp_path)
    seen: list[str] = []
    report = run_eval(_cfg(tiny_model_path, vector_path, resume=True), out, log=seen.append)
    assert report["complete"] is True and json.loads((out / "report.json").read_text())["complete"] is True
    resumed = [m for m in seen if m.startswith("--resume:")]
    assert len(resumed) == 1 and "reusing the reference, unsteered answers (4 prompts each)" in resumed[0]
    assert "answering x1, x2" in resumed[0]
    assert not any(m.startswith("[reference]") or m.endswith(": unsteered") for m in seen)  # not answered again
    assert report["resumed"]["reused"] == ["reference", "unsteered"]
    for group in ("unsteered", "reference"):
        assert _answers(report, group) == _answers(fresh, group)
    for s in STRENGTHS:
        assert _answers(report, "steered", s) == _answers(fresh, "steered", s)
    # Reused answers were measured by reading them (the report keeps no log-likelihoods), like the
    # fresh run's reference answers, which are the same texts (the reference is the same model). Not
    # like the fresh unsteered ones, measured on their generated tokens: the random model emits
    # pieces of UTF-8 characters, and the decoded text reads back as other, unlikely tokens.
    assert report["unsteered"]["perplexity"]["n_scored"] == fresh["unsteered"]["perplexity"]["n_scored"] > 0
    assert report["unsteered"]["perplexity"]["pooled"] == pytest.approx(
        fresh["reference"]["perplexity"]["pooled"], rel=1e-3)
    for p in report["prompts"]:
        assert p["unsteered"]["perplexity"] is not None or not p["unsteered"]["answer"]
        assert "score" in p["unsteered"] and p["reference"]["verdict"]["outcome"] in ("win", "tie", "loss")
    assert [r["judge"]["n"] for r in report["results"]] == [4, 4]


def test_sigterm_saves_and_resume_reuses_the_finished_strength(
        tiny_model_path: Path, vector_path: Path, fresh: dict[str, Any], tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[str] = []
    on_disk: list[dict[str, Any]] = []
    cfg = _cfg(tiny_model_path, vector_path)
    with pytest.raises(EvalInterrupted) as info:
        run_eval(cfg, tmp_path, log=_stop_when("steered x2", tmp_path, _sigterm, seen, on_disk))
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is gone
    stop = info.value
    assert stop.exit_code == 143 and "\n" not in stop.message
    assert stop.message.startswith("terminated (SIGTERM) during steered x2 answers: saved")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False and _answers(report, "steered", 1.0) == _answers(fresh, "steered", 1.0)

    seen.clear()
    report = run_eval(dataclasses.replace(cfg, resume=True), tmp_path, log=seen.append)
    assert report["complete"] is True and report["resumed"]["reused"] == ["reference", "unsteered", "x1"]
    assert any("reusing the reference, unsteered, x1 answers" in m and "answering x2;" in m for m in seen)
    assert [m for m in seen if m.startswith("[answer]")] == [m for m in seen if m.endswith("steered x2")]
    assert _answers(report, "steered", 2.0) == _answers(fresh, "steered", 2.0)


def test_sigterm_during_a_decode(tiny_model_path: Path, vector_path: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Sent from another thread 50 ms into the steered answers, SIGTERM lands in a decode (or the
    # scheduler around it), where llama.cpp calls back into Python for every graph node: it must
    # stop the run there, not be dropped in a callback.
    dropped: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    timers: list[threading.Timer] = []

    def log(msg: str) -> None:
        if msg.endswith("steered x1") and not timers:
            timers.append(threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)))
            timers[0].start()

    cfg = _cfg(tiny_model_path, vector_path, limit=8, sampling=Sampling(max_tokens=48), reference=None)
    with pytest.raises(EvalInterrupted) as info:
        run_eval(cfg, tmp_path, log=log)
    timers[0].join()
    assert info.value.exit_code == 143 and info.value.message.startswith("terminated (SIGTERM) during ")
    assert dropped == []
    assert json.loads((tmp_path / "report.json").read_text())["complete"] is False


def test_run_in_a_thread_keeps_sigterm_alone(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    # signal.signal raises outside the main thread: the run must not try there.
    before = signal.getsignal(signal.SIGTERM)
    result: list[Any] = []
    cfg = _cfg(tiny_model_path, vector_path, limit=2, strengths=(1.0,), reference=None, kinds=("helpful",),
               quality_judge=False)
    thread = threading.Thread(target=lambda: result.append(run_eval(cfg, tmp_path, log=lambda _m: None)))
    thread.start()
    thread.join(timeout=300)
    assert result and result[0]["complete"] is True
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_inside_a_llama_callback_is_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # An exception raised in a ctypes callback (llama.cpp's log sink, called while a model loads) is
    # printed and dropped, and the run would go on. SIGTERM there is noted instead; elsewhere it
    # raises. The loop calls the real sink through ctypes, so the signal lands in it most times.
    dropped: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)  # where ctypes reports what it dropped
    outcomes = set()
    for _ in range(10):
        try:
            with sigterm_as_ctrl_c() as sigterm:
                sigterm_while_logging(sigterm)
            outcomes.add("noted" if sigterm.seen else "missed")
        except KeyboardInterrupt:
            outcomes.add("raised")
    assert outcomes and "missed" not in outcomes
    assert dropped == []


def test_without_resume_the_log_says_resume_would_reuse(
        interrupted: tuple[Path, dict[str, Any], EvalInterrupted], tiny_model_path: Path, vector_path: Path,
        tmp_path: Path) -> None:
    out = _copy(interrupted[0], tmp_path)
    seen: list[str] = []

    def log(msg: str) -> None:
        seen.append(msg)
        raise KeyboardInterrupt  # the first line is all this test needs

    with pytest.raises(EvalInterrupted):
        run_eval(_cfg(tiny_model_path, vector_path), out, log=log)
    assert seen[0].startswith("evaluating on 4 prompts") and "(--resume would reuse its answers)" in seen[0]


# --- what cannot be resumed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"limit": 3}, "the saved run used limit 4, this one 3; use another --out or the same settings"),
        ({"strengths": (1.0, 3.0)}, "the saved run used strengths 1,2, this one 1,3;"),
        ({"sampling": Sampling(max_tokens=7)}, "the saved run used max_tokens 6, this one 7;"),
        ({"reference": None}, "the saved run used reference "),
    ],
    ids=["limit", "sweep", "max-tokens", "no-reference"],
)
def test_resume_with_other_settings_fails_unchanged(
        change: dict[str, Any], needle: str, interrupted: tuple[Path, dict[str, Any], EvalInterrupted],
        tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    out = _copy(interrupted[0], tmp_path)
    before = _folder(out)
    with pytest.raises(AlignezError) as info:
        run_eval(_cfg(tiny_model_path, vector_path, resume=True, **change), out, log=lambda _m: None)
    msg = str(info.value)
    assert msg.startswith("--resume: ") and needle in msg and "\n" not in msg
    assert _folder(out) == before


def test_resume_with_a_changed_vector_file_fails(tiny_model_path: Path, tmp_path: Path) -> None:
    vector = _write_vector(tmp_path / "mine.gguf", seed=2)
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_path, vector, limit=2, reference=None, quality_judge=False, refusal_judge=False)
    with pytest.raises(EvalInterrupted):
        run_eval(cfg, out, log=_stop_when("steered x1", out, _ctrl_c, [], []))
    _write_vector(vector, seed=3)  # same path, other content
    before = _folder(out)
    with pytest.raises(AlignezError, match=r"--resume: the vector file .*mine\.gguf changed since the saved run"):
        run_eval(dataclasses.replace(cfg, resume=True), out, log=lambda _m: None)
    assert _folder(out) == before


def test_resume_with_nothing_to_resume(tiny_model_path: Path, vector_path: Path, fresh: dict[str, Any],
                                       tmp_path: Path) -> None:
    missing = tmp_path / "never-ran"
    with pytest.raises(AlignezError, match=r"--resume: there is no .*report\.json to resume; run without --resume"):
        run_eval(_cfg(tiny_model_path, vector_path, resume=True), missing, log=lambda _m: None)
    assert not missing.exists()  # nothing written, not even the folder
    done = tmp_path / "done"
    done.mkdir()
    (done / "report.json").write_text(json.dumps(fresh))
    with pytest.raises(AlignezError, match=r"is a finished run, nothing to resume"):
        run_eval(_cfg(tiny_model_path, vector_path, resume=True), done, log=lambda _m: None)
    (done / "report.json").write_text("{ not json")
    with pytest.raises(AlignezError, match=r"is not valid JSON"):
        run_eval(_cfg(tiny_model_path, vector_path, resume=True), done, log=lambda _m: None)


def test_answer_from_json_round_trip() -> None:
    a = Answer("Hello there.", 3, "stop", nll=2.5, ppl_tokens=3, score=0.7)
    back = Answer.from_json(json.loads(json.dumps(a.to_json())))
    assert (back.text, back.n_tokens, back.finish) == (a.text, a.n_tokens, a.finish)
    assert back.ppl_tokens == 0 and back.score is None  # to be measured again


# --- the command ----------------------------------------------------------------------------------


def _cli(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], check=False, capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _cli_args(model: Path, vector: Path, out: Path) -> list[Any]:
    return ["-m", model, "--judge", model, "--vector", vector, "--limit", 4, "--max-tokens", 6, "--threads", 1,
            "--top-n", 2, "--judge-ctx", 2048, "--sweep", "1,2", "--out", out]


def test_cli_resume_errors_one_line(interrupted: tuple[Path, dict[str, Any], EvalInterrupted],
                                    tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    r = _cli(*_cli_args(tiny_model_path, vector_path, tmp_path / "empty"), "--resume", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    expected = (f"error: --resume: there is no {tmp_path / 'empty' / 'report.json'} to resume; "
                "run without --resume to start a new run")
    assert r.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "empty").exists()
    # The saved run (the interrupted fixture) answered 4 prompts with a reference; this one has none.
    out = _copy(interrupted[0], tmp_path)
    before = _folder(out)
    r = _cli(*_cli_args(tiny_model_path, vector_path, out), "--limit", 3, "--resume", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    expected = "error: --resume: the saved run used limit 4, this one 3; use another --out or the same settings"
    assert lines == [expected], r.stderr
    assert _folder(out) == before


def test_cli_sigterm_exit_code_and_message(tiny_model_path: Path, vector_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # In process, so SIGTERM arrives exactly when the steered answers start (our run_eval, unmocked,
    # only gets a log callback that sends it).
    out = tmp_path / "run"
    real = cli_eval.run_eval
    monkeypatch.setattr(cli_eval, "run_eval",
                        lambda cfg, out_dir: real(cfg, out_dir, log=_stop_when("steered x1", out, _sigterm, [], [])))
    result = CliRunner().invoke(cli_main, ["eval", *map(str, _cli_args(tiny_model_path, vector_path, out))])
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("terminated (SIGTERM) during steered x1 answers: saved")
    assert "Traceback" not in result.output
    assert json.loads((out / "report.json").read_text())["complete"] is False


def test_cli_killed_in_the_background_then_resumed(tiny_model_path: Path, vector_path: Path, tmp_path: Path) -> None:
    # The real case: a separate process, stopped with kill (SIGTERM) while it answers, then --resume.
    out = tmp_path / "run"
    more = ["--sweep", "1,2,3,4", "--max-tokens", "24"]  # enough work left that the kill lands first
    args = [*CLI, *map(str, _cli_args(tiny_model_path, vector_path, out)), *more]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "steered x1" in line and line.startswith("[answer]"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, "".join(lines) + rest
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].startswith("terminated (SIGTERM) during "), rest
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and all("answer" in p["unsteered"] for p in report["prompts"])

    r = _cli(*_cli_args(tiny_model_path, vector_path, out), *more, "--resume")
    assert r.returncode == 0, r.stderr
    assert "--resume: reusing the unsteered" in r.stderr
    assert json.loads((out / "report.json").read_text())["complete"] is True
