"""Bad input through the real CLI: one line saying what is wrong and what to do, a non-zero exit,
no traceback, and no half-written output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.testing import write_tiny_llama

CLI = [sys.executable, "-m", "alignez_local"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, input=stdin, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("warning:", "Usage:", "Try "))]
    assert len(err) == 1, res.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"model": tiny_model_path}
    f["narrow_model"] = write_tiny_llama(d / "narrow.gguf", n_embd=32, n_head=2)
    f["text"] = d / "notes.gguf"
    f["text"].write_text("this is not a gguf file\n")
    data = tiny_model_path.read_bytes()
    f["truncated"] = d / "truncated.gguf"
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["vector"] = d / "v.gguf"
    write_control_vector(f["vector"], ControlVector({2: np.ones(64, np.float32)}, model_hint="llama"))
    f["nan_vector"] = d / "nan.gguf"
    raw = bytearray(f["vector"].read_bytes())
    raw[-4:] = np.array([np.nan], dtype=np.float32).tobytes()  # last float of the tensor data
    f["nan_vector"].write_bytes(bytes(raw))
    f["empty_queries"] = d / "empty.txt"
    f["empty_queries"].write_text("\n\n")
    f["bad_jsonl"] = d / "bad.jsonl"
    f["bad_jsonl"].write_text('{"query": "fine"}\n{"query": broken\n')
    f["prefs_not_pairs"] = d / "prefs.jsonl"
    f["prefs_not_pairs"].write_text('{"hello": 1}\n')
    return f


def test_missing_model(files) -> None:
    assert_one_line_error(run("generate", "-m", "no/such/model.gguf", "-o", "x.jsonl"), "not found", "bundled name")


def test_model_not_gguf(files) -> None:
    assert_one_line_error(run("generate", "-m", str(files["text"]), "-o", "x.jsonl"), "not a GGUF file")


def test_truncated_model(files) -> None:
    assert_one_line_error(run("generate", "-m", str(files["truncated"]), "-o", "x.jsonl"), "truncated")


def test_vector_passed_as_model(files) -> None:
    assert_one_line_error(run("generate", "-m", str(files["vector"]), "-o", "x.jsonl"), "control vector, not a model", "--vector")


def test_model_passed_as_vector(files, tmp_path: Path) -> None:
    assert_one_line_error(run("import", str(files["model"]), "-o", str(tmp_path / "v.gguf")), "model file")
    assert not (tmp_path / "v.gguf").exists()


def test_nan_vector_refused(files, tmp_path: Path) -> None:
    assert_one_line_error(run("import", str(files["nan_vector"]), "-o", str(tmp_path / "v.gguf")), "NaN")
    assert_one_line_error(run("inspect", str(files["nan_vector"])), "NaN")


def test_vector_for_another_model(files, tmp_path: Path) -> None:
    res = run("import", str(files["vector"]), "-m", str(files["narrow_model"]), "-o", str(tmp_path / "v.gguf"))
    assert_one_line_error(res, "width 64", "n_embd 32")


def test_empty_and_malformed_query_files(files, tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    assert_one_line_error(run("generate", "-m", str(files["model"]), "--queries", str(files["empty_queries"]), "-o", str(out)), "no queries")
    assert_one_line_error(run("generate", "-m", str(files["model"]), "--queries", str(files["bad_jsonl"]), "-o", str(out)), "line 2", "JSON")
    assert_one_line_error(run("generate", "-m", str(files["model"]), "--queries", str(tmp_path / "none.txt"), "-o", str(out)), "not found")
    assert not out.exists()


def test_output_path_not_writable(files) -> None:
    assert_one_line_error(run("generate", "-m", str(files["model"]), "-o", "/no/such/dir/p.jsonl"), "does not exist")


def test_preference_file_of_the_wrong_shape(files, tmp_path: Path) -> None:
    res = run("fit", "-m", str(files["model"]), "--prefs", str(files["prefs_not_pairs"]), "-o", str(tmp_path / "p.gguf"))
    assert_one_line_error(res, "not a preference pair")
    assert not (tmp_path / "p.gguf").exists()


def test_out_of_range_values(files, tmp_path: Path) -> None:
    m = str(files["model"])
    assert_one_line_error(run("generate", "-m", m, "--temperature", "-1", "-o", str(tmp_path / "a.jsonl")), "temperature")
    assert_one_line_error(run("generate", "-m", m, "--responses", "0", "-o", str(tmp_path / "a.jsonl")), "responses")
    assert_one_line_error(run("fit", "-m", m, "--prefs", str(files["prefs_not_pairs"]), "--variance", "2", "-o", str(tmp_path / "p.gguf")), "not a preference pair")


def test_profile_for_another_model(files, tmp_path: Path) -> None:
    prefs = tmp_path / "prefs.jsonl"
    assert run("generate", "-m", str(files["model"]), "--limit", "6", "--response-tokens", "12", "-o", str(prefs)).returncode == 0
    prof = tmp_path / "p.gguf"
    # The random-weight model's own check of its pairs is noise: fit on all of them here.
    res = run("fit", "-m", str(files["model"]), "--prefs", str(prefs), "--layers", "1-3", "--no-self-check", "-o", str(prof))
    assert res.returncode == 0, res.stderr
    assert "pairs kept 6 of 6" in res.stdout + res.stderr
    res = run("export", "-m", str(files["narrow_model"]), "--profile", str(prof), "-o", str(tmp_path / "v.gguf"))
    assert_one_line_error(res, "n_embd 64", "n_embd 32")
    assert not (tmp_path / "v.gguf").exists()
    assert_one_line_error(run("fit", "-m", str(files["model"]), "--prefs", str(prefs), "--layers", "0-9", "-o", str(prof)), "--layers")
    assert_one_line_error(run("generate", "-m", str(prof), "-o", str(tmp_path / "x.jsonl")), "steering profile, not a model")


def test_engine_parameter_names_become_the_flags_that_set_them() -> None:
    from alignez_local.apps.cli_options import in_flags

    assert in_flags("the context of 64 tokens is full; raise n_ctx or lower n_parallel") == (
        "the context of 64 tokens is full; raise --ctx or lower --parallel")
    assert in_flags("temperature 9 is out of range; use 0 (greedy) to 5").startswith("--temperature 9 ")
    assert in_flags("top_p 2 is out of range") == "--top-p 2 is out of range"
    assert in_flags("a --max-tokens of 5 and the temperature") == "a --max-tokens of 5 and the temperature"


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_persona_is_named_as_empty(empty: str, files: dict[str, Path]) -> None:
    """"" and "   " get the same line: the persona is empty (not "needs both")."""
    res = run("steer", "-m", str(files["model"]), "--positive", empty, "--negative", "wordy", "--screen-only")
    assert_one_line_error(res, "--positive is empty")


@pytest.mark.parametrize("args,needle", [
    (["--concept", "the ocean", "--positive", "a", "--negative", "b"], "give one of them"),
    (["--concept", "the ocean", "--keywords", " , "], "comma-separated"),
    (["--concept", "the ocean", "--measure", "capitals"], "a --concept is measured by its --keywords"),
    (["--style", "emoji", "--measure", "emojis"], "unknown behaviour measure 'emojis'"),
    (["--axis", "french", "--keywords", "oui"], "--keywords is for --concept"),
    (["--axis", "french", "--recipe", "texts"], "give --concept or --style"),
])
def test_a_concept_or_style_given_wrongly_is_one_line(args: list[str], needle: str, files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    res = run("generate", "-m", str(files["model"]), *args, "--limit", "2", "-o", str(tmp_path / "p.jsonl"))
    assert_one_line_error(res, needle)
    assert not (tmp_path / "p.jsonl").exists()


def test_a_damaged_pairs_file_is_reported_before_any_model_work(files: dict[str, Path], tmp_path: Path) -> None:
    """steer and generate read an existing pairs file before loading the model or screening."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "preferences.jsonl").write_text('{"id": "a", "query": "q"}\nnot json\n{"id": "b"}\n')
    res = run("steer", "-m", str(files["model"]), "--axis", "french", "--threads", "1", "-o", str(out))
    assert_one_line_error(res, "preferences.jsonl line 2 is not valid JSON")
    assert "screen:" not in res.stderr
    res = run("generate", "-m", str(files["text"]), "-o", str(out / "preferences.jsonl"))
    assert_one_line_error(res, "line 2 is not valid JSON")  # before the (broken) model is even opened


def test_keep_work_outside_the_request_recipe_is_one_line_before_any_work(files: dict[str, Path], tmp_path: Path) -> None:
    res = run("steer", "-m", str(files["model"]), "--axis", "french", "--keep-work", "-o", str(tmp_path / "run"))
    assert_one_line_error(res, "--keep-work keeps the request recipe's saved work", "run it without --keep-work")
    assert not (tmp_path / "run").exists()
