"""``steer --system``: the vector measured and chosen under a system prompt (issue 31).

Qwen's and SmolLM2's chat templates write a system prompt of their own when none is given; the
prompting baseline replaces it with the behaviour's guide while the steered answers kept it. Under
a neutral one ("You are a helpful assistant.") the steered Qwen 0.5B refused less (docs/results.md),
and a user whose app has its own system prompt wants the vector measured under that one. Every
condition but prompting (the unsteered model, the random direction, the vector, the screen's
unsteered answers) then runs and is read under it; the calibration record says which.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from alignez_local.align.axes import get_axis
from alignez_local.align.behaviour_bench import AnswerReader, axis_bench
from alignez_local.align.steering import Steering
from alignez_local.formats.control_vector import read_control_vector
from alignez_local.llama.engine import Engine

from test_pipeline import CLI, STEER

BASE = "You are a terse assistant."
QUESTIONS = ["Name a colour.", "What is two plus two?", "Tell me about the sea.", "Write a short greeting."]


def test_every_condition_but_prompting_runs_and_is_read_under_the_base(tiny_engine: Engine) -> None:
    e = tiny_engine
    axis = get_axis("brief")
    bench = axis_bench(e, axis, None, QUESTIONS[:2], QUESTIONS[2:], base=BASE)
    plain = axis_bench(e, axis, None, QUESTIONS[:2], QUESTIONS[2:])
    under = [e.prompt(q, BASE) for q in QUESTIONS[2:]]
    assert bench.answers(QUESTIONS[2:]) == [c.text for c in e.generate(under, bench.sampling)]
    assert bench.answers(QUESTIONS[2:]) != plain.answers(QUESTIONS[2:])  # the base prompt reaches the model
    asked = [e.prompt(q, bench.system) for q in QUESTIONS[2:]]  # prompting: the guide replaces the base
    assert bench.answers(QUESTIONS[2:], system=bench.system) == [c.text for c in e.generate(asked, bench.sampling)]
    # the plain reader reads under the base, so the unsteered answers' NLL comes from their generation
    reader = bench.scorer.nll
    assert isinstance(reader, AnswerReader) and reader.system == BASE
    fixed = bench.fixed("unsteered", "report")
    assert all((q, a) in reader.seen for q, a in zip(QUESTIONS[2:], fixed.answers))
    again = AnswerReader(e, BASE)(QUESTIONS[2:], fixed.answers)
    assert abs(float(again[0]) - reader.seen[(QUESTIONS[2], fixed.answers[0])]) < 1e-3
    # steered answers run under the base too
    assert bench.answers(QUESTIONS[2:], Steering()) == bench.answers(QUESTIONS[2:])


def test_steer_records_the_system_prompt_it_chose_under(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "--system", BASE, "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"under the system prompt {BASE!r}" in res.stdout
    assert f"--vector {out / 'vector.gguf'} --system 'You are a terse assistant.'" in res.stdout  # try it: as measured
    cal = dict(read_control_vector(out / "vector.gguf").calibration or {})
    assert cal["system"] == BASE
    assert json.loads((out / "report.json").read_text())["calibration"]["vector"]["system"] == BASE


def test_system_errors_are_one_line(tiny_model_path: Path, tmp_path: Path) -> None:
    for args, says in ((["--system", "  "], "--system is empty"),
                       (["--axis", "harmless", "--system", BASE], "run it without --system")):
        bad = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, *args, "-o", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and says in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_chat_says_which_system_prompt_a_strength_was_chosen_under(tiny_engine: Engine, tmp_path: Path) -> None:
    import numpy as np
    from alignez_local.apps.chat import ChatSession
    from alignez_local.formats.control_vector import ControlVector, write_control_vector
    cal = {"rule": "behaviour", "beats_random": True, "strength": 2.0, "system": BASE}
    cv = ControlVector({1: np.ones(tiny_engine.n_embd, np.float32)}, model_hint=tiny_engine.arch,
                       default_strength=2.0, calibration=cal)
    path = write_control_vector(tmp_path / "sys.gguf", cv)
    for given, expect in ((None, True), ("You are a pirate.", True), (BASE, False)):
        notes: list[str] = []
        ChatSession.from_specs(tiny_engine, [str(path)], system=given, on_note=notes.append)
        said = [n for n in notes if "chosen under the system prompt" in n]
        assert bool(said) == expect, (given, notes)
        assert not said or "add --system 'You are a terse assistant.'" in said[0]
