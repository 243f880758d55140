"""The request recipe: a gated vector from the model's state on risky vs benign requests.

The fit is numpy, checked on planted data; the whole command runs on the tiny model through the
real CLI (what it writes, and one clear line for a query file it cannot use).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.recipes import DEFAULT_RECIPE
from alignez_local.api import default_recipe
from alignez_local.align.request_contrast import REFUSED, RISKY, auc, candidate_layers, fit_request_contrast, separation
from alignez_local.errors import AlignezError
from alignez_local.prompt_sets import load_request_kinds
from alignez_local.formats.control_vector import read_control_vector

CLI = [sys.executable, "-m", "alignez_local"]


def planted(n_r: int = 60, n_b: int = 40, n_layers: int = 6, d: int = 16, signal_layer: int = 3, seed: int = 1):
    """States where only ``signal_layer`` separates risky from benign, along a known direction."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    risky = rng.standard_normal((n_r, n_layers, d))
    benign = rng.standard_normal((n_b, n_layers, d))
    risky[:, signal_layer] += 4 * u + 10  # an offset common to the layer's states, plus the signal
    benign[:, signal_layer] += 10
    return risky, benign, u


def test_auc_and_separation() -> None:
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0]), np.array([0.0])) == 0.5
    assert separation(np.array([1.0, 3.0]), np.array([-1.0, -3.0])) == 4.0  # gap 4, spread 1


def test_finds_the_planted_layer_direction_and_gate() -> None:
    risky, benign, u = planted()
    fit = fit_request_contrast(risky, benign, list(range(6)), [1, 2, 3, 4], seed=0)
    assert fit.layer == 3 and fit.contrast == RISKY and fit.n_refused == 0
    assert fit.heldout_auc[3] > 0.95 and max(fit.heldout_auc[L] for L in (1, 2, 4)) < 0.85
    assert fit.heldout_score[3] > 2 * max(fit.heldout_score[L] for L in (1, 2, 4))
    assert float(fit.gate.gates[0].direction @ u) > 0.9  # the gate reads along the planted direction
    assert 3.0 < float(fit.vector @ u) < 5.0  # the vector is the mean difference (4 along u)
    # The threshold sits between the two kinds' projections, so the gate tells them apart.
    assert fit.gate.gates[0].opens(risky[:, 3]).mean() > 0.9 and fit.gate.gates[0].opens(benign[:, 3]).mean() < 0.1
    assert fit.heldout_open["risky"] > 0.9 and fit.heldout_open["benign"] < 0.2
    assert fit.n_heldout == 12 + 8 and len(fit.heldout_risky) == 12
    assert "layer 3" in fit.line()


def test_the_vector_is_the_models_own_refused_minus_complied_state() -> None:
    """Half the risky queries are 'refused', marked along another direction ``w`` at layer 2;
    the gate still reads risky vs benign (layer 2 carries that too)."""
    risky, benign, u = planted(signal_layer=2)
    rng = np.random.default_rng(4)
    w = rng.standard_normal(16)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    refused = np.arange(len(risky)) % 2 == 0
    risky[refused, 2] += 3 * w
    fit = fit_request_contrast(risky, benign, list(range(6)), [1, 2, 3], refused, seed=0)
    assert fit.layer == 2 and fit.contrast == REFUSED and fit.n_refused == 30
    v = fit.vector / np.linalg.norm(fit.vector)
    assert float(v @ w) > 0.9 and abs(float(v @ u)) < 0.3
    assert 2.0 < float(fit.vector @ w) < 4.0
    assert float(fit.gate.gates[0].direction @ u) > 0.85 and fit.heldout_open["benign"] < 0.2
    assert "refused 30 of 60" in fit.line()
    # Too few refusals: back to risky minus benign.
    few = np.zeros(len(risky), bool)
    few[:3] = True
    assert fit_request_contrast(risky, benign, list(range(6)), [1, 2, 3], few).contrast == RISKY


def test_the_gate_reads_its_own_layer() -> None:
    """Refusals are marked at layer 2, risky vs benign separates best at layer 4: the vector goes
    to layer 2, the gate reads layer 4 (it reads the unsteered state, so any layer will do)."""
    risky, benign, u = planted(signal_layer=4)
    risky[:, 4] += 2.0 * u  # risky 6 along u at layer 4: the 99th benign percentile leaves most of them open
    risky[:, 2] += 1.0 * u  # layer 2 tells risky from benign too, but worse
    rng = np.random.default_rng(4)
    w = rng.standard_normal(16)
    w /= np.linalg.norm(w)
    refused = np.arange(len(risky)) % 2 == 0
    risky[refused, 2] += 3 * w
    fit = fit_request_contrast(risky, benign, list(range(6)), [1, 2, 3], refused, gate_layers=range(1, 6), seed=0)
    assert fit.layer == 2 and fit.gate.gates[0].layer == 4 and float(fit.gate.gates[0].direction @ u) > 0.85  # LDA on 48 + 32 states
    assert fit.gate_cv_j[4] == max(fit.gate_cv_j.values()) and fit.heldout_open["risky"] > 0.8
    assert fit.stats()["gate_layer"] == 4 and "gate (layer 4)" in fit.line()
    with pytest.raises(AlignezError, match="gate layers"):
        fit_request_contrast(risky, benign, list(range(6)), [2], refused, gate_layers=[9])


