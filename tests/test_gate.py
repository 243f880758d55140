"""Gated control vectors: the gates in the file, and the runtime steering only the prompts they open on.

A gated vector is decided per prompt before generation, from the prompt's own unsteered state at
each gate's layer (one gate, or several combined by any/all); the prompts it opens on get exactly
what the same vector ungated gives them, and the others exactly what no steering gives them in a
batch of their own (``Steering.generate(reference=True)``: in the same batch, same shapes).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from alignez_local.align.steering import Steering, VectorSlot
from alignez_local.errors import AlignezError
from alignez_local.formats.gate import KEY_GATE, Gate, Gates
from alignez_local.formats.gguf_file import read_gguf
from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector
from alignez_local.formats.gguf_write import write_gguf
from alignez_local.formats.kinds import CONTROL_VECTOR_ARCH
from alignez_local.llama.engine import Completion, Engine, Sampling, Seq

PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Write a short greeting."]


def gated(n_embd: int = 64, layer: int = 2, threshold: float = 0.5) -> ControlVector:
    rng = np.random.default_rng(3)
    u = rng.standard_normal(n_embd)
    return ControlVector({1: rng.standard_normal(n_embd).astype(np.float32), 3: rng.standard_normal(n_embd).astype(np.float32)},
                         model_hint="llama", gate=Gate(layer, (u / np.linalg.norm(u)).astype(np.float32), threshold),
                         default_strength=1.5)


def test_gate_rule() -> None:
    g = Gate(1, np.array([1.0, 0.0], dtype=np.float32), 0.25)
    states = np.array([[0.3, 9.0], [0.25, -9.0], [-1.0, 0.0]])
    assert g.opens(states).tolist() == [True, False, False]
    assert [Gate(1, g.direction, 0.25, c).opens(states).tolist() for c in (">=", "<", "<=")] == \
        [[True, True, False], [False, False, True], [False, True, True]]
    with pytest.raises(AlignezError, match="comparison"):
        Gate(1, g.direction, 0.25, "=")


def test_gates_combine_by_any_or_all() -> None:
    a = Gate(1, np.array([1.0, 0.0], dtype=np.float32), 0.0)
    b = Gate(2, np.array([0.0, 1.0], dtype=np.float32), 0.0, "<")
    states = {1: np.array([[1.0, 0], [1, 0], [-1, 0], [-1, 0]]), 2: np.array([[0, -1.0], [0, 1], [0, -1], [0, 1]])}
    assert Gates((a, b), "any").opens(states).tolist() == [True, True, True, False]
    assert Gates((a, b), "all").opens(states).tolist() == [True, False, False, False]
    assert Gates(a).opens(states).tolist() == a.opens(states[1]).tolist()
    # Known only to within a margin: a projection that near its threshold may go either way.
    near = {1: np.array([[0.05, 0], [0.05, 0], [-1, 0]]), 2: np.array([[0, -1.0], [0, 1], [0, 1]])}
    margin = {1: np.full(3, 0.1), 2: np.full(3, 0.1)}
    assert [x.tolist() for x in Gates((a, b), "any").decide(near, margin)] == [[True, True, False], [True, False, True]]
    assert [x.tolist() for x in Gates((a, b), "all").decide(near, margin)] == [[True, False, False], [False, True, True]]
    # A rescaling of the state moves a large projection further: within rescale x |projection| is unsure too.
    far = Gates(Gate(1, np.array([1.0, 0.0], dtype=np.float32), 10.0))
    assert far.decide({1: np.array([[10.5, 0], [12.0, 0]])}, {1: np.zeros(2)}, rescale=0.1)[1].tolist() == [False, True]
    with pytest.raises(AlignezError, match="rule"):
        Gates((a, b), "most")
    with pytest.raises(AlignezError, match="width"):
        Gates((a, Gate(2, np.ones(3, np.float32), 0.0)))


def test_gated_vector_round_trips(tmp_path: Path) -> None:
    cv = gated()
    back = read_control_vector(write_control_vector(tmp_path / "g.gguf", cv))
    assert back == dataclass_renamed(cv, "g")
    assert back.gate == cv.gate and isinstance(back.gate, Gates) and len(back.gate) == 1
    np.testing.assert_array_equal(back.gate.gates[0].direction, cv.gate.gates[0].direction)  # type: ignore[union-attr]
    assert back.describe()["gate"]["gates"] == [{"site": "l_out", "layer": 2, "comparison": ">", "threshold": 0.5}]
    assert KEY_GATE not in back.metadata
    assert "gated_at=2" in repr(back)


def two_gated(n_embd: int = 64, rule: str = "all") -> ControlVector:
    rng = np.random.default_rng(4)
    unit = [(u / np.linalg.norm(u)).astype(np.float32) for u in rng.standard_normal((2, n_embd))]
    return dataclasses.replace(gated(n_embd), gate=Gates((Gate(2, unit[0], 0.5), Gate(1, unit[1], -0.25, "<=")), rule))


def test_two_gate_file_round_trips_and_says_what_llama_cpp_does(tmp_path: Path) -> None:
    cv = two_gated()
    path = write_control_vector(tmp_path / "two.gguf", cv)
    back = read_control_vector(path)
    assert back == dataclass_renamed(cv, "two") and back.gate == cv.gate and back.gate.rule == "all"  # type: ignore[union-attr]
    stored = json.loads(read_gguf(path, want_data=False).metadata[KEY_GATE])
    assert stored["format"] == 2 and [g["layer"] for g in stored["gates"]] == [2, 1]
    seen = back.describe()["gate"]
    assert seen["rule"] == "all" and [(g["layer"], g["comparison"]) for g in seen["gates"]] == [(2, ">"), (1, "<=")]
    assert "plain vector" in seen["llama.cpp"] and "gated_at='all of [1, 2]'" in repr(back)
    res = subprocess.run([sys.executable, "-m", "alignez_local", "inspect", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "gate: 2 gates, the vector applies when all of them open; read by alignez-local only" in res.stdout
    assert "llama.cpp loads this file as a plain vector" in res.stdout and "  gate 2: l_out-1 projection <= -0.25" in res.stdout


def test_a_one_gate_file_keeps_the_old_form(tmp_path: Path) -> None:
    """One ">" gate is written exactly as before several gates existed: the shipped gated vector
    reads and writes back byte for byte, and the reader older alignez-local ships loads it."""
    import one_gate_reader

    shipped = Path(__file__).resolve().parents[1] / "vectors" / "qwen2.5-coder-0.5b-instruct" / "harmless.gguf"
    cv = read_control_vector(shipped)
    assert isinstance(cv.gate, Gates) and len(cv.gate) == 1 and cv.gate.gates[0].layer == 10
    again = write_control_vector(tmp_path / "harmless.gguf", cv)
    assert again.read_bytes() == shipped.read_bytes()
    stored = read_gguf(again, want_data=False).metadata[KEY_GATE]
    assert list(json.loads(stored)) == ["site", "layer", "threshold", "direction"]
    old = one_gate_reader.Gate.from_json(stored, str(again))
    assert old.layer == 10 and old.threshold == cv.gate.gates[0].threshold
    np.testing.assert_array_equal(old.direction, cv.gate.gates[0].direction)
    # A one-gate rule with another comparison cannot take the old form (an old reader would read ">").
    below = dataclasses.replace(cv, gate=Gate(10, cv.gate.gates[0].direction, 0.0, "<"))
    assert json.loads(json.dumps(below.gate.as_json()))["format"] == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("rule", ["any", "all"])
def test_an_older_reader_refuses_several_gates_in_one_line(tmp_path: Path, rule: str) -> None:
    """What every alignez-local before several gates does with such a file: it builds one Gate from
    ``alignez.gate`` and stops with one line saying why (never a vector that steers every prompt:
    a new key alone would have been kept as metadata, the vector then read as ungated)."""
    import one_gate_reader

    path = write_control_vector(tmp_path / "two.gguf", two_gated(rule=rule))
    stored = read_gguf(path, want_data=False).metadata[KEY_GATE]
    with pytest.raises(AlignezError) as err:
        one_gate_reader.Gate.from_json(stored, str(path))
    msg = str(err.value)
    assert "\n" not in msg and f"this file holds 2 gates combined by '{rule}'" in msg and "upgrade alignez-local" in msg
    # This version refuses a form newer than it knows the same way.
    newer = json.dumps({**json.loads(stored), "format": 3})
    with pytest.raises(AlignezError, match="format 3, newer than this alignez-local reads .*; upgrade alignez-local"):
        Gates.from_json(newer, "x.gguf")


def dataclass_renamed(cv: ControlVector, name: str) -> ControlVector:
    return dataclasses.replace(cv, name=name)


def test_arithmetic_keeps_or_refuses_the_gate() -> None:
    cv = gated()
    assert (cv * 2).gate == cv.gate and (-cv).gate == cv.gate
    assert (cv + cv).gate == cv.gate
    plain = ControlVector({1: np.ones(64, np.float32)})
    with pytest.raises(AlignezError, match="their gates differ"):
        cv + plain  # noqa: B018


@pytest.mark.parametrize("bad", ['{"layer": 2}', "not json", '{"site": "ffn_out", "layer": 1, "threshold": 0, "direction": [1]}',
                                 '{"layer": 1, "threshold": 0, "direction": [0, 0]}', '{"format": 2, "rule": "any", "gates": []}',
                                 '{"format": 2, "rule": "some", "gates": [{"layer": 1, "threshold": 0, "direction": [1, 0]}]}',
                                 '{"format": 2, "rule": "any", "gates": [{"layer": 1, "threshold": 0, "direction": [1, 0], '
                                 '"comparison": "!="}]}'])
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
    deep_second = dataclasses.replace(too_deep, gate=Gates((Gate(1, np.ones(64, np.float32), 0.0), too_deep.gate.gates[0])))  # type: ignore[union-attr]
    with pytest.raises(AlignezError, match="gated at layer"):
        deep_second.check_compatible(tiny_engine.n_layer, tiny_engine.n_embd, tiny_engine.arch)


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
    assert st.describe()["data"][0]["gate"] == {"site": "l_out", "layer": 2, "layers": [2], "rule": "any"}
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


# --- a shut gate is unsteered, exactly (issue 20) ------------------------------------------------

WORDS = "sea two colour greeting cat dog house river tree stone moon sun rain wind fire snow".split()
MANY = [f"Tell me about the {w}." * (1 + i % 3) for i, w in enumerate(WORDS)]  # 16 prompts, 2 waves of 8
LONG = Sampling(max_tokens=128)


def gate_for(e: Engine, prompts: list[str], opened: set[int], layer: int = 2, threshold: float = 0.0,
             comparison: str = ">") -> Gate:
    """Return a gate at ``layer`` that opens exactly on the prompts ``opened``: the min-norm w with
    state @ w = +1 there and -1 elsewhere ("<": the other way round; each prompt read alone, as the
    runtime decides), threshold 0, so every prompt is a full unit from it."""
    states = np.stack([e.capture([p], [layer], site="l_out")[0, 0] for p in prompts]).astype(np.float64)
    sign = 1.0 if comparison.startswith(">") else -1.0
    target = np.array([sign if i in opened else -sign for i in range(len(prompts))])
    w = np.linalg.lstsq(states, target, rcond=None)[0]
    scale = np.linalg.norm(w)
    return Gate(layer, (w / scale).astype(np.float32), threshold / scale, comparison)


def gate_opening_on(e: Engine, prompts: list[str], opened: set[int], layer: int = 2, seed: int = 0,
                    threshold: float = 0.0) -> ControlVector:
    """Return a gated vector (random directions at layers 1 and 3) whose one gate opens exactly on
    the prompts ``opened`` (``gate_for``)."""
    return vector_gated_by(e, gate_for(e, prompts, opened, layer, threshold), seed)


def vector_gated_by(e: Engine, gate: Gate | Gates, seed: int = 0) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector({L: (3 * rng.standard_normal(e.n_embd)).astype(np.float32) for L in (1, 3)}, gate=gate)


def same_bits(a: Completion, b: Completion) -> bool:
    return a.tokens == b.tokens and np.array_equal(a.token_logprobs, b.token_logprobs)


Mixed = tuple[list[str], list[Completion], ControlVector, set[int]]


@pytest.fixture(scope="module", params=["one gate", "any of two gates", "all of two gates"])
def mixed(tiny_engine: Engine, request: pytest.FixtureRequest) -> Mixed:
    """16 prompts, their unsteered 128-token answers, and a gated vector that opens on 4 of them,
    the two whose unsteered answers end first among them (so steering them changes when they end,
    and with it the schedule of every sequence decoded after). Its gates: one; two at layers 2 and
    1 (the second opening below its threshold) each opening on two of the 4, either opens; or two
    each opening on the 4 and two others, both must open."""
    e = tiny_engine
    prompts = [e.prompt(p) for p in MANY]
    plain = e.generate(prompts, LONG)
    early = sorted(range(len(prompts)), key=lambda i: (plain[i].n_tokens, i))[:2]
    opened = set(early) | {2, 12}
    if request.param == "one gate":
        return prompts, plain, gate_opening_on(e, prompts, opened), opened
    free = [i for i in range(len(prompts)) if i not in opened]
    if request.param == "any of two gates":
        a, b = {early[0], 2}, {early[1], 12}
        gates = Gates((gate_for(e, prompts, a), gate_for(e, prompts, b, layer=1, comparison="<")), "any")
    else:
        a, b = opened | set(free[:2]), opened | set(free[2:4])
        gates = Gates((gate_for(e, prompts, a), gate_for(e, prompts, b, layer=1, comparison="<")), "all")
    return prompts, plain, vector_gated_by(e, gates), opened


def test_shut_gate_decodes_exactly_as_unsteered(tiny_engine: Engine, mixed: Mixed) -> None:
    """A batch where the gates open on some prompts: every prompt they stay shut on gets, over 128
    greedy tokens, exactly the tokens and log-probability bits of the unsteered run of the shut
    prompts (in their order); the opened ones get exactly what the vector ungated gives them in a
    run of their own; streaming gives the same text. With ``reference=True``, the shut prompts get
    the bits of the unsteered run of the WHOLE batch (same batch, same order)."""
    e = tiny_engine
    prompts, plain, cv, opened = mixed
    st = Steering(vectors=[VectorSlot("g", cv, 1.0)])
    assert {i for i, o in enumerate(st.gates(e, prompts, st.vectors[0])) if o} == opened
    shut = [i for i in range(len(prompts)) if i not in opened]
    streamed: dict[int, str] = {}
    done: list[int] = []  # on_done: each prompt told finished once, by its index in this call
    got = st.generate(e, prompts, LONG, on_token=lambda k, t: streamed.__setitem__(k, streamed.get(k, "") + t),
                      on_done=done.append)
    assert [streamed.get(i, "") for i in range(len(prompts))] == [c.text for c in got]
    assert sorted(done) == list(range(len(prompts)))
    for i, want in zip(shut, e.generate([prompts[i] for i in shut], LONG)):
        assert same_bits(got[i], want), i
    ungated = Steering(vectors=[VectorSlot("p", dataclasses.replace(cv, gate=None), 1.0)])
    for i, want in zip(sorted(opened), ungated.generate(e, [prompts[i] for i in sorted(opened)], LONG)):
        assert same_bits(got[i], want) and got[i].tokens != plain[i].tokens, i
    # The scenario really moves the schedule: a prompt the gate opens on ends at another step.
    assert any(got[i].n_tokens != plain[i].n_tokens for i in opened)
    # reference=True: the shut prompts get the whole batch's unsteered bits, the opened ones the same.
    streamed.clear()
    done.clear()
    ref = st.generate(e, prompts, LONG, reference=True, on_token=lambda k, t: streamed.__setitem__(k, streamed.get(k, "") + t),
                      on_done=done.append)
    assert [streamed.get(i, "") for i in range(len(prompts))] == [c.text for c in ref]
    assert sorted(done) == list(range(len(prompts)))  # the opened prompts decoded twice are told once
    assert all(same_bits(ref[i], plain[i]) for i in shut) and all(same_bits(ref[i], got[i]) for i in opened)
    # The same vector loaded at strength 0, or the steering without it, is the unsteered run.
    for zero in (Steering(vectors=[VectorSlot("g", cv, 0.0)]), st.without_gated()):
        assert all(same_bits(a, b) for a, b in zip(zero.generate(e, prompts, LONG), plain))
    # Why generate decodes the shut prompts in a run of their own: the same batch in ONE run, with the
    # vector added to the opened prompts' rows only, leaves the shut prompts' rows untouched but not
    # their bits, because the opened prompts end at other steps and the later batches change shape.
    with st.applied(e, prompts):
        one_run = e.generate(prompts, LONG)
    assert any(not same_bits(one_run[i], plain[i]) for i in shut)


def test_gate_decides_each_prompt_alone(tiny_engine: Engine, mixed: Mixed) -> None:
    """A prompt's gate decision does not depend on what it is batched with (decided as read alone)."""
    e = tiny_engine
    prompts, _, cv, opened = mixed
    st = Steering(vectors=[VectorSlot("g", cv, 1.0)])
    slot = st.vectors[0]
    together = st.gates(e, prompts, slot).tolist()
    assert together == st.gates(e, prompts[::-1], slot).tolist()[::-1] == [bool(st.gates(e, [p], slot)[0]) for p in prompts]
    assert st.open_gates(e, prompts) == [frozenset({0}) if i in opened else frozenset() for i in range(len(prompts))]


