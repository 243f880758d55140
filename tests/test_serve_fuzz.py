"""Fuzzing a real ``alignez serve`` on the tiny model (issue 28): thousands of generated request
bodies, most of them malformed (wrong types, out-of-range numbers, markers, deep nesting), many
then mutated byte by byte (cut, spliced, lone surrogates, garbage), sent to both generation
routes. Every answer must be below 500 and, when an error, in OpenAI's shape; the server's log
must hold no traceback; /health must answer within a second throughout."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignez_local.testing.serve_process import HealthWatch, ServeProcess
from test_serve_engine import tiny_files

EXAMPLES = 500
PER_EXAMPLE = 10  # bodies per hypothesis example, sent 4 at a time: EXAMPLES * PER_EXAMPLE requests
MIN_REQUESTS = 5000
ROUTES = ("/v1/chat/completions", "/v1/completions")

# Integers either tiny or far out of every range: a valid max_tokens must stay 1 or 2, so that
# the model's share of the work (the rare well-formed request) stays small.
ints = st.integers(-3, 3) | st.integers(10**5, 10**30) | st.integers(-(10**30), -(10**5))
leaves = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)
markers = st.sampled_from(["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "\n", "user", "system", "\u2581", "\U0001f642"])
texts = st.lists(st.text(max_size=8) | markers, max_size=6).map("".join)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER"]) | values
contents = texts | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2) | values
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents},
                                          optional={"name": texts, "tool_calls": values}), max_size=4) | values
small = st.sampled_from([1, 2]) | values
fields = {
    "model": texts | values, "messages": messages, "prompt": texts | st.lists(texts, max_size=2) | values,
    "max_tokens": small, "max_completion_tokens": small, "temperature": st.floats(0, 2) | values,
    "top_p": st.floats(0, 1) | values, "top_k": ints | values, "seed": ints | values, "repeat_penalty": st.floats(0.5, 3) | values,
    "stop": texts | st.lists(texts, max_size=5) | values, "stream": st.booleans() | values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | values,
    "logprobs": st.booleans() | ints | values, "top_logprobs": ints | values, "n": ints | values,
    "steering": st.none() | st.just(0) | st.dictionaries(st.sampled_from(["v", "w", "../v", ""]), st.floats(-10, 10) | values, max_size=2)
    | values,
    "tools": values, "response_format": values, "logit_bias": values, "user": texts, "presence_penalty": values,
}
# Well-formed requests for both routes (messages and prompt both), each field in its range: some
# reach the model (steered, streamed, with logprobs), the rest are broken by the mutations below.
well_formed = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}),
                          min_size=1, max_size=3),
     "prompt": texts.filter(bool), "max_tokens": st.sampled_from([1, 2])},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**40),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "steering": st.none() | st.just(0) | st.fixed_dictionaries({"v": st.floats(-3, 3)}),
              "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4), "user": texts})
bodies = well_formed | st.fixed_dictionaries({}, optional=fields) | values

# Pieces a mutation splices in: JSON syntax, lone-surrogate escapes, bytes that are not UTF-8.
SPLICE = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\\ud800", b'"\\udc00"', b"1e999", b"-0", b"NaN", b"null",
          b"\x00", b"\xff\xfe", b"\xc3", b"[" * 200, b'{"a":' * 50, b"<|im_end|>", b" " * 64]


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Return one request body: generated JSON, sometimes mutated into something less than JSON."""
    raw = json.dumps(draw(bodies)).encode()  # NaN and Infinity allowed: Python's json reads them
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["cut", "splice", "drop", "repeat", "byte"]))
        if op == "cut":
            raw = raw[:at]
        elif op == "splice":
            raw = raw[:at] + draw(st.sampled_from(SPLICE)) + raw[at:]
        elif op == "drop":
            raw = raw[:at] + raw[at + draw(st.integers(1, 8)):]
        elif op == "repeat":
            raw = raw[:at] + raw[at:at + 16] * draw(st.integers(2, 4)) + raw[at:]
        else:
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return raw


@pytest.fixture(scope="module")
def served(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    d = tmp_path_factory.mktemp("serve_fuzz")
    vec, _ = tiny_files(d)
    srv = ServeProcess(tiny_model_path, "--threads", "1", "--ctx", "1024", "--parallel", "4", "--max-tokens", "2",
                       "--vector", f"v={vec}:3", log=d / "serve.log")
    yield srv
    assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log and "Exception" not in log, log[-5000:]


def check(r: httpx.Response) -> int:
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return r.status_code


def test_thousands_of_fuzzed_bodies_get_no_5xx(served: ServeProcess) -> None:
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool, HealthWatch(served.url, every=0.1) as watch:

        def send(item: tuple[str, bytes]) -> int:
            route, raw = item
            return check(client.post(served.url + route, content=raw, headers={"Content-Type": "application/json"}))

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
        @given(st.lists(st.tuples(st.sampled_from(ROUTES), raw_bodies()), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
        def run(batch: list[tuple[str, bytes]]) -> None:
            for status in pool.map(send, batch):
                statuses[status] = statuses.get(status, 0) + 1

        run()
    took = time.monotonic() - t0
    n = sum(statuses.values())
    print(f"{n} fuzzed requests in {took:.1f}s: {dict(sorted(statuses.items()))}; /health {watch.summary()}")
    assert n >= MIN_REQUESTS and statuses.get(200, 0) > 0
    assert not watch.failures and watch.worst < 1.0, watch.summary()
    assert httpx.get(served.url + "/health", timeout=5).json()["slots_processing"] == 0
