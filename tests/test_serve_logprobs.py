"""``alignez serve`` logprobs through real HTTP (the tiny random-weight model): OpenAI's chat shape
(``logprobs: true``, ``top_logprobs: N``), the legacy /v1/completions shape (``logprobs: N``),
streaming, stop strings, per-request steering and bad input.

The numbers are the log-softmax of the raw logits of the request's own sequence at each step
(under its steering, before temperature), so they are checked on a separate engine against
- ``Engine.generate``'s ``token_logprobs`` of the same prompt (the same one-token decode steps):
  within GEN_TOL (measured: bit-identical);
- ``Engine.continuation_logprobs`` of the same prompt + answer tokens: within TOL = 1e-3, the
  tolerance the engine's own test of ``token_logprobs`` uses. That pass reads the answer in one
  prefill, and llama.cpp's float32 sums depend on the batch shape: measured up to 6.2e-4 on 24
  tokens of the tiny random model (most tokens under 1e-4).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from alignez_local.llama.engine import Engine, Sampling, Seq
from test_serve_http import BATCH_WAIT, LiveServer, chat_body, openai
from test_serve_engine import tiny_files

TOL = 1e-3
GEN_TOL = 1e-6
MSGS = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_files(tmp_path_factory.mktemp("serve_logprobs"))


@pytest.fixture(scope="module")
def live(tiny_model_path: Path, files: tuple[Path, Path]) -> Iterator[LiveServer]:
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"])
    yield srv
    srv.close()


def post_ok(srv: LiveServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = srv.post(path, body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(srv: LiveServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the JSON chunks of a streamed request ([DONE] checked and left out)."""
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, headers=srv.headers, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def streamed_content(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the chat logprobs.content entries of every chunk, in order."""
    return [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]


def text_starts(pieces: list[bytes]) -> list[int]:
    """Return where each piece's text starts in the answer (and the answer's length last), decoded
    as the server decodes: incrementally, invalid bytes replaced."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out, n = [], 0
    for b in pieces:
        out.append(n)
        n += len(dec.decode(b))
    return out + [n + len(dec.decode(b"", final=True))]


def check_entry(e: dict[str, Any], k: int) -> None:
    """A greedy token: its logprob is the largest of its step, the first of its top_logprobs."""
    top = e["top_logprobs"]
    assert len(top) == k
    assert isinstance(e["token"], str) and all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"])
    lps = [t["logprob"] for t in top]
    assert lps == sorted(lps, reverse=True) and all(x <= 0 for x in lps)
    if k:
        assert e["logprob"] == max(lps) == top[0]["logprob"]
        assert e["bytes"] == top[0]["bytes"] and e["token"] == top[0]["token"]


def test_chat_logprobs_are_the_models_distribution(live: LiveServer, tiny_engine: Engine) -> None:
    body = {"messages": MSGS, "max_tokens": 12, "temperature": 0, "steering": {}, "logprobs": True, "top_logprobs": 5}
    r = post_ok(live, "/v1/chat/completions", body)
    ch = r["choices"][0]
    content = ch["logprobs"]["content"]
    assert ch["finish_reason"] == "length" and len(content) == r["usage"]["completion_tokens"] == 12
    for e in content:
        check_entry(e, 5)
    # The same prompt and greedy answer on another engine: the same tokens, and the log-softmax of
    # their logits read by a plain prefill (continuation_logprobs) within TOL.
    prompt = tiny_engine.format_chat(MSGS)
    [c] = tiny_engine.generate([prompt], Sampling(max_tokens=12))
    assert c.text == ch["message"]["content"]
    assert [e["bytes"] for e in content] == [list(tiny_engine._vocab.piece_bytes(t, True)) for t in c.tokens]
    [ref] = tiny_engine.continuation_logprobs([prompt], [c.tokens])
    got = np.array([e["logprob"] for e in content])
    np.testing.assert_allclose(got, ref, atol=TOL)
    np.testing.assert_allclose(got, c.token_logprobs, atol=GEN_TOL)
    # Sampled at a temperature: still the raw distribution (before temperature), so the same
    # check against continuation_logprobs holds for the sampled tokens.
    hot = post_ok(live, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 1.7, "seed": 5,
                                            "steering": {}, "logprobs": 2})
    lp = hot["choices"][0]["logprobs"]
    toks = tiny_engine.generate([prompt], Sampling(max_tokens=8, temperature=1.7, seed=5))[0].tokens
    assert lp["tokens"] == [tiny_engine._vocab.piece_bytes(t, True).decode("utf-8", "replace") for t in toks]
    [ref] = tiny_engine.continuation_logprobs([prompt], [toks])
    np.testing.assert_allclose(lp["token_logprobs"], ref, atol=TOL)


