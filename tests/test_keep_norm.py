"""The keep-norm form (issue 31, part 1: "the hidden state's norm kept"): the vector is added and each
row is scaled back to the length it had, so a state turns toward the direction without growing.
llama.cpp cannot apply it (its adapter adds a constant); only alignez's runtime does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.steering import Steering, VectorSlot, norm_kept_edit
from alignez_local.align.strength_by_behaviour import choose_strengths, way_name
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import (
    ADD, CLAMP, EVERY_TOKEN, KEEP_NORM, KEY_FORM, ControlVector, read_control_vector, write_control_vector,
)
from alignez_local.llama.engine import Engine, Sampling

from test_behaviour import GRID, _bench, _planted
from test_serve_engine import PROMPTS

LAYER = 1


def _vector(engine: Engine, size: float = 6.0, seed: int = 5) -> ControlVector:
    d = np.random.default_rng(seed).standard_normal(engine.n_embd).astype(np.float32)
    return ControlVector({LAYER: d / np.linalg.norm(d) * np.float32(size)}, model_hint=engine.arch, name="k")


def test_the_edit_turns_rows_without_changing_their_length() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(np.float32) * 4
    v = rng.standard_normal(16).astype(np.float32)
    before = x.copy()
    out = norm_kept_edit({0: {2: v}, 2: {2: v}})(2, x, [0, 1, 2])
    assert out is not None
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(before, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(out[1], before[1])  # key 1 has no vector: its row is untouched
    for r in (0, 2):  # the row points where row + v points
        want = (before[r] + v) / np.linalg.norm(before[r] + v)
        np.testing.assert_allclose(out[r] / np.linalg.norm(out[r]), want, atol=1e-6)
        assert out[r] @ v > before[r] @ v  # it moved toward the direction
    assert norm_kept_edit({0: {2: v}})(3, x.copy(), [0, 1, 2]) is None  # another layer: nothing to do


def test_the_file_records_the_form_and_keeps_it(tmp_path: Path) -> None:
    cv = ControlVector({1: np.ones(8, np.float32)}, model_hint="llama")
    kept = cv.formed(KEEP_NORM)
    assert kept.metadata[KEY_FORM] == KEEP_NORM
    back = read_control_vector(write_control_vector(tmp_path / "k.gguf", kept))
    assert back.form == KEEP_NORM and "keep-norm" in back.describe()["form"] and (2 * back).form == KEEP_NORM
    assert write_control_vector(tmp_path / "a.gguf", kept.formed(ADD)).read_bytes() == \
        write_control_vector(tmp_path / "b.gguf", cv).read_bytes()
    with pytest.raises(AlignezError, match=r"\(keep-norm\) with .* \(add\): they are applied differently"):
        _ = kept + cv


def test_generation_is_the_edit_written_out_by_hand(tiny_engine: Engine, tmp_path: Path) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e).formed(KEEP_NORM)
    v = (2.0 * cv.directions[LAYER]).astype(np.float32)
    sp = Sampling(max_tokens=12)

    def by_hand(_layer: int, x: np.ndarray, _keys: object) -> np.ndarray:
        y = x.astype(np.float64) + v
        return (y * (np.linalg.norm(x.astype(np.float64), axis=1) / np.linalg.norm(y, axis=1))[:, None]).astype(np.float32)

    steered = [c.tokens for c in Steering.vector(cv, 2.0).generate(e, prompts, sp)]
    with e.activation_edit(by_hand, [LAYER], site="l_out", all_tokens=True):
        assert [c.tokens for c in e.generate(prompts, sp)] == steered
    assert steered != [c.tokens for c in Steering.vector(cv.formed(ADD), 2.0).generate(e, prompts, sp)]
    assert any("norm kept" in line for line in Steering(vectors=[VectorSlot("k", cv, 2.0)]).describe())
    with pytest.raises(AlignezError, match="keep-norm vector, which llama.cpp's adapter cannot apply"):
        with cv.apply(e):
            pass
    with pytest.raises(AlignezError, match="keep-norm vector, which alignez serve cannot apply yet"):
        SteeringSet.load(e, [f"k={write_control_vector(tmp_path / 'k.gguf', cv)}"])


def test_the_search_tries_it_beside_the_others(tiny_engine: Engine, tiny_model_path: Path) -> None:
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    plain = {L: np.zeros(e.n_embd) for L in planted.directions}
    cal = choose_strengths(_bench(e), None, planted, 5, strengths=GRID, refine=False, placements=(EVERY_TOKEN,),
                           forms=(ADD, CLAMP, KEEP_NORM), plain_mean=plain)["vector"]
    assert set(cal.placements["tried"]) == {EVERY_TOKEN, way_name(EVERY_TOKEN, CLAMP), way_name(EVERY_TOKEN, KEEP_NORM)}
    alone = choose_strengths(_bench(e), None, planted, 5, strengths=GRID, refine=False, forms=(KEEP_NORM,))["vector"]
    assert alone.form == KEEP_NORM


def test_steer_writes_a_keep_norm_file(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "alignez_local", "steer", "-m", str(tiny_model_path), "--limit", "12",
                          "--response-tokens", "24", "--strengths", "1,8", "--threads", "1", "--forms", "keep-norm",
                          "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_control_vector(out / "vector.gguf").form == KEEP_NORM
    assert "llama.cpp cannot apply every-token, keep-norm" in res.stdout
