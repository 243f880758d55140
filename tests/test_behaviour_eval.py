"""alignez eval's behaviour table on the tiny model: the same conditions as steer's report
(unsteered, prompting, a random direction of the same norm, the file), scored by the axis's measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from alignez_local.formats.control_vector import ControlVector, write_control_vector

CLI = [sys.executable, "-m", "alignez_local"]


def test_eval_prints_and_writes_the_behaviour_table(tiny_model_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    meta = {"alignez.axis": "french", "alignez.axis.positive": "French-speaking", "alignez.axis.negative": "English-speaking"}
    vec = tmp_path / "fr.gguf"
    write_control_vector(vec, ControlVector({1: rng.standard_normal(64).astype(np.float32)}, model_hint="llama",
                                           metadata=meta, name="fr"))
    out = tmp_path / "ev"
    res = subprocess.run(CLI + ["eval", "-m", str(tiny_model_path), "--vector", f"{vec}:2", "--kinds", "helpful",
                                "--limit", "4", "--max-tokens", "12", "--no-quality-judge", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "behaviour (answers in French) on 4 prompts" in res.stdout  # the axis read from the file
    table = json.loads((out / "behaviour.json").read_text())
    assert table["axis"] == "french" and table["measure"]["key"] == "language:fr" and table["n_prompts"] == 4
    conds = table["conditions"]
    assert list(conds) == ["unsteered", "prompting", "random direction (fr x2)", "vector fr x2"]
    for row in conds.values():
        assert row["n"] == 4 and 0 <= row["behaviour_rate"]["mean"] <= 1 and 0 <= row["combined"]["mean"] <= 1
    # a wrong axis name fails at once, in one line, before any model work
    bad = subprocess.run(CLI + ["eval", "-m", str(tiny_model_path), "--vector", str(vec), "--behaviour", "klingon",
                                "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "klingon" in bad.stderr
    assert not (tmp_path / "x").exists()
