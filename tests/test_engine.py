"""The engine on real llama.cpp: capture reads the right tensor at the right token, both steering
paths land on the intended layer, batching and seeds behave, and steering never leaks out."""

from __future__ import annotations

import numpy as np
import pytest

from alignez_local.llama.engine import Engine, Sampling
from alignez_local.errors import AlignezError

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do I sort a list?"]


def _output_weights(path) -> tuple[np.ndarray, np.ndarray, float]:
    import gguf

    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    norm = np.array(t["output_norm.weight"].data, dtype=np.float64)
    out = np.array(t["output.weight"].data, dtype=np.float64)  # (n_vocab, n_embd)
    return norm, out, 1e-5


def test_last_layer_capture_reproduces_logits(tiny_engine: Engine, tiny_model_path) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    resid = e.capture(prompts, [e.n_layer - 1], site="l_out")[:, 0].astype(np.float64)
    norm, out, eps = _output_weights(tiny_model_path)
    x = resid / np.sqrt((resid**2).mean(axis=1, keepdims=True) + eps) * norm
    ours = x @ out.T
    theirs = e.next_token_logits(prompts)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=1e-4)
    # and a wrong token (the one before last) must not reproduce them
    shorter = [p[:-1] for p in prompts]
    wrong = e.capture(shorter, [e.n_layer - 1], site="l_out")[:, 0].astype(np.float64)
    xw = wrong / np.sqrt((wrong**2).mean(axis=1, keepdims=True) + eps) * norm
    assert np.abs(xw @ out.T - theirs).max() > 0.1


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_edit_hook_and_cvec_give_same_logits(which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    e: Engine = request.getfixturevalue(f"{which}_engine")
    prompts = [e.prompt(p) for p in PROMPTS[:2]]
    layer = e.n_layer // 2
    v = np.random.default_rng(1).standard_normal(e.n_embd).astype(np.float32)
    # A shared prompt prefix is decoded once for the control vector (global) but not under an
    # every-token edit hook (its rows belong to no request), and on quantized models the batch shape
    # moves the logits: compare like shapes with like.
    monkeypatch.setattr(e, "share_prefix", False)
    base = e.next_token_logits(prompts)
    with e.control_vector({layer: v}):
        via_cvec = e.next_token_logits(prompts)
    with e.activation_edit(lambda _l, x, _k: x + v, [layer], site="l_out", all_tokens=True):
        via_hook = e.next_token_logits(prompts)
    assert np.abs(via_cvec - base).max() > 0.01, "the vector must change the logits"
    np.testing.assert_array_equal(via_cvec, via_hook)


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_vector_at_layer_n_changes_exactly_that_layer(which: str, request: pytest.FixtureRequest) -> None:
    e: Engine = request.getfixturevalue(f"{which}_engine")
    prompts = [e.prompt(p) for p in PROMPTS]
    layer = e.n_layer - 2
    v = np.random.default_rng(2).standard_normal(e.n_embd).astype(np.float32)
    before = e.capture(prompts, [layer - 1, layer], site="l_out")
    with e.control_vector({layer: v}):
        after = e.capture(prompts, [layer - 1, layer], site="l_out")
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    np.testing.assert_allclose(after[:, 1] - before[:, 1], np.broadcast_to(v, (len(prompts), e.n_embd)), atol=1e-4)


def test_default_edit_touches_only_the_output_position(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompt = e.prompt(PROMPTS[0])
    n = len(e.tokenize(prompt))
    v = np.ones(e.n_embd, dtype=np.float32)
    base_last = e.capture([prompt], [2], site="l_out")[0, 0]
    base_rest = e.capture([prompt], [2], site="l_out", reduce="mean")[0, 0] * n - base_last
    seen: list[int] = []

    def edit(layer: int, x: np.ndarray, keys) -> np.ndarray:
        seen.append(x.shape[0])
        return x + v

    with e.activation_edit(edit, [2], site="l_out"):
        last = e.capture([prompt], [2], site="l_out")[0, 0]
        rest = e.capture([prompt], [2], site="l_out", reduce="mean")[0, 0] * n - last
    assert seen and all(r == 1 for r in seen)
    np.testing.assert_allclose(last - base_last, v, atol=1e-4)
    np.testing.assert_allclose(rest, base_rest, atol=1e-3)


def test_capture_in_a_batch_equals_capture_alone(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    layers = list(range(e.n_layer))
    together = e.capture(prompts, layers, site="ffn_out")
    alone = np.stack([e.capture([p], layers, site="ffn_out")[0] for p in prompts])
    assert together.shape == (3, e.n_layer, e.n_embd) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert np.abs(together[0] - together[1]).max() > 1e-3


def test_capture_more_texts_than_slots_and_long_texts(tiny_model_path) -> None:
    e = Engine(tiny_model_path, n_ctx=2048, n_parallel=2, n_batch=64)
    texts = [f"the cat {'and you ' * (i * 7)} is" for i in range(5)]  # up to ~150 tokens: several batches
    together = e.capture(texts, [1, 3], site="l_out")
    alone = np.stack([e.capture([t], [1, 3], site="l_out")[0] for t in texts])
    # A text split over several decodes rounds differently (F16 KV cache) than one decoded whole.
    np.testing.assert_allclose(together, alone, rtol=1e-3, atol=2e-3)
    e.close()


def test_capture_stops_at_its_deepest_layer_with_the_same_bits(tiny_model_path) -> None:
    """A capture stops the graph after its deepest captured node (nothing after it is read): the
    rows are bit for bit those of the whole graph, also for texts split over several decodes (whose
    later parts read the earlier parts' KV cells, written only up to that layer), and the engine's
    next run is whole again."""
    e = Engine(tiny_model_path, n_ctx=2048, n_parallel=2, n_batch=64)
    texts = [f"the cat {'and you ' * (i * 7)} is" for i in range(5)]
    early = e.capture(texts, [1], site="l_out")
    e.stop_captures_early = False
    whole = e.capture(texts, [1], site="l_out")
    e.stop_captures_early = True
    np.testing.assert_array_equal(early, whole)
    # It really stops: an edit watching a deeper layer is never reached (it is, reading the whole graph).
    seen: list[int] = []
    with e.activation_edit(lambda layer, x, keys: seen.append(layer), [3], site="l_out"):
        e.capture(texts, [1], site="l_out")
        assert seen == []
        e.stop_captures_early = False
        e.capture(texts, [1], site="l_out")
        e.stop_captures_early = True
    assert seen and set(seen) == {3}
    logits = e.next_token_logits(texts[:2])
    e.capture(texts[:2], [0], site="l_out")
    np.testing.assert_array_equal(e.next_token_logits(texts[:2]), logits)
    e.close()


def test_parallel_generation_equals_one_by_one(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    sp = Sampling(max_tokens=24)
    together = [c.text for c in e.generate(prompts, sp)]
    alone = [e.generate([p], sp)[0].text for p in prompts]
    assert together == alone
    assert len(set(together)) == 3


def test_same_seed_same_output(smollm_engine: Engine) -> None:
    e = smollm_engine
    prompts = [e.prompt("Tell me a short story about a fox.")] * 2
    sp = Sampling(temperature=1.0, top_p=0.95, seed=7, max_tokens=24)
    a = e.generate(prompts, [sp, Sampling(temperature=1.0, top_p=0.95, seed=8, max_tokens=24)])
    b = e.generate(prompts, [sp, Sampling(temperature=1.0, top_p=0.95, seed=8, max_tokens=24)])
    assert [c.text for c in a] == [c.text for c in b]
    assert a[0].text != a[1].text, "different seeds should sample differently"


def test_steering_leaves_no_trace(smollm_engine: Engine) -> None:
    e = smollm_engine
    prompts = [e.prompt(p) for p in PROMPTS]
    sp = Sampling(max_tokens=16)
    base = [c.text for c in e.generate(prompts, sp)]
    v = np.random.default_rng(3).standard_normal(e.n_embd).astype(np.float32) * 8
    with e.control_vector({12: v}):
        steered = [c.text for c in e.generate(prompts, sp)]
    assert steered != base
    assert [c.text for c in e.generate(prompts, sp)] == base
    with e.activation_edit(lambda _l, x, _k: x + v, [12], site="l_out"):
        edited = [c.text for c in e.generate(prompts, sp)]
    assert edited != base
    assert [c.text for c in e.generate(prompts, sp)] == base
    with pytest.raises(RuntimeError):
        with e.control_vector({12: v}):
            raise RuntimeError("boom")
    assert [c.text for c in e.generate(prompts, sp)] == base


def test_streaming_and_stop_strings(smollm_engine: Engine) -> None:
    e = smollm_engine
    prompt = e.prompt("Count from one to ten in words, separated by commas.")
    pieces: list[str] = []
    full = e.generate([prompt], Sampling(max_tokens=40), on_token=lambda i, s: pieces.append(s))[0]
    assert "".join(pieces) == full.text and len(pieces) > 3
    word = full.text.split()[2]
    cut = e.generate([prompt], Sampling(max_tokens=40, stop=(word,)), on_token=lambda i, s: pieces.append(s))[0]
    assert cut.finish_reason == "stop" and word not in cut.text and full.text.startswith(cut.text)


def test_model_facts_and_templates(smollm_engine: Engine, tiny_engine: Engine) -> None:
    assert (smollm_engine.n_layer, smollm_engine.n_embd, smollm_engine.arch) == (30, 576, "llama")
    assert smollm_engine.is_chat and "<|im_start|>assistant" in smollm_engine.prompt("hi")
    assert "<|im_start|>system\nBe brief." in smollm_engine.prompt("hi", system="Be brief.")


def test_bad_requests_are_refused(tiny_engine: Engine) -> None:
    e = tiny_engine
    with pytest.raises(AlignezError, match="layer 9 does not exist"):
        e.capture(["hi"], [9])
    with pytest.raises(AlignezError, match="takes layers 1"):
        with e.control_vector({0: np.zeros(e.n_embd, np.float32)}):
            pass
    with pytest.raises(AlignezError, match="width 10"):
        with e.control_vector({1: np.zeros(10, np.float32)}):
            pass
    with pytest.raises(AlignezError, match="NaN"):
        with e.control_vector({1: np.full(e.n_embd, np.nan, np.float32)}):
            pass
    with pytest.raises(AlignezError, match="does not fit the context"):
        e.generate(["the " * 3000], Sampling(max_tokens=4))
    with pytest.raises(AlignezError, match="top_p"):
        e.generate(["hi"], Sampling(top_p=0))


def test_ffn_out_edit_runs_once_per_layer_with_a_control_vector(tiny_engine: Engine) -> None:
    # With a control vector set, llama.cpp's graph has a second node named ffn_out-N (the residual
    # sum); an edit or capture of ffn_out must see the MLP output once, not both nodes.
    e = tiny_engine
    prompts = [e.prompt(p) for p in PROMPTS[:2]]
    calls: dict[int, int] = {}

    def count(layer: int, x: np.ndarray, _keys: object) -> None:
        calls[layer] = calls.get(layer, 0) + 1
        return None

    plain = e.capture(prompts, [1, 2], site="ffn_out")
    v = np.random.default_rng(3).standard_normal(e.n_embd).astype(np.float32)
    with e.control_vector({2: v}):
        with_vec = e.capture(prompts, [1, 2], site="ffn_out")
        with e.activation_edit(count, [1, 2], site="ffn_out"):
            e.next_token_logits(prompts[:1])
    # the vector is added after ffn_out-2, so neither layer's MLP output moves ...
    np.testing.assert_array_equal(with_vec, plain)
    # ... and each wanted node was handled once in the one decode
    assert calls == {1: 1, 2: 1}


def test_generation_can_decode_the_prompts_shared_head_once(smollm_engine: Engine) -> None:
    """``generate(share_prefix=True)``: the system prompt every prompt shares is decoded once and
    copied (calibration and pair generation use it). The answers are those of other batch shapes:
    where both pick the same first token its log-probability agrees to llama.cpp's batch-shape
    rounding (0.07 here); at a near tie the greedy choice can flip ("Say hello.": 'Hello' 27.02
    against 'I' 26.98 in logits), as it does between a prompt decoded alone and in a batch."""
    e = smollm_engine
    system = "You are a careful assistant who answers every question in one short sentence."
    prompts = [e.prompt(q, system) for q in ("Name a fruit.", "What colour is the sky?", "Say hello.")]
    head = min(len(e.tokenize(p)) for p in prompts)
    shared = next(i for i in range(head) if len({tuple(e.tokenize(p)[:i + 1]) for p in prompts}) > 1)
    assert shared >= 16, "the prompts must share a head long enough to be shared"
    sp = Sampling(temperature=0.0, max_tokens=8)
    before = e.counts.snapshot()
    plain = e.generate(prompts, sp)
    read_plain = e.counts.since(before).tokens
    before = e.counts.snapshot()
    once = e.generate(prompts, sp, share_prefix=True)
    read_once = e.counts.since(before).tokens
    assert read_plain - read_once == (len(prompts) - 1) * shared
    same = [(a, b) for a, b in zip(once, plain) if a.tokens[:1] == b.tokens[:1]]
    assert len(same) >= 2
    np.testing.assert_allclose([a.token_logprobs[0] for a, _ in same], [b.token_logprobs[0] for _, b in same], atol=0.15)
