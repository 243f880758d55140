"""The answer's tokens after its first N (issue 31): a vector placed ``answer-after:N`` leaves the
answer's first N tokens to the unsteered model and steers the rest, in every runtime we own.

The records script that found it (scripts/records/answer_onset.py: brief steered from its third
answer token kept more answers than from its first) counted each sequence's output rows in its own
edit; the runtime's ``AnswerEdit`` must do exactly that, in ``Steering`` (chat, eval, the API) and in
the server's fixed-batch and live paths, where keys come and go.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.steering import Steering
from alignez_local.align.strength_by_behaviour import way_name, way_parts, way_variant
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import (
    ANSWER_ONLY, CLAMP, KEY_PLACEMENT, answer_after, is_placement, placement_onset, read_control_vector,
    write_control_vector,
)
from alignez_local.llama.engine import Engine, Sampling

from test_pipeline import CLI, STEER
from test_placement import LAYER, _vector
from test_serve_engine import LONG, PROMPTS, SHORT, run, run_live


def test_the_placement_is_named_checked_and_round_trips(tmp_path: Path) -> None:
    assert placement_onset("every-token") is None and placement_onset(ANSWER_ONLY) == 0
    assert placement_onset("answer-after:2") == 2 and answer_after(2) == "answer-after:2"
    assert answer_after(0) == ANSWER_ONLY  # one name for one placement
    for bad in ("answer-after:0", "answer-after:", "answer-after:x", "answer-after:02", "answer-after:-1",
                "answer-after:99999", "answer-after 2", "prompt"):
        assert not is_placement(bad)
        with pytest.raises(AlignezError, match="unknown placement"):
            placement_onset(bad)
    cv = _vector_of_width(8).placed("answer-after:2")
    back = read_control_vector(write_control_vector(tmp_path / "a.gguf", cv))
    assert back.placement == "answer-after:2" and back.metadata[KEY_PLACEMENT] == "answer-after:2"
    assert "answer-after:2 in alignez" in back.describe()["placement"]
    # a way's recorded name keeps the colon apart from its form and variant
    name = way_name("answer-after:2", CLAMP, "layers:4,8")
    assert way_parts(name) == ("answer-after:2", CLAMP) and way_variant(name) == "layers:4,8"


def _vector_of_width(n: int):
    from alignez_local.formats.control_vector import ControlVector
    return ControlVector({1: np.ones(n, np.float32)}, model_hint="llama")


def _same_bits(a: Sequence, b: Sequence) -> None:
    assert [c.tokens for c in a] == [c.tokens for c in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.token_logprobs, y.token_logprobs)


def _counted(engine: Engine, prompts: Sequence[str], vecs: dict[int, np.ndarray], onset: int, sp: Sampling):
    """Generate with the edit written out by hand: each sequence's output rows counted, the vector
    added from the ``onset``-th (0: the last prompt token) on (as scripts/records/answer_onset.py did)."""
    seen: dict[int, int] = {}
    first = min(vecs)

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        if layer == first:
            for k in keys:
                seen[k] = seen.get(k, -1) + 1
        on = np.array([seen[k] >= onset for k in keys])
        x[on] += vecs[layer]
        return x

    with engine.activation_edit(edit, sorted(vecs), site="l_out"):
        return engine.generate(prompts, sp)


def test_the_first_n_answer_tokens_are_the_unsteered_ones_bit_for_bit(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e)
    sp = Sampling(max_tokens=12)
    plain = e.generate(prompts, sp)
    onset = 3
    after = Steering.vector(cv.placed(answer_after(onset)), 2.0).generate(e, prompts, sp)
    answer_only = Steering.vector(cv.placed(ANSWER_ONLY), 2.0).generate(e, prompts, sp)
    for p, a in zip(plain, after):
        assert a.tokens[:onset] == p.tokens[:onset]
        np.testing.assert_array_equal(a.token_logprobs[:onset], p.token_logprobs[:onset])  # the same bits
    assert [a.tokens for a in after] != [p.tokens for p in plain]  # ... and the rest is steered
    assert [a.tokens for a in after] != [a.tokens for a in answer_only]
    # exactly the hand-written count, and onset 0 is answer-only
    hand = _counted(e, prompts, {LAYER: np.float32(2.0) * cv.directions[LAYER]}, onset, sp)
    assert [c.tokens for c in hand] == [a.tokens for a in after]
    _same_bits(hand, after)
    zero = _counted(e, prompts, {LAYER: np.float32(2.0) * cv.directions[LAYER]}, 0, sp)
    assert [c.tokens for c in zero] == [a.tokens for a in answer_only]
    # an onset past the answer's length steers nothing
    late = Steering.vector(cv.placed(answer_after(12)), 2.0).generate(e, prompts, sp)
    _same_bits(late, plain)
    assert any("after its first 3" in line for line in Steering.vector(cv.placed(answer_after(3)), 2.0).describe())


def test_two_onsets_on_one_prompt_each_start_at_their_own_token(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS[:2]]
    a, b = _vector(e), _vector(e, seed=7)
    sp = Sampling(max_tokens=10)
    both = Steering.vector(a.placed(answer_after(2)), 1.5)
    both.vectors += Steering.vector(b.placed(answer_after(5)), 1.5, "b").vectors
    got = both.generate(e, prompts, sp)
    va, vb = np.float32(1.5) * a.directions[LAYER], np.float32(1.5) * b.directions[LAYER]
    seen: dict[int, int] = {}

    def edit(layer: int, x: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        for row, k in enumerate(keys):
            seen[k] = seen.get(k, -1) + 1
            for onset, v in ((2, va), (5, vb)):
                if seen[k] >= onset:
                    x[row] = x[row] + v
        return x

    with e.activation_edit(edit, [LAYER], site="l_out"):
        want = e.generate(prompts, sp)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    _same_bits(got, want)


def test_the_server_steers_after_the_onset_as_chat_does(tiny_engine: Engine, tmp_path: Path) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    cv = _vector(e).placed(answer_after(2))
    st, _ = SteeringSet.load(e, [f"a={write_control_vector(tmp_path / 'a.gguf', cv)}"])
    assert st.describe()["data"][0]["placement"] == "answer-after:2"
    logits, texts = run(e, st, prompts, [{"a": 2.0}] * len(prompts))
    np.testing.assert_array_equal(logits, e.next_token_logits(prompts))  # the first answer token: unsteered
    assert texts == [c.text for c in Steering.vector(cv, 2.0).generate(e, prompts, Sampling(max_tokens=12))]
    # a neighbour that chose nothing gets its unsteered answer
    _, mixed = run(e, st, prompts, [{}, {"a": 2.0}, {}, {}])
    _, quiet = run(e, st, prompts, [{}] * 4)
    assert [mixed[i] for i in (0, 2, 3)] == [quiet[i] for i in (0, 2, 3)] and mixed[1] == texts[1]


def test_live_requests_count_their_own_answer_tokens(tmp_path: Path, tiny_model_path: Path) -> None:
    """A request that joins mid-decode counts from its own first answer token, not the decode's."""
    e = Engine(tiny_model_path, n_ctx=1024, n_threads=1, n_parallel=4)
    cv = _vector(e).placed(answer_after(3))
    st, _ = SteeringSet.load(e, [f"a={write_control_vector(tmp_path / 'a.gguf', cv)}"])
    pa, pb = e.prompt(PROMPTS[0]), e.prompt(PROMPTS[3])
    got = run_live(e, st, {1: [(0, pa, LONG, {"a": 2.0})], 6: [(1, pb, SHORT, {"a": 2.0})]})
    for key, prompt, sp in ((0, pa, LONG), (1, pb, SHORT)):
        want = Steering.vector(cv, 2.0).generate(e, [prompt], sp)[0]
        assert got[key].generated == want.tokens
        np.testing.assert_allclose(got[key].logprobs, want.token_logprobs, atol=1e-2)
    e.close()


