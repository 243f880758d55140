"""Where a vector is added (issue 31, part 1): every token (llama.cpp's control vector) or only the
rows that write the answer, and the search that lets the choose half pick among ways to steer.

Answer-only steering must leave the prompt's own states as the model made them (only the last
prompt token, whose state gives the first answer token, and the generated tokens are edited), and
every runtime we own must apply it the same way: ``Steering`` (chat, eval, the API) and the
server's fixed-batch and live paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.align.strength_by_behaviour import calibrate_ways, chosen
from alignez_local.align.directions import random_like
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import (
    ANSWER_ONLY, EVERY_TOKEN, KEY_PLACEMENT, ControlVector, read_control_vector, write_control_vector,
)
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import CONTROL_VECTOR_ARCH
from alignez_local.llama.engine import Engine, Sampling

from gguf import GGUFValueType
from test_behaviour import GRID, _bench, _planted
from test_serve_engine import LONG, PROMPTS, SHORT, run, run_live

LAYER = 1


def _vector(engine: Engine, size: float = 6.0, seed: int = 3) -> ControlVector:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(engine.n_embd).astype(np.float32)
    return ControlVector({LAYER: d / np.linalg.norm(d) * np.float32(size)}, model_hint=engine.arch, name="v")


# --- the file -------------------------------------------------------------------------------------


def test_placement_round_trips_and_the_default_file_is_unchanged(tmp_path: Path) -> None:
    cv = ControlVector({1: np.ones(8, np.float32), 2: np.arange(8, dtype=np.float32)}, model_hint="llama")
    assert cv.placement == EVERY_TOKEN and KEY_PLACEMENT not in cv.metadata
    a = write_control_vector(tmp_path / "a.gguf", cv)
    b = write_control_vector(tmp_path / "b.gguf", cv.placed(ANSWER_ONLY).placed(EVERY_TOKEN))
    assert a.read_bytes() == b.read_bytes()  # every-token writes no key: files stay as they were
    ans = read_control_vector(write_control_vector(tmp_path / "c.gguf", cv.placed(ANSWER_ONLY)))
    assert ans.placement == ANSWER_ONLY and ans == dataclasses.replace(cv.placed(ANSWER_ONLY), name="c")
    assert "answer-only" in ans.describe()["placement"] and "placement" not in cv.describe()
    assert (2 * ans).placement == ANSWER_ONLY  # scaling keeps it


def test_a_placement_this_version_does_not_know_is_one_clear_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "future.gguf", CONTROL_VECTOR_ARCH,
                      [(KEY_PLACEMENT, GGUFValueType.STRING, "every-other-token")],
                      [("direction.1", np.ones(8, "<f4"))])
    with pytest.raises(AlignezError, match="placement 'every-other-token' is unknown.*upgrade"):
        read_control_vector(path)
    with pytest.raises(AlignezError, match="unknown placement"):
        ControlVector({1: np.ones(8, np.float32)}).placed("prompt")


def test_vectors_added_to_different_tokens_do_not_combine(tiny_engine: Engine) -> None:
    cv = _vector(tiny_engine)
    with pytest.raises(AlignezError, match="added to different tokens"):
        _ = cv + cv.placed(ANSWER_ONLY)
    # llama.cpp's block adds at every token: an answer-only vector says to use the runtime that can
    with pytest.raises(AlignezError, match="answer's tokens only"):
        with cv.placed(ANSWER_ONLY).apply(tiny_engine):
            pass


# --- the runtime ------------------------------------------------------------------------------


def _prompt_states(engine: Engine, prompts: list[str], steering: Steering, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (sum of the states of every prompt token but the last, the last token's state) at
    ``layer``'s output, read under ``steering``."""
    with steering.applied(engine, prompts):
        mean = engine.capture(prompts, [layer], site="l_out", reduce="mean")[:, 0]
        last = engine.capture(prompts, [layer], site="l_out", reduce="last")[:, 0]
    n = np.array([len(engine.tokenize(p)) for p in prompts], dtype=np.float64)[:, None]
    return mean.astype(np.float64) * n - last, last


def test_answer_only_steering_leaves_the_prompt_states_as_they_were(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e)
    # A layer after the steered one (edits reach it through attention), not the last: a capture of
    # the last layer makes every prompt row an output row, and the edit then sees them all.
    later = LAYER + 1
    assert later < e.n_layer - 1
    base_body, base_last = _prompt_states(e, prompts, Steering(), later)
    body, last = _prompt_states(e, prompts, Steering.vector(cv.placed(ANSWER_ONLY), 1.0), later)
    np.testing.assert_allclose(body, base_body, rtol=1e-5, atol=1e-3)  # the prompt's tokens: untouched
    assert np.abs(last - base_last).max() > 0.1  # the token that writes the first answer token: steered
    every_body, _ = _prompt_states(e, prompts, Steering.vector(cv, 1.0), later)
    assert np.abs(every_body - base_body).max() > 0.1  # llama.cpp's way moves the prompt too


