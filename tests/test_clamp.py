"""The clamp form (issue 31, part 1): a vector that raises each row's component along its direction
to a target and never past it, instead of adding a constant.

The target is the file's floor (the plain answers' mean component along the unit direction) plus
strength x the direction's norm. Rows short of it move exactly to it along the direction; rows
already past it are left as the model made them. llama.cpp cannot apply it (its adapter adds a
constant), so the file says so and only alignez's runtime applies it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.align.strength_by_behaviour import choose_strengths, way_name
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import (
    ADD, ANSWER_ONLY, CLAMP, EVERY_TOKEN, KEY_CLAMP_FLOOR, KEY_FORM, ControlVector, read_control_vector, unit,
    write_control_vector,
)
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import CONTROL_VECTOR_ARCH
from alignez_local.llama.engine import Engine, Sampling

from test_behaviour import GRID, _bench, _planted
from test_serve_engine import PROMPTS

LAYER = 1


def _clamped(engine: Engine, floor: float, size: float = 6.0, seed: int = 3) -> ControlVector:
    """A random direction of norm ``size`` at LAYER, clamped with the plain mean at ``floor`` along it."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(engine.n_embd).astype(np.float32)
    d = d / np.linalg.norm(d) * np.float32(size)
    plain = {LAYER: unit(d) * floor}
    return ControlVector({LAYER: d}, model_hint=engine.arch, name="c").formed(CLAMP, plain)


# --- the file -------------------------------------------------------------------------------------


def test_clamp_round_trips_and_the_add_form_writes_nothing(tmp_path: Path) -> None:
    cv = ControlVector({1: np.ones(8, np.float32), 2: np.arange(8, dtype=np.float32)}, model_hint="llama")
    assert cv.form == ADD and KEY_FORM not in cv.metadata and "form" not in cv.describe()
    plain = {1: np.full(8, 0.5), 2: np.zeros(8)}
    clamp = cv.formed(CLAMP, plain)
    assert clamp.clamp_floor == pytest.approx({1: 0.5 * 8 / np.sqrt(8), 2: 0.0})
    a = write_control_vector(tmp_path / "a.gguf", cv)
    b = write_control_vector(tmp_path / "b.gguf", clamp.formed(ADD))
    assert a.read_bytes() == b.read_bytes()  # back to add: the file as it was
    back = read_control_vector(write_control_vector(tmp_path / "c.gguf", clamp.placed(ANSWER_ONLY)))
    assert back.form == CLAMP and back.placement == ANSWER_ONLY and back.clamp_floor == clamp.clamp_floor
    assert "clamp" in back.describe()["form"] and "constant" in back.describe()["form"]
    assert (2 * back).form == CLAMP  # scaling keeps it


def test_broken_or_unknown_clamp_files_are_one_clear_error(tmp_path: Path) -> None:
    vec = [("direction.1", np.ones(8, "<f4"))]
    future = write_gguf(tmp_path / "future.gguf", CONTROL_VECTOR_ARCH, [(KEY_FORM, GGUFValueType.STRING, "rotate")], vec)
    with pytest.raises(AlignezError, match="form 'rotate' is unknown.*upgrade"):
        read_control_vector(future)
    bare = write_gguf(tmp_path / "bare.gguf", CONTROL_VECTOR_ARCH, [(KEY_FORM, GGUFValueType.STRING, CLAMP)], vec)
    with pytest.raises(AlignezError, match="clamp_floor is missing"):
        read_control_vector(bare)
    wrong = write_gguf(tmp_path / "wrong.gguf", CONTROL_VECTOR_ARCH,
                       [(KEY_FORM, GGUFValueType.STRING, CLAMP),
                        (KEY_CLAMP_FLOOR, GGUFValueType.STRING, json.dumps({"2": 0.0}))], vec)
    with pytest.raises(AlignezError, match="needs a floor for each of its layers"):
        read_control_vector(wrong)
    with pytest.raises(AlignezError, match="unknown form"):
        ControlVector({1: np.ones(8, np.float32)}).formed("rotate")
    with pytest.raises(AlignezError, match="plain answers' mean state"):
        ControlVector({1: np.ones(8, np.float32)}).formed(CLAMP)


def test_clamp_vectors_do_not_combine_or_enter_llama_cpp_s_adapter(tiny_engine: Engine, tmp_path: Path) -> None:
    cv = _clamped(tiny_engine, 0.0)
    with pytest.raises(AlignezError, match="clamp vector raises its own direction"):
        _ = cv + cv.formed(ADD)
    with pytest.raises(AlignezError, match="llama.cpp's adapter cannot apply"):
        with cv.apply(tiny_engine):
            pass
    path = write_control_vector(tmp_path / "c.gguf", cv)
    with pytest.raises(AlignezError, match="clamp vector, which alignez serve cannot apply yet"):
        SteeringSet.load(tiny_engine, [f"c={path}"])


