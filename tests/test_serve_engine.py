"""Per-request steering inside one decode batch, checked on the engine itself (no HTTP).

Isolation: an unsteered sequence decoded beside steered neighbours gets bit-identical logits and
tokens to the same sequence decoded beside unsteered neighbours, in the same batch shapes.
Correctness: a sequence steered per request gets exactly what the global steering (``Steering``,
the path ``alignez chat`` takes) gives the same batch.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot
from alignez_local.apps.serve.steering import SteeringSet, parse_named_spec
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.formats.profile import SteeringProfile, save_profile
from alignez_local.llama.engine import Engine, Sampling

PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name a colour.", "Write a short greeting."]
SMOL_DIR = Path(__file__).resolve().parents[1] / "vectors" / "smollm2-135m-instruct"


def tiny_files(d: Path, n_layer: int = 4, n_embd: int = 64) -> tuple[Path, Path]:
    """Write a control vector and a profile that fit the tiny model; return their paths."""
    rng = np.random.default_rng(7)
    cv = ControlVector({L: rng.standard_normal(n_embd).astype(np.float32) for L in range(1, n_layer)}, model_hint="llama")
    subspaces = {L: np.linalg.qr(rng.standard_normal((n_embd, 2)))[0].T.astype(np.float32) for L in range(1, n_layer)}
    prof = SteeringProfile(
        subspaces=subspaces, site="ffn_out", method="svd", axis={"name": "t", "positive": "a", "negative": "b"},
        layer_stats={L: {"k": 2} for L in subspaces}, params={},
        provenance={"n_layer": n_layer, "n_embd": n_embd, "arch": "llama"},
    )
    return write_control_vector(d / "tv.gguf", cv), save_profile(d / "tp.profile.gguf", prof)


@pytest.fixture(scope="module")
def tiny_set(tiny_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> SteeringSet:
    v, p = tiny_files(tmp_path_factory.mktemp("serve_steer"))
    st, _ = SteeringSet.load(tiny_engine, [f"v={v}:3"], [f"p={p}:2"])
    return st


def run(engine: Engine, st: SteeringSet, prompts: list[str], choices: list[dict[str, float]]) -> tuple[np.ndarray, list[str]]:
    """Return (next-token logits, greedy texts) of ``prompts`` decoded together, each with its choice."""
    sp = Sampling(max_tokens=12)
    with ExitStack() as stack:
        for e in st.batch_edits(engine, prompts, choices):
            stack.enter_context(engine.activation_edit(e.fn, e.layers, e.site, e.all_tokens))
        logits = engine.next_token_logits(prompts)
    with ExitStack() as stack:
        for e in st.batch_edits(engine, prompts, choices):
            stack.enter_context(engine.activation_edit(e.fn, e.layers, e.site, e.all_tokens))
        texts = [c.text for c in engine.generate(prompts, sp)]
    return logits, texts


def check_isolation(engine: Engine, st: SteeringSet) -> None:
    prompts = [engine.prompt(p) for p in PROMPTS]
    names = list(st.items)
    quiet = [{}, {}, {}, {}]
    mixed = [{}, {names[0]: 3.0}, {}, {n: 2.0 for n in names}]
    base_logits, base_texts = run(engine, st, prompts, quiet)
    logits, texts = run(engine, st, prompts, mixed)
    for i in (0, 2):  # the unsteered ones: exactly the same
        np.testing.assert_array_equal(logits[i], base_logits[i])
        assert texts[i] == base_texts[i]
    for i in (1, 3):  # the steered ones really were steered
        assert np.abs(logits[i] - base_logits[i]).max() > 1e-3


def test_unsteered_neighbours_are_bit_identical_tiny(tiny_engine: Engine, tiny_set: SteeringSet) -> None:
    check_isolation(tiny_engine, tiny_set)


@pytest.mark.smollm
def test_unsteered_neighbours_are_bit_identical_smollm(smollm_engine: Engine) -> None:
    st, _ = SteeringSet.load(smollm_engine, [str(SMOL_DIR / "helpful.gguf") + ":4"], [str(SMOL_DIR / "helpful.profile.gguf")])
    check_isolation(smollm_engine, st)


def test_per_request_steering_equals_global_steering(tiny_engine: Engine, tiny_set: SteeringSet) -> None:
    """Every sequence of a batch steered per request == the whole batch under ``Steering`` (chat's path)."""
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    v, p = tiny_set.items["v"], tiny_set.items["p"]
    for choice, glob in [
        ({"v": 3.0}, Steering(vectors=[VectorSlot("v", v.item, 3.0)])),  # type: ignore[arg-type]
        ({"p": 2.0}, Steering(profiles=[ProfileSlot("p", p.item, 2.0)])),  # type: ignore[arg-type]
    ]:
        logits, texts = run(e, tiny_set, prompts, [choice] * len(prompts))
        with glob.applied(e, prompts):
            want_logits = e.next_token_logits(prompts)
        want_texts = [c.text for c in glob.generate(e, prompts, Sampling(max_tokens=12))]
        np.testing.assert_array_equal(logits, want_logits)
        assert texts == want_texts


def test_vector_and_profile_together_edit_the_mlp_output_once(tiny_engine: Engine, tiny_set: SteeringSet) -> None:
    """A vector plus an ffn_out profile == the profile's plans, then the vector added by a hook.

    Not compared with llama.cpp's in-graph control vector here: with one active, llama.cpp names
    two nodes per layer ``ffn_out-N`` (the MLP output and the residual sum), so the global path
    edits both; the per-request path edits the MLP output only, as the method says.
    """
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    vecs = Steering(vectors=[VectorSlot("v", tiny_set.items["v"].item, -1.5)]).vector_sum(e.n_layer)  # type: ignore[arg-type]
    prof = Steering(profiles=[ProfileSlot("p", tiny_set.items["p"].item, 0.5)])  # type: ignore[arg-type]
    logits, _ = run(e, tiny_set, prompts, [{"v": -1.5, "p": 0.5}] * len(prompts))
    with prof.applied(e, prompts):  # plans made here, from the unsteered model
        with e.activation_edit(lambda layer, x, _k: x + vecs[layer], sorted(vecs), site="l_out", all_tokens=True):
            want = e.next_token_logits(prompts)
    np.testing.assert_array_equal(logits, want)


def test_resolve_request_field(tiny_set: SteeringSet) -> None:
    assert tiny_set.resolve(None) == {"v": 3.0, "p": 2.0}  # absent: the server's defaults
    assert tiny_set.resolve({}) == {} and tiny_set.resolve(0) == {}
    assert tiny_set.resolve({"v": 0, "p": -1}) == {"p": -1.0}
    for bad, words in [({"nope": 1}, "unknown steering name 'nope'"), ({"v": 101}, "out of range"),
                       ({"v": "1"}, "must be a number"), ([1], "must be an object"), (True, "must be an object")]:
        with pytest.raises(AlignezError, match=words):
            tiny_set.resolve(bad)


def test_named_specs(tmp_path: Path) -> None:
    assert parse_named_spec("helpful=a.gguf:0.5") == ("helpful", "a.gguf", 0.5)
    assert parse_named_spec("a.gguf") == (None, "a.gguf", None)
    odd = tmp_path / "x=y.gguf"
    odd.write_bytes(b"")
    assert parse_named_spec(str(odd)) == (None, str(odd), None)
    with pytest.raises(AlignezError, match="out of range"):
        parse_named_spec("h=a.gguf:500")