def test_batched_gate_reading_decides_as_the_prompt_read_alone(tiny_engine: Engine, mixed: Mixed) -> None:
    """Gates are read in one batch, and a prompt whose projection lies within the margin of a
    threshold is read again alone: thresholds a hair either side of each prompt's alone projection
    (where the batched projection alone would decide some of them wrongly) decide as alone."""
    from alignez_local.align.gate_reading import BATCH_MARGIN, BATCH_RESCALE, read_alone, read_gates

    e = tiny_engine
    prompts = mixed[0]
    u = np.random.default_rng(7).standard_normal(e.n_embd)
    u = (u / np.linalg.norm(u)).astype(np.float32)
    alone = read_alone(e, prompts, [2])[:, 0].astype(np.float64)
    together = e.capture(prompts, [2], site="l_out")[:, 0].astype(np.float64)
    proj, moved = alone @ u.astype(np.float64), np.abs((together - alone) @ u.astype(np.float64))
    hair = float(np.median(moved[moved > 0])) / 4
    assert (moved > hair).any()  # read together, some prompts move further than the hair
    # the margin holds here
    assert (moved < BATCH_MARGIN * np.linalg.norm(together, axis=1) + BATCH_RESCALE * np.abs(together @ u.astype(np.float64))).all()
    for side in (-hair, hair):
        for comparison in (">", "<="):
            gates = [Gates(Gate(2, u, float(p + side), comparison)) for p in proj]
            got = read_gates(e, prompts, gates)
            want = np.stack([g.opens({2: alone}) for g in gates], axis=1)
            np.testing.assert_array_equal(got, want)
    # Several gate sets are read in the same batch, and a prompt given twice is read once.
    sets = [Gates(Gate(2, u, float(np.median(proj)))), cv_gates(mixed[2])]
    twice = prompts + prompts[:3]
    np.testing.assert_array_equal(read_gates(e, twice, sets),
                                  np.stack([s.opens({L: read_alone(e, twice, [L])[:, 0] for L in s.layers}) for s in sets], axis=1))


