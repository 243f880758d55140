"""The request recipe survives Ctrl-C: each stage keeps its finished work in OUT/request-work, and
running again into the same folder continues there and writes the same vector bytes as a run never
stopped; a folder holding another run's work is refused with one line and left as it was. A
finished run removes the saved states (keep_work keeps them) and a re-run reads only those again;
the calibration reports its progress, a stage taken from the saved work as done at once.

Real llama.cpp on the tiny random-weight model, with 40 risky and 40 benign built-in requests (two
chunks of states per kind, three chunks of answers); a Ctrl-C is a KeyboardInterrupt raised by a
wrapped engine method at its Nth call, as a real one surfaces from a decode. About 8 s on one core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignez_local.align.axes import get_axis
from alignez_local.align.request_work import STATE_CHUNK, WORK_FOLDER, RequestWork
from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_refusals import (UNSTEERED_STAGE, RefusalCalibration, RefusalTrial, calibrate_refusals,
                                                      trial_stage)
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.llama.engine import Engine
from alignez_local.models import ModelId
from alignez_local.pipeline import Interrupted, RequestSteerResult, run_request_steer
from alignez_local.prompt_sets import load_request_kinds

N = 40  # requests of each kind: one full chunk of states and part of another


@pytest.fixture(scope="module")
def queries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kinds = load_request_kinds(None, "harmless")
    path = tmp_path_factory.mktemp("queries") / "requests.jsonl"
    path.write_text("".join(json.dumps({"query": q, "kind": k}) + "\n" for k in ("risky", "benign") for q in kinds[k][:N]))
    return path


class Tripwire:
    """Wraps ``engine.NAME``: records each call's prompts and raises KeyboardInterrupt at call
    ``stop_at`` (before it runs), where a real Ctrl-C would surface from that decode."""

    def __init__(self, engine: Engine, name: str, stop_at: int | None = None) -> None:
        self.calls: list[list[str]] = []
        real = getattr(engine, name)

        def wrapped(prompts: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(list(prompts))
            if len(self.calls) == stop_at:
                raise KeyboardInterrupt
            return real(prompts, *args, **kwargs)

        setattr(engine, name, wrapped)  # the instance's attribute shadows the method


@pytest.fixture
def engine(tiny_model_path: Path) -> Iterator[Engine]:
    """A fresh engine per test, as each re-run of the command opens its own."""
    e = Engine(tiny_model_path, n_ctx=2048)
    yield e
    e.close()


def steer(engine: Engine, out: Path, queries: Path, seed: int = 0, keep_work: bool = False) -> RequestSteerResult:
    return run_request_steer(engine, get_axis("harmless"), out, ModelId.of(engine, str(engine.path)), str(queries), seed,
                             keep_work=keep_work)


def state_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / WORK_FOLDER / "states").iterdir())


SMALL_FILES = ["calibration.jsonl", "manifest.json", "refusals.jsonl"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path: Path, queries: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run never stopped, its work kept whole (keep_work): the other tests copy it."""
    out = tmp_path_factory.mktemp("whole") / "run"
    with Engine(tiny_model_path, n_ctx=2048) as e:
        steer(e, out, queries, keep_work=True)
    return out


def test_keep_work_keeps_every_saved_state(uninterrupted: Path) -> None:
    assert state_files(uninterrupted) == [f"{k}-{s:05d}.npy" for k in ("benign", "risky") for s in (0, STATE_CHUNK)]
    saved = json.loads((uninterrupted / "report.json").read_text())["saved_work"]
    assert saved == {"folder": WORK_FOLDER, "kept": SMALL_FILES + ["states/"], "removed": {}}