# --- the runtime ------------------------------------------------------------------------------


def test_clamp_raises_short_rows_to_the_target_and_leaves_the_others(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    with Steering().applied(e, prompts):
        base = e.capture(prompts, [LAYER], site="l_out", reduce="last")[:, 0].astype(np.float64)
    cv = _clamped(e, 0.0)
    u = unit(cv.directions[LAYER])
    comp = base @ u
    # A target between the rows' components: those below rise exactly to it, the rest stay.
    target = float(np.median(comp))
    strength = (target - cv.clamp_floor[LAYER]) / float(np.linalg.norm(cv.directions[LAYER]))
    with Steering.vector(cv, strength).applied(e, prompts):
        got = e.capture(prompts, [LAYER], site="l_out", reduce="last")[:, 0].astype(np.float64)
    short = comp < target - 1e-3
    assert short.any() and (~short).any()
    np.testing.assert_allclose(got[short] @ u, target, atol=1e-3)
    # only the component along u moved
    rest = (got - base) - np.outer((got - base) @ u, u)
    assert np.abs(rest).max() < 1e-3
    np.testing.assert_allclose(got[~short], base[~short], atol=1e-4)
    # a target below every row: nothing moves at all
    low = (comp.min() - 1.0 - cv.clamp_floor[LAYER]) / float(np.linalg.norm(cv.directions[LAYER]))
    with Steering.vector(cv, low).applied(e, prompts):
        same = e.capture(prompts, [LAYER], site="l_out", reduce="last")[:, 0].astype(np.float64)
    np.testing.assert_array_equal(same, base)


def test_clamp_generation_is_the_edit_written_out_by_hand(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _clamped(e, 0.5)
    d = cv.directions[LAYER].astype(np.float64)
    u, target = unit(d), 0.5 + 2.0 * float(np.linalg.norm(d))
    sp = Sampling(max_tokens=12)

    def by_hand(_layer: int, x: np.ndarray, _keys: object) -> np.ndarray:
        gap = target - x.astype(np.float64) @ u
        return x + (np.maximum(gap, 0.0)[:, None] * u).astype(np.float32)

    steered = [c.tokens for c in Steering.vector(cv, 2.0).generate(e, prompts, sp)]
    with e.activation_edit(by_hand, [LAYER], site="l_out", all_tokens=True):
        assert [c.tokens for c in e.generate(prompts, sp)] == steered
    assert steered != [c.tokens for c in Steering.vector(cv.formed(ADD), 2.0).generate(e, prompts, sp)]
    both = Steering(vectors=[VectorSlot("c", cv, 2.0)])
    assert any("clamped" in line for line in both.describe())


def test_the_search_tries_every_placement_in_every_form(tiny_engine: Engine, tiny_model_path: Path) -> None:
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    plain = {L: np.zeros(e.n_embd) for L in planted.directions}
    lines: list[str] = []
    cals = choose_strengths(_bench(e), None, planted, 5, lines.append, strengths=GRID, refine=False,
                            placements=(EVERY_TOKEN,), forms=(ADD, CLAMP), plain_mean=plain)
    cal = cals["vector"]
    assert set(cal.placements["tried"]) == {EVERY_TOKEN, way_name(EVERY_TOKEN, CLAMP)}
    assert cal.placements["chosen"] == way_name(cal.placement, cal.form)
    assert any(line.startswith("ways (choose half") and line.endswith(f"chosen: {cal.placements['chosen']}") for line in lines)
    with pytest.raises(AlignezError, match="unknown form"):
        choose_strengths(_bench(e), None, planted, 5, forms=("rotate",))
    # Clamp alone is still recorded as the way chosen (steer writes the file from it).
    alone = choose_strengths(_bench(e), None, planted, 5, strengths=GRID, refine=False, forms=(CLAMP,), plain_mean=plain)
    assert alone["vector"].form == CLAMP and alone["vector"].placement == EVERY_TOKEN


def test_the_search_goes_past_the_grid_while_nothing_breaks(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """A clamp moves a state less per unit of strength than an addition: when the largest strength
    of the grid still holds, the search doubles it until it breaks (a grid of 1 and 2 alone would
    never reach the planted behaviour, which appears near 16 on this model)."""
    from alignez_local.align.strength_by_behaviour import search_strength
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    trials = search_strength(_bench(e), lambda s: Steering.vector(planted, s), strengths=(1.0, 2.0), refine=True,
                             loop_margin=1.0)
    tried = [t.strength for t in trials]
    assert 4.0 in tried and 8.0 in tried and max(tried) <= 16.0
    assert max(t.behaviour_rate for t in trials) > 0  # it reached the behaviour
    fixed = search_strength(_bench(e), lambda s: Steering.vector(planted, s), strengths=(1.0, 2.0), refine=False,
                            loop_margin=1.0)
    assert [t.strength for t in fixed] == [1.0, 2.0]  # a grid the user gave (no refine) is kept as given