@pytest.mark.parametrize("k", [None, 0, 1, 20])
def test_top_logprobs_length_is_the_requests(live: LiveServer, k: int | None) -> None:
    body = chat_body("Hi", steering={}, logprobs=True, **({} if k is None else {"top_logprobs": k}))
    ch = post_ok(live, "/v1/chat/completions", body)["choices"][0]
    assert len(ch["logprobs"]["content"]) == 8
    for e in ch["logprobs"]["content"]:
        check_entry(e, k or 0)


def test_no_logprobs_unless_asked(live: LiveServer) -> None:
    for extra in ({}, {"logprobs": False}, {"logprobs": None}):
        assert post_ok(live, "/v1/chat/completions", chat_body("Hi", **extra))["choices"][0]["logprobs"] is None
        assert post_ok(live, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, **extra})["choices"][0]["logprobs"] is None
    chunks = stream_chunks(live, "/v1/chat/completions", chat_body("Hi"))
    assert all(ch["logprobs"] is None for c in chunks for ch in c["choices"])


def test_streaming_carries_the_same_logprobs(live: LiveServer) -> None:
    body = {"messages": MSGS, "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = post_ok(live, "/v1/chat/completions", body)["choices"][0]
    chunks = stream_chunks(live, "/v1/chat/completions", body)
    assert streamed_content(chunks) == whole["logprobs"]["content"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
    # every chunk with text carries the logprobs of the tokens whose text starts in it
    for c in chunks:
        ch = c["choices"][0]
        if ch["delta"].get("content"):
            assert ch["logprobs"] is not None


def test_legacy_completions_shape_and_a_stop_string(live: LiveServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "steering": {}, "logprobs": 3}
    full = post_ok(live, "/v1/completions", body)["choices"][0]
    text, lp = full["text"], full["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = len(lp["tokens"])
    assert n == 24 == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    base = len(body["prompt"])
    off = [o - base for o in lp["text_offset"]] + [len(text)]
    assert off[0] == 0 and off == sorted(off)
    for tok, tlp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # the 3 likeliest (pieces that decode alike merge) and the sampled token, the likeliest here
        assert 1 <= len(top) <= 4 and top[tok] == tlp == max(top.values())
    # A stop string made of two tokens' text in the middle: the tokens wholly inside it are left out.
    i = next(i for i in range(2, n - 2) if off[i - 1] < off[i] < off[i + 2] and "\ufffd" not in text[off[i] : off[i + 2]]
             and text.find(text[off[i] : off[i + 2]]) == off[i])
    stop = text[off[i] : off[i + 2]]
    cut = post_ok(live, "/v1/completions", {**body, "stop": [stop]})["choices"][0]
    assert cut["text"] == text[: off[i]] and cut["finish_reason"] == "stop"
    want = {k: v[:i] for k, v in lp.items()}
    assert cut["logprobs"] == want
    streamed = stream_chunks(live, "/v1/completions", {**body, "stop": [stop]})
    merged: dict[str, list[Any]] = {k: [] for k in want}
    for c in streamed:
        for ch in c["choices"]:
            for k, v in (ch["logprobs"] or {}).items():
                merged[k] += v
    assert merged == want and "".join(c["choices"][0]["text"] for c in streamed) == cut["text"]
    # chat: the same rule
    chat = {"messages": MSGS, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    cfull = post_ok(live, "/v1/chat/completions", chat)["choices"][0]
    entries = cfull["logprobs"]["content"]
    ctext = cfull["message"]["content"]
    starts = text_starts([bytes(e["bytes"]) for e in entries])
    assert starts[-1] == len(ctext)
    j = next(j for j in range(2, len(entries) - 1) if starts[j - 1] < starts[j] < starts[j + 1]
             and "\ufffd" not in ctext[starts[j] : starts[j + 1]] and ctext.find(ctext[starts[j] : starts[j + 1]]) == starts[j])
    cstop = ctext[starts[j] : starts[j + 1]]
    ccut = post_ok(live, "/v1/chat/completions", {**chat, "stop": cstop})["choices"][0]
    assert ccut["message"]["content"] == ctext[: starts[j]]
    assert ccut["logprobs"]["content"] == entries[:j]
    assert streamed_content(stream_chunks(live, "/v1/chat/completions", {**chat, "stop": cstop})) == entries[:j]


def test_openai_client_parses_logprobs(live: LiveServer) -> None:
    c = live.client()
    r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4)
    lp = r.choices[0].logprobs
    assert len(lp.content) == 5 and len(r.choices[0].logprobs.content[0].top_logprobs) == 4
    first = lp.content[0]
    assert first.logprob == first.top_logprobs[0].logprob and first.bytes == first.top_logprobs[0].bytes
    parts = list(c.chat.completions.create(model="x", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=4, stream=True))
    got = [e for p in parts if p.choices and p.choices[0].logprobs for e in p.choices[0].logprobs.content or []]
    assert [e.model_dump() for e in got] == [e.model_dump() for e in lp.content]
    t = c.completions.create(model="x", prompt="Once upon", max_tokens=4, temperature=0, logprobs=2)
    assert len(t.choices[0].logprobs.tokens) == 4 and len(t.choices[0].logprobs.top_logprobs) == 4
    plain = c.chat.completions.create(model="x", messages=MSGS, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        c.chat.completions.create(model="x", messages=MSGS, max_tokens=2, top_logprobs=3)


def send_together(srv: LiveServer, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the choices of ``bodies`` sent at once, in one batch, in the same order every time
    (see test_serve_http.send_together)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for b in bodies:
            futures.append(pool.submit(srv.post, "/v1/chat/completions", b))
            time.sleep(0.3)
        rs = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    choices = [r.json()["choices"][0] for r in rs]
    assert all(c["finish_reason"] == "length" for c in choices), "pick prompts with longer answers"
    return choices


def lps(choice: dict[str, Any]) -> list[float]:
    return [e["logprob"] for e in choice["logprobs"]["content"]]


def test_each_request_gets_the_logprobs_of_its_own_steering(tiny_model_path: Path, files: tuple[Path, Path], live: LiveServer) -> None:
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"], parallel=2, batch_wait=BATCH_WAIT)
    try:
        a = chat_body("Tell me a story", steering={}, max_tokens=12, logprobs=True, top_logprobs=3)
        b = chat_body("Why?", steering={}, max_tokens=12, logprobs=True, top_logprobs=3)
        b_steered = {**b, "steering": {"v": 3, "p": 2}}
        quiet = send_together(srv, [a, b])
        mixed = send_together(srv, [a, b_steered])
    finally:
        srv.close()
    # The unsteered request: bit-identical logprobs beside a steered neighbour (same batch shapes).
    assert mixed[0]["logprobs"] == quiet[0]["logprobs"]
    # The steered one: its own distribution, not the unsteered one...
    assert np.abs(np.array(lps(mixed[1])) - np.array(lps(quiet[1]))).max() > 1e-3
    for e in mixed[1]["logprobs"]["content"]:
        check_entry(e, 3)
    # ...and the one it gets when decoded alone with the same steering (other batch shapes: TOL).
    alone = post_ok(live, "/v1/chat/completions", b_steered)["choices"][0]
    assert alone["message"]["content"] == mixed[1]["message"]["content"]
    np.testing.assert_allclose(lps(alone), lps(mixed[1]), atol=TOL)


BAD = [
    ("top_logprobs without logprobs", "/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ("top_logprobs with logprobs false", "/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs", "needs logprobs: true"),
    ("top_logprobs above 20", "/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "out of range; use 0 to 20"),
    ("top_logprobs negative", "/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "out of range; use 0 to 20"),
    ("top_logprobs not an integer", "/v1/chat/completions", {"logprobs": True, "top_logprobs": "5"}, "top_logprobs", "must be an integer"),
    ("chat logprobs not a bool", "/v1/chat/completions", {"logprobs": 5}, "logprobs", "true or false"),
    ("legacy logprobs true", "/v1/completions", {"logprobs": True}, "logprobs", "an integer, 0 to 20"),
    ("legacy logprobs above 20", "/v1/completions", {"logprobs": 21}, "logprobs", "out of range; use 0 to 20"),
    ("legacy logprobs negative", "/v1/completions", {"logprobs": -2}, "logprobs", "out of range; use 0 to 20"),
    ("legacy top_logprobs", "/v1/completions", {"logprobs": 2, "top_logprobs": 2}, "top_logprobs", "send logprobs: N"),
]


@pytest.mark.parametrize("what,path,extra,param,says", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_logprobs_input_is_a_400(live: LiveServer, what: str, path: str, extra: dict[str, Any], param: str,
                                     says: str, stream: bool) -> None:
    body = chat_body("Hi", **extra) if "chat" in path else {"prompt": "Hi", "max_tokens": 3, **extra}
    r = live.post(path, {**body, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error"


def test_sequences_that_do_not_ask_record_nothing(tiny_engine: Engine) -> None:
    """The scheduler's bookkeeping: only a sequence with n_top set gets TokenLogprobs, and they are
    the logprobs every sequence gets anyway."""
    e = tiny_engine
    toks = e.tokenize(e.format_chat(MSGS))
    seqs = [Seq(0, toks, sampling=Sampling(max_tokens=6)), Seq(1, toks, sampling=Sampling(max_tokens=6), n_top=2)]
    handed = False

    def admit() -> list[Seq]:
        nonlocal handed
        out, handed = ([] if handed else seqs), True
        return out

    e.generate_live(admit)
    plain, asked = (e.completion(s) for s in seqs)
    assert plain.top_logprobs is None and seqs[0].top_tokens == []
    assert asked.top_logprobs is not None and [t.token for t in asked.top_logprobs] == asked.tokens
    assert [t.logprob for t in asked.top_logprobs] == list(asked.token_logprobs)
    assert all(len(t.top) == 2 and t.top[0][2] == t.logprob for t in asked.top_logprobs)