def cv_gates(cv: ControlVector) -> Gates:
    assert isinstance(cv.gate, Gates)
    return cv.gate


def test_gate_open_or_shut_on_every_prompt_is_one_plain_run(tiny_engine: Engine, mixed: Mixed) -> None:
    """Open on all: bit-identical to the same vector ungated (llama.cpp's control vector); shut on
    all: bit-identical to no steering."""
    e = tiny_engine
    prompts, plain, cv, _ = mixed
    gates = cv_gates(cv)
    moved = [Gate(g.layer, g.direction, g.threshold + (1e6 if g.comparison.startswith(">") else -1e6), g.comparison) for g in gates]
    all_shut = dataclasses.replace(cv, gate=Gates(tuple(moved), gates.rule))
    opened = [Gate(g.layer, g.direction, g.threshold - (1e6 if g.comparison.startswith(">") else -1e6), g.comparison) for g in gates]
    all_open = dataclasses.replace(cv, gate=Gates(tuple(opened), gates.rule))
    ungated = Steering(vectors=[VectorSlot("p", dataclasses.replace(cv, gate=None), 1.0)]).generate(e, prompts, LONG)
    got = Steering(vectors=[VectorSlot("g", all_open, 1.0)]).generate(e, prompts, LONG)
    assert all(same_bits(a, b) for a, b in zip(got, ungated))
    got = Steering(vectors=[VectorSlot("g", all_shut, 1.0)]).generate(e, prompts, LONG)
    assert all(same_bits(a, b) for a, b in zip(got, plain))