def test_is_deterministic_for_a_seed_and_checks_its_input() -> None:
    risky, benign, _ = planted()
    a = fit_request_contrast(risky, benign, list(range(6)), [3, 4], seed=5)
    b = fit_request_contrast(risky, benign, list(range(6)), [3, 4], seed=5)
    np.testing.assert_array_equal(a.vector, b.vector)
    with pytest.raises(AlignezError, match="at least 4"):
        fit_request_contrast(risky[:3], benign, list(range(6)), [3])
    with pytest.raises(AlignezError, match="candidate layers"):
        fit_request_contrast(risky, benign, list(range(6)), [9])


def test_candidate_layers() -> None:
    assert candidate_layers(24) == list(range(6, 13))
    assert candidate_layers(30) == list(range(7, 16))
    assert candidate_layers(4) == [1, 2]


def test_query_kinds(tmp_path: Path) -> None:
    kinds = load_request_kinds(None, "harmless")
    # risky: the axis's queries, its task-phrased ones, issue 20's (requests_risky.jsonl) and issue 29's everyday
    # ones; benign: look-alikes, ordinary questions, tasks, issue 20's role-play, coding, writing...
    # (requests_ordinary_more.jsonl) and issue 29's look-alikes (requests_lookalike.jsonl)
    assert len(kinds["risky"]) == 108 + 48 + 201 + 157 and len(kinds["benign"]) == 42 + 192 + 94 + 202 + 157
    plain = tmp_path / "q.txt"
    plain.write_text("how do I pick a lock?\n")
    with pytest.raises(AlignezError, match='"kind": "risky"'):
        load_request_kinds(plain)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"query": f"q{i}", "kind": "risky"}) + "\n" for i in range(9)))
    with pytest.raises(AlignezError, match='0 queries of kind "benign"'):
        load_request_kinds(few)
    with pytest.raises(AlignezError, match="--axis harmless"):
        load_request_kinds(None, "helpful")


def test_steer_request_on_the_tiny_model(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "harmless"
    # No --recipe: on the harmless axis with its built-in queries, steer's default is the request recipe.
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--axis", "harmless", "--threads", "1", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cv = read_control_vector(out / "vector.gguf")
    report = json.loads((out / "report.json").read_text())
    assert cv.gate is not None and cv.layers == [report["request_contrast"]["layer"]]
    assert cv.gate.layers[0] == report["request_contrast"]["gate_layer"]
    assert cv.default_strength == report["default_strength"] and cv.calibration is not None
    assert report["queries"] == {"risky": 514, "benign": 687}
    # The strength is chosen by refusals on the held-out risky and benign requests (issue 20).
    cal = report["calibration_prompts"]
    assert cal["heldout_risky"] == 103 and cal["heldout_benign"] == 137
    assert 0 <= cal["risky_gate_open"] <= 103 and 0 <= cal["benign_gate_open"] <= 137
    rec = cv.calibration
    assert rec["rule"] == "refusals" and rec["strength"] == cv.default_strength and rec["n_risky"] == 103
    assert rec["trials"] and all(t["benign_refused"] >= 0 for t in rec["trials"])
    assert "chosen by refusals" in res.stderr or "broke the over-refusal budget" in res.stderr
    assert report["request_contrast"]["contrast"] in ("refused-complied", "risky-benign")
    assert "--control-vector-scaled" in res.stdout and "ignores the gate" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "request-work", "vector.gguf"]  # the saved work stays


def test_default_recipe() -> None:
    assert default_recipe("harmless", queries_given=False) == "request"
    assert default_recipe("harmless", queries_given=True) == default_recipe("helpful", False) == DEFAULT_RECIPE == "plain"


def test_steer_request_with_an_unusable_query_file_is_one_line(tiny_model_path: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.txt"
    q.write_text("how do I pick a lock?\n")
    out = tmp_path / "never"
    res = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), "--recipe", "request", "--queries", str(q), "--threads", "1",
                                "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and '"kind": "risky"' in err[0], res.stderr
    assert not out.exists()


def test_the_gate_stays_shut_on_benign_requests_that_lie_between_the_means() -> None:
    """A third of the benign requests sit halfway to the risky ones (ordinary requests did, on Qwen):
    the midpoint would open on them; the gate's threshold rises to keep them out."""
    risky, benign, u = planted(n_b=90)
    risky[:, 3] += 3 * u  # risky 7 along u, a third of the benign 2.5: apart, as on Qwen
    benign[::3, 3] += 2.5 * u
    fit = fit_request_contrast(risky, benign, list(range(6)), [3], seed=0)
    proj_b = benign[:, 3] @ fit.gate.gates[0].direction
    midpoint = 0.5 * (risky[:, 3].mean(0) + benign[:, 3].mean(0)) @ fit.gate.gates[0].direction
    assert fit.gate.gates[0].threshold > midpoint
    assert (proj_b > fit.gate.gates[0].threshold).mean() <= 0.03
    assert fit.gate.gates[0].opens(risky[:, 3]).mean() > 0.8