def test_a_run_interrupted_at_each_stage_resumes_to_the_same_vector(tiny_model_path: Path, queries: Path, tmp_path: Path,
                                                                   uninterrupted: Path) -> None:
    out = tmp_path / "run"
    work = out / WORK_FOLDER
    expected = (uninterrupted / "vector.gguf").read_bytes()

    # 1. Ctrl-C while reading the 11th benign state: the risky states are saved, no benign chunk yet.
    with Engine(tiny_model_path, n_ctx=2048) as e:
        Tripwire(e, "capture", stop_at=N + 11)
        with pytest.raises(Interrupted, match=rf"^{N} of {2 * N} states kept in .*{WORK_FOLDER}; run again to continue"):
            steer(e, out, queries)
    assert sorted(p.name for p in (work / "states").iterdir()) == ["risky-00000.npy", f"risky-{STATE_CHUNK:05d}.npy"]
    assert not (out / "vector.gguf").exists() and not (out / "report.json").exists()

    # 2. Again, Ctrl-C during the second chunk of answers: only the missing states were read.
    risky, benign = load_request_kinds(queries)["risky"], load_request_kinds(queries)["benign"]
    with Engine(tiny_model_path, n_ctx=2048) as e:
        step = 2 * e.n_parallel  # own_refusals's chunk
        reads = Tripwire(e, "capture")
        answers = Tripwire(e, "generate", stop_at=2)
        with pytest.raises(Interrupted, match=rf"^{2 * N} of {2 * N} states, {step} of {N} refusal labels kept"):
            steer(e, out, queries)
        assert len(reads.calls) == N and reads.calls[0] == [e.prompt(benign[0])]
        assert answers.calls[0] == [e.prompt(q) for q in risky[:step]]

    # 3. Again, Ctrl-C during the third strength trial (the gate opens on a held-out risky request, so
    # each trial decodes once): the answers went on from the chunk boundary.
    assert json.loads((uninterrupted / "report.json").read_text())["calibration_prompts"]["risky_gate_open"] > 0
    chunks_left = -(-(N - step) // step)
    with Engine(tiny_model_path, n_ctx=2048) as e:
        calls = Tripwire(e, "generate", stop_at=chunks_left + 1 + 3)  # the answers, the unsteered ones, 3 trials
        with pytest.raises(Interrupted, match=r"the unsteered answers and 2 strength trials kept"):
            steer(e, out, queries)
        assert calls.calls[0] == [e.prompt(q) for q in risky[step:2 * step]]
    saved = [json.loads(line) for line in (work / "calibration.jsonl").read_text().splitlines()]
    assert "unsteered" in saved[0] and [r["trial"]["strength"] for r in saved[1:]] == [0.5, 1.0]

    # 4. Again, to the end: the saved trials are not decoded again, and the vector is the same bytes.
    with Engine(tiny_model_path, n_ctx=2048) as e:
        calls = Tripwire(e, "generate")
        res = steer(e, out, queries)
    whole = json.loads((uninterrupted / "report.json").read_text())
    n_trials = len(whole["calibration"]["trials"])
    assert len(calls.calls) == n_trials - 2  # one decode per trial left; none for the unsteered answers
    assert (out / "vector.gguf").read_bytes() == expected
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True and whole["resumed"] is False and "reused" not in whole
    assert report["reused"] == {"capture": {"reused": 2 * N, "of": 2 * N}, "answers": {"reused": N, "of": N},
                                "calibrate": {"unsteered_answers": True, "trials": 2}}
    assert "this run only" in report["timings_note"] and res.reused == report["reused"]
    assert report["calibration"] == whole["calibration"] and report["request_contrast"] == whole["request_contrast"]

    # 5. Finished, the run removed its saved states (after writing the vector and report) and kept the small files.
    assert state_files(out) == [] and sorted(p.name for p in work.iterdir()) == SMALL_FILES + ["states"]
    size = sum(p.stat().st_size for p in (uninterrupted / WORK_FOLDER / "states").iterdir())
    assert report["saved_work"] == {"folder": WORK_FOLDER, "kept": SMALL_FILES, "removed": {"states/": {"files": 4, "bytes": size}}}


def test_a_finished_run_run_again_reads_only_the_states_again(engine: Engine, queries: Path, tmp_path: Path,
                                                              uninterrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "finished"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)
    for chunk in (out / WORK_FOLDER / "states").iterdir():
        chunk.unlink()  # what a finished run without keep_work leaves
    reads, answers = Tripwire(engine, "capture"), Tripwire(engine, "generate")
    steer(engine, out, queries)
    assert len(reads.calls) == 2 * N and not answers.calls  # the labels, unsteered answers and trials were kept
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert set(report["reused"]) == {"answers", "calibrate"} and state_files(out) == []
    # The calibration's progress lines: every stage came from the saved work, so each is done at once.
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("calibration, ")]
    n_out = report["calibration_prompts"]["heldout_risky"] + report["calibration_prompts"]["heldout_benign"]
    n_open = report["calibration_prompts"]["risky_gate_open"] + report["calibration_prompts"]["benign_gate_open"]
    want = [f"{UNSTEERED_STAGE}: {n_out}/{n_out} "] + [f"{trial_stage(t['strength'])}: {n_open}/{n_open} "
                                                       for t in report["calibration"]["trials"]]
    assert [ln.removeprefix("calibration, ")[:len(w)] for ln, w in zip(lines, want)] == want and len(lines) == len(want)
    assert all("(100%) elapsed 0m00s ETA 0m00s" in ln for ln in lines)


class Memo:
    """``calibrate_refusals``'s memo in memory (RequestWork keeps the same on disk)."""

    def __init__(self) -> None:
        self.base: tuple[list[str], list[int]] | None = None
        self.trials: dict[float, RefusalTrial] = {}

    def unsteered(self) -> tuple[list[str], list[int]] | None:
        return self.base

    def save_unsteered(self, answers: Sequence[str], opened: Sequence[int]) -> None:
        self.base = (list(answers), list(opened))

    def trial(self, strength: float) -> RefusalTrial | None:
        return self.trials.get(strength)

    def save_trial(self, trial: RefusalTrial) -> None:
        self.trials[trial.strength] = trial