def test_steer_names_a_bad_placement_in_one_line(tiny_model_path: Path, tmp_path: Path) -> None:
    bad = subprocess.run(CLI + ["steer", "-m", str(tiny_model_path), *STEER, "--placements", "answer-only,answer-after:x",
                                "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--placements: unknown placement 'answer-after:x'" in bad.stderr and "answer-after:N" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_eval_s_null_is_applied_as_the_file_is(tiny_engine: Engine) -> None:
    """``alignez eval``'s random direction sits where the file's vector sits: the same placement and
    gates, norm kept for a keep-norm file (it was once added at every token whatever the file said)."""
    from alignez_local.evaluation.behaviour_eval import null_steering
    from alignez_local.formats.control_vector import KEEP_NORM
    from alignez_local.formats.gate import Gate
    e = tiny_engine
    cv = _vector(e).placed(answer_after(2)).formed(KEEP_NORM)
    gated = dataclasses.replace(cv, gate=Gate(LAYER, np.ones(e.n_embd, np.float32) / np.sqrt(e.n_embd), 0.5))
    (null,) = null_steering(Steering.vector(gated, 2.0)).values()
    rnd = null.vectors[0].vector
    assert rnd.placement == "answer-after:2" and rnd.form == KEEP_NORM and rnd.gate == gated.gate
    assert null.vectors[0].strength == 2.0 and abs(float(np.dot(rnd.directions[LAYER], cv.directions[LAYER]))) < 3.0


def test_a_gated_answer_after_vector_steers_only_the_prompts_its_gate_opens_on(tiny_engine: Engine) -> None:
    """Gates that disagree in a batch: the opened prompts get the vector from their onset, the shut
    ones nothing (``Steering.generate`` decodes them apart; ``applied`` edits per sequence)."""
    from alignez_local.formats.gate import Gate
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    d = np.random.default_rng(11).standard_normal(e.n_embd).astype(np.float32)
    d /= np.linalg.norm(d)
    states = e.capture(prompts, [LAYER], site="l_out", reduce="last")[:, 0] @ d
    threshold = float(np.median(states))  # two prompts open, two stay shut
    opened = states > threshold
    assert opened.sum() == 2
    cv = dataclasses.replace(_vector(e).placed(answer_after(1)), gate=Gate(LAYER, d, threshold))
    sp = Sampling(max_tokens=10)
    got = Steering.vector(cv, 2.0).generate(e, prompts, sp)
    _same_bits([c for c, o in zip(got, opened) if not o], e.generate([p for p, o in zip(prompts, opened) if not o], sp))
    ungated = Steering.vector(dataclasses.replace(cv, gate=None), 2.0)
    _same_bits([c for c, o in zip(got, opened) if o], ungated.generate(e, [p for p, o in zip(prompts, opened) if o], sp))
    # prefill only (applied, the per-sequence path): onset 1 leaves every first answer token
    # unsteered; onset 0 (answer-only) moves the opened prompts' and only theirs
    base = e.next_token_logits(prompts)
    with Steering.vector(cv, 2.0).applied(e, prompts):
        np.testing.assert_array_equal(e.next_token_logits(prompts), base)
    with Steering.vector(cv.placed(ANSWER_ONLY), 2.0).applied(e, prompts):
        logits = e.next_token_logits(prompts)
    np.testing.assert_array_equal(logits[~opened], base[~opened])
    assert np.abs(logits[opened] - base[opened]).max() > 1e-3
