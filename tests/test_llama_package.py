"""The llama package's own contracts: imports, lifetime (no Engine -> callback -> Engine cycle, no
leak when loading fails half-way), the one control-vector buffer, and log-probabilities."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax

from alignez_local.errors import AlignezError
from alignez_local.llama import Completion, Engine, Sampling, cvec_buffer
from alignez_local.llama import engine as engine_module
from alignez_local.llama import hooks


def test_both_import_paths_give_the_same_objects() -> None:
    assert engine_module.Engine is Engine and engine_module.Sampling is Sampling
    assert engine_module.Completion is Completion and callable(engine_module.physical_cores)


def test_dropped_engine_is_freed_without_the_garbage_collector(tiny_model_path: Path) -> None:
    gc.disable()
    try:
        e = Engine(tiny_model_path, n_ctx=256, n_parallel=2)
        e.generate(["hi"], Sampling(max_tokens=2))
        handle = e._hooks.handle
        ref = weakref.ref(e)
        del e
        assert ref() is None, "something still holds the engine: a callback cycle?"
        assert handle not in hooks._states
    finally:
        gc.enable()


def test_model_is_freed_when_reading_its_facts_fails(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Engine] = []

    def boom(self: Engine) -> None:
        seen.append(self)
        raise AlignezError("metadata unreadable")

    monkeypatch.setattr(Engine, "_read_model_facts", boom)
    with pytest.raises(AlignezError, match="metadata unreadable"):
        Engine(tiny_model_path, n_ctx=256)
    [half] = seen
    assert half._closed and half._model is None


def test_messages_name_parameters_not_flags(tiny_model_path: Path) -> None:
    with pytest.raises(AlignezError, match="^n_parallel 0 is out of range"):
        Engine(tiny_model_path, n_parallel=0)
    with pytest.raises(AlignezError, match="^n_ctx 1 is out of range"):
        Engine(tiny_model_path, n_ctx=1)
    with pytest.raises(AlignezError, match="^temperature 9"):
        Sampling(temperature=9).check()


def test_cvec_buffer_layout_sums_and_checks() -> None:
    n_layer, n_embd = 4, 3
    a = {1: np.ones(n_embd), 3: np.arange(n_embd)}
    b = {1: np.full(n_embd, 2.0)}
    buf = cvec_buffer([a, b], n_layer, n_embd).reshape(n_layer - 1, n_embd)
    np.testing.assert_array_equal(buf, [[3, 3, 3], [0, 0, 0], [0, 1, 2]])
    assert buf.dtype == np.float32
    np.testing.assert_array_equal(cvec_buffer(a, n_layer, n_embd), cvec_buffer([a], n_layer, n_embd))
    with pytest.raises(AlignezError, match="takes layers 1..3"):
        cvec_buffer({0: np.ones(n_embd)}, n_layer, n_embd)
    with pytest.raises(AlignezError, match="width 2"):
        cvec_buffer({1: np.ones(2)}, n_layer, n_embd)


def test_continuation_logprobs_are_the_log_softmax_of_the_logits(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompt, cont = e.prompt("Name a colour."), " Blue and green"
    [lp] = e.continuation_logprobs([prompt], [cont])
    ctok = e.tokenize(cont, add_bos=False)
    assert len(lp) == len(ctok)
    logits = e.next_token_logits([prompt])[0].astype(np.float64)
    assert lp[0] == pytest.approx(log_softmax(logits)[ctok[0]], abs=1e-4)
    assert np.all(np.isfinite(lp)) and np.all(lp <= 0)


@pytest.mark.parametrize("sampling", [Sampling(max_tokens=12), Sampling(max_tokens=12, temperature=1.5, top_k=5, repeat_penalty=1.3, seed=4)])
def test_token_logprobs_equal_continuation_logprobs(tiny_engine: Engine, sampling: Sampling) -> None:
    e = tiny_engine
    prompts = [e.prompt(p) for p in ("Name a colour.", "Count to three.")]
    comps = e.generate(prompts, sampling)
    for p, c in zip(prompts, comps):
        assert len(c.token_logprobs) == c.n_tokens > 0
        # By token ids: the random model's text need not re-tokenize to the same tokens.
        [ref] = e.continuation_logprobs([p], [c.tokens])
        np.testing.assert_allclose(c.token_logprobs, ref, atol=1e-3)


def test_shared_prefix_gives_the_unshared_results(tiny_engine: Engine) -> None:
    from alignez_local.llama.scheduler import MIN_SHARED_PREFIX, Seq, shared_prefix_len

    e = tiny_engine
    instruction = "You are a judge. Rate the answer below from 1 to 10 for helpfulness and honesty. " * 3
    prompts = [e.prompt(instruction + f"Question {q}: what is {q} plus {q}?") for q in range(5)]
    answers = [f" It is {2 * q}, because {q} and {q} make {2 * q}." for q in range(5)]
    toks = [e.tokenize(p) for p in prompts]
    assert shared_prefix_len([Seq(i, t) for i, t in enumerate(toks)]) >= MIN_SHARED_PREFIX
    shared = e.continuation_logprobs(prompts, answers)
    alone = [e.continuation_logprobs([p], [a])[0] for p, a in zip(prompts, answers)]
    for s, a in zip(shared, alone):
        np.testing.assert_allclose(s, a, atol=1e-3)
    np.testing.assert_allclose(e.next_token_logits(prompts), np.stack([e.next_token_logits([p])[0] for p in prompts]), atol=1e-3)
    # more prompts than slots: later sequences get the prefix copied into a reused slot
    small = Engine(e.path, n_ctx=2048, n_parallel=2)
    many = small.continuation_logprobs(prompts, answers)
    small.close()
    for s, a in zip(many, alone):
        np.testing.assert_allclose(s, a, atol=1e-3)


@pytest.mark.parametrize("reduce", ["last", "mean"])
def test_capture_with_a_shared_system_prompt_equals_unshared(tiny_model_path, reduce: str) -> None:
    # steer captures each side of its pairs under one system prompt: decoded once, copied to every slot
    # (2 slots for 5 texts, so slots are reused), and never counted as a text of its own.
    e = Engine(tiny_model_path, n_ctx=2048, n_parallel=2)
    system = "You are a careful assistant. Answer in plain words and check every fact twice. " * 2
    prompts = [e.prompt(f"What is {q} plus {q}?", system=system) for q in range(5)]
    texts = [p + f" It is {2 * q}, because {q} and {q} make {2 * q}." for q, p in enumerate(prompts)]
    starts = [len(e.tokenize(p)) for p in prompts]
    layers = list(range(e.n_layer))
    shared = e.capture(texts, layers, site="l_out", reduce=reduce, mean_from=starts if reduce == "mean" else None)
    e.share_prefix = False
    unshared = e.capture(texts, layers, site="l_out", reduce=reduce, mean_from=starts if reduce == "mean" else None)
    e.close()
    # The prefix decoded on its own rounds differently (F16 KV cache) than inside each whole text.
    np.testing.assert_allclose(shared, unshared, rtol=1e-2, atol=5e-3)
    assert np.abs(shared[0] - shared[1]).max() > 1e-3


def test_first_logits_of_generation_equal_next_token_logits(tiny_engine: Engine) -> None:
    e = tiny_engine
    prompts = [e.prompt(f"Tell me about the number {q}.") for q in range(3)]
    comps, first = e.generate_with_first_logits(prompts, Sampling(temperature=0.0, max_tokens=4, repeat_penalty=1.0))
    assert [c.text for c in comps] == [c.text for c in e.generate(prompts, Sampling(temperature=0.0, max_tokens=4, repeat_penalty=1.0))]
    np.testing.assert_allclose(first, e.next_token_logits(prompts), atol=1e-3)
    assert all(not c.tokens or int(np.argmax(row)) == c.tokens[0] for row, c in zip(first, comps))


def test_shared_prefix_stops_before_the_first_output() -> None:
    from alignez_local.llama.scheduler import Seq, shared_prefix_len

    base = list(range(40))
    assert shared_prefix_len([Seq(0, base), Seq(1, base)]) == 39  # the last token must be fed to give logits
    assert shared_prefix_len([Seq(0, base, output_from=10), Seq(1, base + [7])]) == 10
    assert shared_prefix_len([Seq(0, base), Seq(1, [99] + base)]) == 0
    assert shared_prefix_len([Seq(0, base)]) == 0