def test_the_calibration_reports_every_answer_and_a_saved_stage_as_done_at_once(engine: Engine, queries: Path,
                                                                               uninterrupted: Path) -> None:
    cv = read_control_vector(uninterrupted / "vector.gguf")
    kinds = load_request_kinds(queries)
    # The gate of the tiny model's vector opens on one of these risky requests (risky[34]).
    risky, benign = [engine.prompt(q) for q in kinds["risky"][32:]], [engine.prompt(q) for q in kinds["benign"][:8]]

    def calibrate(memo: Memo) -> tuple[RefusalCalibration, list[tuple[str, int, int]]]:
        seen: list[tuple[str, int, int]] = []
        cal = calibrate_refusals(engine, lambda s: Steering.vector(cv, s), risky, benign, memo=memo,
                                 on_progress=lambda *report: seen.append(report))
        return cal, seen

    memo = Memo()
    whole, seen = calibrate(memo)
    assert memo.base is not None
    n_open, n_trials = len(memo.base[1]), len(whole.trials)
    assert n_open > 0 and n_trials >= 2
    # Each stage from 0 to its total, one answer at a time: the unsteered answers, then each strength's opened prompts.
    stages = [(UNSTEERED_STAGE, 16)] + [(trial_stage(t.strength), n_open) for t in whole.trials]
    assert seen == [(stage, k, n) for stage, n in stages for k in range(n + 1)]

    # Resumed with every stage but the last saved: those are reported whole at once, the last one answer by answer.
    del memo.trials[whole.trials[-1].strength]
    again, seen = calibrate(memo)
    assert again == whole
    assert seen == [(stage, n, n) for stage, n in stages[:-1]] + [(stages[-1][0], k, n_open) for k in range(n_open + 1)]


def test_a_finished_run_run_again_reuses_all_its_work(engine: Engine, queries: Path, tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)
    reads, answers = Tripwire(engine, "capture"), Tripwire(engine, "generate")
    steer(engine, out, queries)
    assert not answers.calls and not reads.calls  # every state, label, unsteered answer and trial was saved
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()


def test_a_calibration_saved_for_another_vector_is_made_again_not_reused(engine: Engine, queries: Path, tmp_path: Path,
                                                                           uninterrupted: Path) -> None:
    # The saved trials of a vector that the code now fits differently (here: the lines' fingerprint
    # changed, as a changed fit would change it) must not be taken because their strengths match.
    out = tmp_path / "other-vector"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)
    cal = out / WORK_FOLDER / "calibration.jsonl"
    lines = [json.loads(line) for line in cal.read_text().splitlines()]
    assert lines and all(len(r["vector"]) == 64 for r in lines)
    cal.write_text("".join(json.dumps({**r, "vector": "0" * 64}) + "\n" for r in lines))
    answers = Tripwire(engine, "generate")
    steer(engine, out, queries)
    whole = json.loads((uninterrupted / "report.json").read_text())
    # the unsteered answers and every trial decoded again (one decode per trial: the gate opens on a risky request)
    assert len(answers.calls) >= 1 + len(whole["calibration"]["trials"])
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert "calibrate" not in report["reused"] and report["calibration"] == whole["calibration"]


def test_a_stop_while_the_saved_states_are_removed_says_the_vector_is_written(
        engine: Engine, queries: Path, tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ctrl-C at the last step (the clean-up after the vector and report are written) must not read
    # as "nothing was written": it names the vector, and running again finishes the same files.
    out = tmp_path / "late-stop"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)

    def stopped(self: RequestWork) -> str | None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RequestWork, "remove_planned", stopped)
        with pytest.raises(Interrupted, match=r"vector\.gguf is written; .* kept in .*; run again to write the report again"):
            steer(engine, out, queries)
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()
    steer(engine, out, queries)
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()
    assert not any((out / WORK_FOLDER / "states").iterdir())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_with_another_runs_work_is_refused_in_one_line_and_left_as_it_was(
        tiny_model_path: Path, queries: Path, tmp_path: Path, uninterrupted: Path) -> None:
    before = snapshot(uninterrupted)
    mtimes = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")}
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(queries.read_text().splitlines()[1:]) + "\n")  # one risky request fewer
    cli = [sys.executable, "-m", "alignez_local", "steer", "-m", str(tiny_model_path), "--recipe", "request",
           "--threads", "1", "-o", str(uninterrupted)]
    for args, what in ((["--queries", str(queries), "--seed", "1"], "another seed (0, this run 1)"),
                       (["--queries", str(other)], f"another query set ({{'risky': {N}, 'benign': {N}}} requests")):
        res = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 1 and len(err) == 1, res.stderr
        assert err[0].startswith(f"error: {uninterrupted / WORK_FOLDER} holds the saved work of a run with {what}")
        assert err[0].endswith(f"use another output folder, or delete {uninterrupted / WORK_FOLDER} to start over")
    assert snapshot(uninterrupted) == before
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")} == mtimes


def test_a_damaged_chunk_of_states_is_one_clear_error(engine: Engine, queries: Path, tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)
    chunk = out / WORK_FOLDER / "states" / "risky-00000.npy"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(AlignezError, match=rf"{chunk} is damaged .*delete it and run again"):
        steer(engine, out, queries)
    assert np.load(out / WORK_FOLDER / "states" / f"risky-{STATE_CHUNK:05d}.npy").shape[0] == N - STATE_CHUNK
