"""Gated control vectors: the gate in the file, and the runtime steering only the prompts it opens on.

A gated vector is decided per prompt before generation, from the prompt's own unsteered state at
the gate's layer; the prompts it opens on get exactly what the same vector ungated gives them, and
the others exactly what no steering gives them (same batch, same shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import KEY_GATE, ControlVector, Gate, read_control_vector, write_control_vector
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import CONTROL_VECTOR_ARCH
from alignez_local.llama.engine import Engine, Sampling

PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Write a short greeting."]


def gated(n_embd: int = 64, layer: int = 2, threshold: float = 0.5) -> ControlVector:
    rng = np.random.default_rng(3)
    u = rng.standard_normal(n_embd)
    return ControlVector({1: rng.standard_normal(n_embd).astype(np.float32), 3: rng.standard_normal(n_embd).astype(np.float32)},
                         model_hint="llama", gate=Gate(layer, (u / np.linalg.norm(u)).astype(np.float32), threshold),
                         default_strength=1.5)


def test_gate_rule() -> None:
    g = Gate(1, np.array([1.0, 0.0], dtype=np.float32), 0.25)
    assert g.opens(np.array([[0.3, 9.0], [0.25, -9.0], [-1.0, 0.0]])).tolist() == [True, False, False]


def test_gated_vector_round_trips(tmp_path: Path) -> None:
    cv = gated()
    back = read_control_vector(write_control_vector(tmp_path / "g.gguf", cv))
    assert back == dataclass_renamed(cv, "g")
    assert back.gate == cv.gate and back.gate is not None
    np.testing.assert_array_equal(back.gate.direction, cv.gate.direction)  # type: ignore[union-attr]
    assert back.describe()["gate"] == {"site": "l_out", "layer": 2, "threshold": 0.5}
    assert KEY_GATE not in back.metadata
    assert "gated_at=2" in repr(back)


def dataclass_renamed(cv: ControlVector, name: str) -> ControlVector:
    import dataclasses
    return dataclasses.replace(cv, name=name)


def test_arithmetic_keeps_or_refuses_the_gate() -> None:
    cv = gated()
    assert (cv * 2).gate == cv.gate and (-cv).gate == cv.gate
    assert (cv + cv).gate == cv.gate
    plain = ControlVector({1: np.ones(64, np.float32)})
    with pytest.raises(AlignezError, match="their gates differ"):
        cv + plain  # noqa: B018


@pytest.mark.parametrize("bad", ['{"layer": 2}', "not json", '{"site": "ffn_out", "layer": 1, "threshold": 0, "direction": [1]}',
                                 '{"layer": 1, "threshold": 0, "direction": [0, 0]}'])
def test_damaged_gate_is_one_clear_error(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.gguf"
    write_gguf(path, CONTROL_VECTOR_ARCH, [(KEY_GATE, GGUFValueType.STRING, bad)],
               [("direction.1", np.ones(2, dtype="<f4"))])
    with pytest.raises(AlignezError, match="gate"):
        read_control_vector(path)


def test_gate_width_and_layer_are_checked(tiny_engine: Engine) -> None:
    with pytest.raises(AlignezError, match="width"):
        ControlVector({1: np.ones(64, np.float32)}, gate=Gate(1, np.ones(8, np.float32), 0.0))
    too_deep = ControlVector({1: np.ones(64, np.float32)}, gate=Gate(tiny_engine.n_layer, np.ones(64, np.float32), 0.0))
    with pytest.raises(AlignezError, match="gated at layer"):
        too_deep.check_compatible(tiny_engine.n_layer, tiny_engine.n_embd, tiny_engine.arch)


def test_gated_vector_steers_only_the_prompts_its_gate_opens_on(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    layer = 2
    states = e.capture(prompts, [layer], site="l_out")[:, 0].astype(np.float64)
    # A gate that opens on prompts 0 and 2 only: the direction from the others' mean to theirs.
    u = states[[0, 2]].mean(0) - states[[1, 3]].mean(0)
    u /= np.linalg.norm(u)
    proj = states @ u
    threshold = float((proj[[0, 2]].min() + proj[[1, 3]].max()) / 2)
    rng = np.random.default_rng(5)
    dirs = {L: (3 * rng.standard_normal(e.n_embd)).astype(np.float32) for L in (1, 3)}
    cv = ControlVector(dirs, gate=Gate(layer, u.astype(np.float32), threshold))
    plain_cv = ControlVector(dirs)
    gate_st = Steering(vectors=[VectorSlot("g", cv, 0.8)])
    assert gate_st.gates(e, prompts, gate_st.vectors[0]).tolist() == [True, False, True, False]
    sp = Sampling(max_tokens=10)
    with gate_st.applied(e, prompts):
        got = e.next_token_logits(prompts)
    got_texts = [c.text for c in gate_st.generate(e, prompts, sp)]
    with Steering(vectors=[VectorSlot("p", plain_cv, 0.8)]).applied(e, prompts):
        steered = e.next_token_logits(prompts)
    steered_texts = [c.text for c in Steering(vectors=[VectorSlot("p", plain_cv, 0.8)]).generate(e, prompts, sp)]
    plain = e.next_token_logits(prompts)
    plain_texts = [c.text for c in e.generate(prompts, sp)]
    for i in (0, 2):
        np.testing.assert_allclose(got[i], steered[i], atol=1e-4)
        assert got_texts[i] == steered_texts[i]
    for i in (1, 3):
        np.testing.assert_array_equal(got[i], plain[i])
        assert got_texts[i] == plain_texts[i]
    assert np.abs(steered[0] - plain[0]).max() > 1e-2  # the vector really steers
    assert any("gated at layer 2" in line for line in gate_st.describe())


def test_server_applies_the_gate_per_request(tiny_engine: Engine, tmp_path: Path) -> None:
    """Through the server's steering (fixed batch and live decode): a gated vector reaches the
    requests its gate opens on, with the tokens ``Steering`` gives them, and nobody else."""
    from alignez_local.apps.serve.steering import SteeringSet
    from test_serve_engine import SHORT, run, run_live

    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    states = e.capture(prompts, [2], site="l_out")[:, 0].astype(np.float64)
    u = states[[0, 2]].mean(0) - states[[1, 3]].mean(0)
    u /= np.linalg.norm(u)
    proj = states @ u
    rng = np.random.default_rng(9)
    cv = ControlVector({L: (3 * rng.standard_normal(e.n_embd)).astype(np.float32) for L in (1, 3)},
                       gate=Gate(2, u.astype(np.float32), float((proj[[0, 2]].min() + proj[[1, 3]].max()) / 2)))
    st, _ = SteeringSet.load(e, [f"g={write_control_vector(tmp_path / 'g.gguf', cv)}"])
    assert st.describe()["data"][0]["gate"] == {"site": "l_out", "layer": 2}
    # Fixed batch: everyone asks for it; only prompts 0 and 2 get it.
    logits, _ = run(e, st, prompts, [{"g": 1.0}] * 4)
    plain_logits, _ = run(e, st, prompts, [{}] * 4)
    with Steering(vectors=[VectorSlot("g", cv, 1.0)]).applied(e, prompts):
        want = e.next_token_logits(prompts)
    np.testing.assert_array_equal(logits[[1, 3]], plain_logits[[1, 3]])
    np.testing.assert_allclose(logits[[0, 2]], want[[0, 2]], atol=1e-4)
    assert np.abs(logits[0] - plain_logits[0]).max() > 1e-2
    # Live decode: a request the gate opens on, then one it stays shut on, each asking for it.
    for i in (0, 1):
        got = run_live(e, st, {1: [(0, prompts[3], SHORT, {})], 3: [(1, prompts[i], SHORT, {"g": 1.0})]})
        alone = Steering(vectors=[VectorSlot("g", cv, 1.0)]).generate(e, [prompts[i]], SHORT)[0]
        assert got[1].generated == alone.tokens, i
        # open: steered (differs from unsteered); shut: unsteered
        assert (alone.tokens == e.generate([prompts[i]], SHORT)[0].tokens) == (i == 1)