def test_server_shut_gate_is_the_unsteered_request(tiny_engine: Engine, mixed: Mixed, tmp_path: Path) -> None:
    """In the server's live decode (the worker's path) and its fixed batch: a request that asks for
    the gated vector and whose gate stays shut gets the bits it gets asking for nothing, beside the
    same neighbours, over 128 tokens; alone it gets what ``Steering`` and no steering give."""
    from alignez_local.apps.serve.steering import SteeringSet
    from test_serve_engine import run, run_live

    e = tiny_engine
    prompts, plain, cv, opened = mixed
    st, _ = SteeringSet.load(e, [f"g={write_control_vector(tmp_path / 'g.gguf', cv)}"])

    def live(choice: Callable[[int], dict[str, float]]) -> dict[int, Seq]:
        return run_live(e, st, {1: [(i, p, LONG, choice(i)) for i, p in enumerate(prompts)]})

    all_g = live(lambda i: {"g": 1.0})
    ref = live(lambda i: {"g": 1.0} if i in opened else {})
    for i in range(len(prompts)):
        assert all_g[i].generated == ref[i].generated and all_g[i].logprobs == ref[i].logprobs, i
        assert (all_g[i].generated == plain[i].tokens) == (i not in opened), i
    # Fixed batch (batch_edits): the shut prompts' rows are never written.
    logits, _ = run(e, st, prompts, [{"g": 1.0}] * len(prompts))
    ref_logits, _ = run(e, st, prompts, [{"g": 1.0} if i in opened else {} for i in range(len(prompts))])
    np.testing.assert_array_equal(logits, ref_logits)
    # Alone: a shut request == no steering == Steering, bit for bit.
    shut = min(i for i in range(len(prompts)) if i not in opened)
    alone = run_live(e, st, {1: [(0, prompts[shut], LONG, {"g": 1.0})]})[0]
    for want in (e.generate([prompts[shut]], LONG)[0],
                 Steering(vectors=[VectorSlot("g", cv, 1.0)]).generate(e, [prompts[shut]], LONG)[0]):
        assert alone.generated == want.tokens and np.array_equal(np.asarray(alone.logprobs), want.token_logprobs)


