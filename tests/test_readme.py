"""The README's Python block runs as written (on the tiny model instead of SmolLM2) and trains,
applies, evaluates and steers; the README's CLI commands name only options the CLI has."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from alignez_local.apps.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
LOAD = 'az.load("smollm2-135m-instruct", threads=1)'


def python_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the From Python section holds one python block"
    return blocks[0]


def test_the_python_block_trains_applies_evaluates_and_steers(tiny_model_path: Path, tmp_path: Path) -> None:
    code = python_block()
    assert LOAD in code, "the block opens the model the test swaps for the tiny one"
    script = tmp_path / "readme_block.py"
    script.write_text(code.replace(LOAD, f"az.load({str(tiny_model_path)!r}, threads=1)"), encoding="utf-8")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    # The table's conditions, in the order the README shows them, and steer's one-line verdict.
    assert re.search(r"^unsteered +French +\d+%", out, re.M)
    assert re.search(r"^prompting +French", out, re.M)
    assert re.search(r"^random direction \(french x0\.05\) +French", out, re.M)
    assert re.search(r"^vector french x0\.05 +French", out, re.M)
    assert re.search(r"^vector: strength [0-9.]+ \(", out, re.M)
    assert (tmp_path / "runs" / "py-french" / "vector.gguf").is_file()


def _commands() -> list[list[str]]:
    """Return every `alignez ...` command line in the README's shell blocks."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip().removeprefix("$ ")
            m = re.match(r"(?:\.venv/bin/)?alignez (.*)", line)
            if m:
                lines.append(shlex.split(m.group(1).split("&&")[0].split("|")[0]))
    return lines


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_commands_parse(argv: list[str]) -> None:
    """Each README command names a command and options that exist, with values they accept."""
    cmd = main.commands.get(argv[0])
    assert cmd is not None, f"no command {argv[0]!r}"
    try:
        cmd.make_context(argv[0], argv[1:], resilient_parsing=False)
    except click.exceptions.Exit:
        pass