def test_answer_only_steers_the_answer_and_differs_from_every_token(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e)
    sp = Sampling(max_tokens=12)
    plain = [c.tokens for c in e.generate(prompts, sp)]
    answer = [c.tokens for c in Steering.vector(cv.placed(ANSWER_ONLY), 1.0).generate(e, prompts, sp)]
    every = [c.tokens for c in Steering.vector(cv, 1.0).generate(e, prompts, sp)]
    assert answer != plain and answer != every
    # the same as the edit written out by hand: the vector added to the output rows only
    with e.activation_edit(lambda L, x, _k: x + cv.directions[L], [LAYER], site="l_out"):
        assert [c.tokens for c in e.generate(prompts, sp)] == answer
    assert any("the answer's tokens only" in line for line in Steering.vector(cv.placed(ANSWER_ONLY), 1.0).describe())


def test_the_server_applies_answer_only_vectors_as_chat_does(tiny_engine: Engine, tmp_path: Path) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e).placed(ANSWER_ONLY)
    path = write_control_vector(tmp_path / "a.gguf", cv)
    every = write_control_vector(tmp_path / "e.gguf", _vector(e, seed=5))
    st, _ = SteeringSet.load(e, [f"a={path}", f"e={every}"])
    assert st.describe()["data"][0]["placement"] == ANSWER_ONLY
    both = Steering(vectors=[VectorSlot("a", cv, 2.0), VectorSlot("e", read_control_vector(every), 1.0)])
    for choice, glob in (({"a": 2.0}, Steering.vector(cv, 2.0)), ({"a": 2.0, "e": 1.0}, both)):
        logits, texts = run(e, st, prompts, [choice] * len(prompts))
        with glob.applied(e, prompts):
            want_logits = e.next_token_logits(prompts)
        np.testing.assert_array_equal(logits, want_logits)
        assert texts == [c.text for c in glob.generate(e, prompts, Sampling(max_tokens=12))]
    # a neighbour that chose nothing is untouched
    logits, _ = run(e, st, prompts, [{}, {"a": 2.0}, {}, {}])
    quiet, _ = run(e, st, prompts, [{}] * 4)
    np.testing.assert_array_equal(logits[[0, 2, 3]], quiet[[0, 2, 3]])
    assert np.abs(logits[1] - quiet[1]).max() > 1e-3


def test_a_live_request_with_an_answer_only_vector_gets_what_chat_gives(tmp_path: Path, tiny_model_path: Path) -> None:
    e = Engine(tiny_model_path, n_ctx=1024, n_threads=1, n_parallel=4)
    cv = _vector(e).placed(ANSWER_ONLY)
    st, _ = SteeringSet.load(e, [f"a={write_control_vector(tmp_path / 'a.gguf', cv)}"])
    pa, pb = e.prompt(PROMPTS[0]), e.prompt(PROMPTS[3])
    got = run_live(e, st, {1: [(0, pa, LONG, {})], 4: [(1, pb, SHORT, {"a": 2.0})]})
    want = Steering.vector(cv, 2.0).generate(e, [pb], SHORT)[0]
    assert got[1].generated == want.tokens
    np.testing.assert_allclose(got[1].logprobs, want.token_logprobs, atol=1e-2)
    assert got[0].generated == e.generate([pa], LONG)[0].tokens  # the unsteered neighbour
    e.close()


# --- choosing the way: the choose half decides --------------------------------------------------


def test_the_way_search_picks_the_planted_better_way(tiny_engine: Engine, tiny_model_path: Path) -> None:
    """Two ways to steer with the same strength grid: the planted direction (it makes the model say
    " the") and a random one of the same norm (it does not). The search must pick the planted one,
    report only the winner on the report half, and record both ways' best choose-half trials."""
    e = tiny_engine
    planted = _planted(e, tiny_model_path, 1.0)
    decoy = ControlVector(random_like(dict(planted.directions), seed=11), model_hint=e.arch)
    noise = ControlVector(random_like(dict(planted.directions), seed=1), model_hint=e.arch)
    ways = {
        "decoy": (lambda s: Steering.vector(decoy, s), lambda s: Steering.vector(noise, s)),  # listed first: no tie win
        "planted": (lambda s: Steering.vector(planted, s), lambda s: Steering.vector(noise, s)),
    }
    seen: dict[str, list[float]] = {"decoy": [], "planted": []}
    cal = calibrate_ways(_bench(e), ways, on_trial=lambda name: lambda t: seen[name].append(t.strength),
                         strengths=GRID, loop_margin=1.0)
    assert cal.placement == "planted" and cal.placements["chosen"] == "planted"
    tried = cal.placements["tried"]
    assert set(tried) == {"decoy", "planted"} and tried["planted"]["combined"] > tried["decoy"]["combined"]
    assert seen["decoy"] and seen["planted"]  # both searched on the choose half
    assert cal.trials and all(t.strength in seen["planted"] for t in cal.trials)  # the report is the winner's
    assert cal.strength == chosen(cal.trials).strength and cal.beats_random
    assert "placements" in cal.as_dict()
    one = calibrate_ways(_bench(e), {EVERY_TOKEN: ways["planted"]}, strengths=GRID, loop_margin=1.0)
    assert "placements" not in one.as_dict() and one.placement == EVERY_TOKEN  # the default alone: the record as before
    # One way that is not the default is recorded, or the file would be written the default way.
    alone = calibrate_ways(_bench(e), {ANSWER_ONLY: ways["planted"]}, strengths=GRID, loop_margin=1.0)
    assert alone.placement == ANSWER_ONLY and alone.placements["chosen"] == ANSWER_ONLY