def test_http_shut_gate_is_the_unsteered_request(tiny_model_path: Path, tmp_path: Path) -> None:
    """Through real HTTP: four requests batched together, each asking for the gated vector; the two
    its gate stays shut on get the answers they get asking for nothing beside the same neighbours,
    and the two it opens on are steered."""
    from test_serve_http import BATCH_WAIT, LiveServer, chat_body

    texts = ["Tell me a story about the sea.", "Count to ten.", "Why is the sky blue?", "Name a colour."]
    with Engine(tiny_model_path, n_ctx=1024, n_threads=1) as e:
        cv = gate_opening_on(e, [e.prompt(t) for t in texts], {1, 3}, seed=4)
    path = write_control_vector(tmp_path / "g.gguf", cv)
    srv = LiveServer(tiny_model_path, [f"g={path}"], parallel=4, batch_wait=BATCH_WAIT, max_tokens=128)

    def together(steer: list[dict[str, float]]) -> list[str]:
        with ThreadPoolExecutor(len(texts)) as pool:
            futures = []
            for t, s in zip(texts, steer):
                futures.append(pool.submit(srv.post, "/v1/chat/completions", chat_body(t, steering=s, max_tokens=128)))
                time.sleep(0.3)  # the same arrival order every time: it is part of the batch shape
            rs = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    try:
        all_g = together([{"g": 1.0}] * 4)
        ref = together([{}, {"g": 1.0}, {}, {"g": 1.0}])
        quiet = together([{}] * 4)
    finally:
        srv.close()
    assert all_g == ref
    assert all_g[1] != quiet[1] and all_g[3] != quiet[3]
