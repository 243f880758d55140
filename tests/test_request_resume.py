"""The request recipe survives Ctrl-C: each stage keeps its finished work in OUT/request-work, and
running again into the same folder continues there and writes the same vector bytes as a run never
stopped; a folder holding another run's work is refused with one line and left as it was.

Real llama.cpp on the tiny random-weight model, with 40 risky and 40 benign built-in requests (two
chunks of states per kind, three chunks of answers); a Ctrl-C is a KeyboardInterrupt raised by a
wrapped engine method at its Nth call, as a real one surfaces from a decode. About 8 s on one core.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignez_local.align.axes import get_axis
from alignez_local.align.request_work import STATE_CHUNK, WORK_FOLDER
from alignez_local.errors import AlignezError
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


def steer(engine: Engine, out: Path, queries: Path, seed: int = 0) -> RequestSteerResult:
    return run_request_steer(engine, get_axis("harmless"), out, ModelId.of(engine, str(engine.path)), str(queries), seed)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path: Path, queries: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    with Engine(tiny_model_path, n_ctx=2048) as e:
        steer(e, out, queries)
    return out


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


def test_a_finished_run_run_again_reuses_all_its_work(engine: Engine, queries: Path, tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(uninterrupted / WORK_FOLDER, out / WORK_FOLDER)
    reads, answers = Tripwire(engine, "capture"), Tripwire(engine, "generate")
    steer(engine, out, queries)
    assert not answers.calls and not reads.calls  # every state, label, unsteered answer and trial was saved
    assert (out / "vector.gguf").read_bytes() == (uninterrupted / "vector.gguf").read_bytes()


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
