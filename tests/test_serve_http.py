"""``alignez serve`` through real HTTP on a free port: the official openai client, every bad input,
isolation between requests, mid-stream disconnects, and a clean stop on SIGTERM / Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from alignez_local.apps.serve.app import ServeConfig, create_app
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.llama.engine import Engine
from alignez_local.llama.scheduler import MIN_SHARED_PREFIX, common_prefix_len
from test_cli_errors import assert_one_line_error
from test_serve_engine import SMOL_DIR, tiny_files

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
CTX = 1024
# The isolation tests need their 4 requests in ONE batch (like shapes). A batch starts as soon as it
# is full (4 = --parallel), so this long wait only delays lone requests; 1 s was too short on a
# loaded machine.
BATCH_WAIT = 10.0


class LiveServer:
    """The app on a free port in a background thread, with its own engine."""

    def __init__(self, model: Path, vectors: Sequence[str] = (), profiles: Sequence[str] = (),
                 api_key: str | None = KEY, parallel: int = 4, batch_wait: float = 0.0, max_tokens: int = 16,
                 ctx: int = CTX, cache_prompt: bool = False, flash_attn: bool = False, deterministic: bool = True) -> None:
        # ``alignez serve --deterministic`` by default (flash attention and prompt reuse off, every job
        # planned): most tests here compare answers bit for bit across batch neighbours.
        # ``alignez serve``'s defaults are cache_prompt=True, flash_attn=True, deterministic=False.
        self.engine = Engine(model, n_ctx=ctx, n_threads=1, n_parallel=parallel, flash_attn=flash_attn)
        steering, _ = SteeringSet.load(self.engine, vectors, profiles)
        config = ServeConfig("test-model", api_key, max_tokens, batch_wait, cache_prompt, plan_every_job=deterministic)
        self.app = create_app(self.engine, steering, config, parallel)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers=headers, timeout=120, **kw)

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=30).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.app.state.worker.alive
        self.engine.close()


def chat_body(text: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_files(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def live(tiny_model_path: Path, files: tuple[Path, Path]) -> Iterator[LiveServer]:
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"])
    yield srv
    srv.close()


def test_openai_client_chat_completion_streaming_and_steering(live: LiveServer) -> None:
    c = live.client()
    assert [m.id for m in c.models.list().data] == ["test-model"]
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 3
    t = c.completions.create(model="x", prompt="Once upon", max_tokens=5, temperature=0, seed=3)
    assert t.object == "text_completion" and t.usage.completion_tokens == 5 and t.choices[0].text
    parts = [ch for ch in c.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == r.choices[0].message.content
    assert parts[-1].usage.completion_tokens == 6 and parts[-2].choices[0].finish_reason == "length"
    streamed = "".join(p.choices[0].text for p in c.completions.create(
        model="x", prompt="Once upon", max_tokens=5, temperature=0, seed=3, stream=True))
    assert streamed == t.choices[0].text
    # extra_body steering: none, the defaults, one vector, and each changes the answer as it should
    texts = {}
    for label, steer in [("none", {}), ("zero", 0), ("v", {"v": 3}), ("p", {"p": 8})]:
        texts[label] = c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
            extra_body={"steering": steer}).choices[0].message.content
    assert texts["none"] == texts["zero"] == c.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
        extra_body={"steering": {"v": 0}}).choices[0].message.content
    assert texts["v"] != texts["none"] and texts["p"] != texts["none"]


def test_steering_listing_and_health(live: LiveServer) -> None:
    body = httpx.get(live.url + "/v1/steering", headers=live.headers).json()
    by_name = {d["name"]: d for d in body["data"]}
    assert by_name["v"]["kind"] == "vector" and by_name["v"]["default_strength"] == 3.0 and by_name["v"]["layers"] == [1, 2, 3]
    assert by_name["p"]["kind"] == "profile" and by_name["p"]["site"] == "ffn_out" and body["defaults"] == {"v": 3.0, "p": 1.0}
    h = live.health()
    assert h["status"] == "ok" and h["slots_total"] == 4


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages wrong type", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("temperature wrong type", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", "/v1/completions", {"prompt": "a", "temperature": 9}, 400, "temperature"),
    ("max_tokens not an integer", "/v1/completions", {"prompt": "a", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("stream not a bool", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("stop wrong type", "/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop"),
    ("n above 1", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("unknown steering name", "/v1/chat/completions", chat_body("x", steering={"nope": 1}), 400, "steering"),
    ("strength out of range", "/v1/chat/completions", chat_body("x", steering={"v": 1000}), 400, "steering"),
    ("strength wrong type", "/v1/chat/completions", chat_body("x", steering={"v": "high"}), 400, "steering"),
    ("steering wrong type", "/v1/chat/completions", chat_body("x", steering=["v"]), 400, "steering"),
    ("prompt longer than the context", "/v1/completions", {"prompt": "word " * (CTX + 50)}, 400, "prompt"),
    ("prompt + max_tokens over the context", "/v1/completions", {"prompt": "a b c", "max_tokens": CTX}, 400, "prompt"),
    ("unknown route", "/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    live: LiveServer, what: str, path: str, body: Any, status: int, param: str | None
) -> None:
    r = live.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    ok = live.post("/v1/chat/completions", chat_body("Hello"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}])
def test_missing_or_wrong_api_key_is_401(live: LiveServer, headers: dict[str, str]) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/steering")]:
        r = httpx.request(method, live.url + path, content=json.dumps(chat_body("x")), headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live.url + "/health").status_code == 200  # open, like llama-server's
    assert live.post("/v1/chat/completions", chat_body("Hello")).status_code == 200


def wait_idle(srv: LiveServer, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        h = srv.health()
        if h["slots_processing"] == 0 and h["requests_waiting"] == 0 and h["requests_parsing"] == 0:
            return h
        assert time.monotonic() < deadline, f"slots still busy: {h}"
        time.sleep(0.1)


def test_fifty_mid_stream_disconnects_free_every_slot(live: LiveServer) -> None:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.8, "stream": True})
    for i in range(50):
        with httpx.stream("POST", live.url + "/v1/completions", content=body, headers=live.headers, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text":""' not in line:
                    break  # got real text: hang up mid-stream
    assert wait_idle(live)["slots_total"] == 4
    ok = live.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def send_together(srv: LiveServer, bodies: list[dict[str, Any]]) -> list[str]:
    """Return the answers to ``bodies`` sent at the same time (the server batches them together).

    Every answer must run to max_tokens: a sequence that stops early changes the shape of the
    later decode batches, and llama.cpp's numerics may depend on the batch shape (the order of the
    sequences in the batch included).
    """
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for b in bodies:
            # One after another, so every run puts the same request in the same place of the batch
            # (and of the KV cache): the arrival order is part of the batch shape.
            futures.append(pool.submit(srv.post, "/v1/chat/completions", b))
            time.sleep(0.3)
        rs = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    choices = [r.json()["choices"][0] for r in rs]
    assert all(c["finish_reason"] == "length" for c in choices), "pick prompts with longer answers"
    return [c["message"]["content"] for c in choices]


def check_http_isolation(srv: LiveServer, prompts: list[str], steered: list[dict[str, float]]) -> None:
    """Unsteered requests beside steered ones == beside unsteered ones (same clients, same prompts)."""
    n_u = len(prompts) - len(steered)
    quiet = send_together(srv, [chat_body(p, steering={}, max_tokens=16) for p in prompts])
    mixed_bodies = [chat_body(p, steering={}, max_tokens=16) for p in prompts[:n_u]]
    mixed_bodies += [chat_body(p, steering=s, max_tokens=16) for p, s in zip(prompts[n_u:], steered)]
    mixed = send_together(srv, mixed_bodies)
    assert mixed[:n_u] == quiet[:n_u]
    assert mixed[n_u:] != quiet[n_u:]


def test_http_isolation_tiny(tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"], parallel=4, batch_wait=BATCH_WAIT)
    try:
        check_http_isolation(srv, ["Hi", "Tell me a story", "Count", "Why?"], [{"v": 3}, {"p": 2, "v": -1}])
    finally:
        srv.close()


def answer_logprobs(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    return choice["logprobs"]["content"]


def drift(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, int]:
    """Return (largest |logprob difference| over the shared top alternatives, steps compared) of two
    greedy answers, step by step while their tokens agree (after a token differs, the two answers
    are read in different contexts and nothing is comparable)."""
    worst, steps = 0.0, 0
    for x, y in zip(a, b):
        # By bytes: the tiny model has many tokens whose text is the same lone U+FFFD.
        tops = {tuple(t["bytes"]): t["logprob"] for t in y["top_logprobs"]}
        worst = max([worst] + [abs(t["logprob"] - tops[b]) for t in x["top_logprobs"] if (b := tuple(t["bytes"])) in tops])
        steps += 1
        if x["bytes"] != y["bytes"]:
            break
    return worst, steps


def test_default_mode_keeps_each_requests_steering_to_itself(tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    """``alignez serve``'s defaults (flash attention, prompt reuse): an answer's last bits may depend
    on its neighbours, but never their steering. Unsteered requests decoded beside strongly steered
    ones stay within flash attention's rounding of the same requests beside unsteered ones (their
    prompts then come from the prompt cache, read in other shapes), while the steered requests
    themselves move by far more: what a leak would look like."""
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"], parallel=4, batch_wait=BATCH_WAIT,
                     cache_prompt=True, flash_attn=True, deterministic=False)
    prompts = ["Hi", "Tell me a story", "Count", "Why?"]
    steered = [{"v": 3}, {"p": 2, "v": -1}]

    def together(steerings: list[dict[str, float]]) -> list[list[dict[str, Any]]]:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = []
            for p, st in zip(prompts, steerings):
                futures.append(pool.submit(srv.post, "/v1/chat/completions",
                                           chat_body(p, steering=st, max_tokens=8, logprobs=True, top_logprobs=5)))
                time.sleep(0.3)
            return [answer_logprobs(f.result()) for f in futures]

    try:
        before = srv.engine.counts.tokens
        quiet = together([{}] * 4)
        read_quiet = srv.engine.counts.tokens - before
        mixed = together([{}, {}, *steered])
    finally:
        srv.close()
    read_mixed = srv.engine.counts.tokens - before - read_quiet
    assert read_mixed < read_quiet  # the unsteered prompts came from the cache
    noise = [drift(q, m) for q, m in zip(quiet[:2], mixed[:2])]
    moved = [drift(q, m)[0] for q, m in zip(quiet[2:], mixed[2:])]
    assert all(steps >= 1 for _, steps in noise)
    assert max(d for d, _ in noise) < 0.05, noise
    assert min(moved) > 0.3, moved  # measured: noise under 0.01, steered 0.63 and 0.96


def test_only_deterministic_plans_requests_that_use_no_plan(tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    """With a profile loaded, --deterministic decodes every request's prompt once more unsteered
    (the planning prefill), so batch shapes never depend on the neighbours' choices; by default only
    the requests that chose the profile (or a gated vector) pay for it. Alone, the answers agree."""
    read: dict[tuple[bool, str], int] = {}
    texts: dict[tuple[bool, str], str] = {}
    for det in (True, False):
        srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"], parallel=1, deterministic=det)
        try:
            for label, steering in (("none", {}), ("v", {"v": 3}), ("p", {"p": 2})):
                before = srv.engine.counts.tokens
                r = srv.post("/v1/chat/completions", chat_body("Tell me a story", steering=steering, max_tokens=4))
                assert r.status_code == 200, r.text
                read[det, label] = srv.engine.counts.tokens - before
                texts[det, label] = r.json()["choices"][0]["message"]["content"]
                n_prompt = r.json()["usage"]["prompt_tokens"]
        finally:
            srv.close()
    assert read[True, "none"] - read[False, "none"] == read[True, "v"] - read[False, "v"] == n_prompt
    assert read[True, "p"] == read[False, "p"]
    assert all(texts[True, k] == texts[False, k] for k in ("none", "v", "p"))


def test_deterministic_refuses_the_fast_paths_by_name(tiny_model_path: Path) -> None:
    for flag in ("--flash-attn", "--cache-prompt"):
        res = subprocess.run([sys.executable, "-m", "alignez_local", "serve", "-m", str(tiny_model_path), "--deterministic",
                              flag], capture_output=True, text=True, timeout=120)
        assert_one_line_error(res, "--deterministic", flag)


def chat_cli(model: Path, prompt: str, *args: str) -> str:
    """Return the answer of ``alignez chat --prompt`` (greedy, no repeat penalty, same context)."""
    out = subprocess.run(
        [sys.executable, "-m", "alignez_local", "chat", "-m", str(model), "--prompt", prompt, "--json", "--threads", "1",
         "--ctx", str(CTX), "--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "24", *args],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["answer"]


def check_alone_equals_chat(srv: LiveServer, model: Path, vector: Path, profile: Path) -> None:
    for steering, args in [({"v": 2.5}, ["--vector", f"{vector}:2.5"]), ({"p": 1.5}, ["--profile", f"{profile}:1.5"])]:
        r = srv.post("/v1/chat/completions", chat_body("Tell me about cats.", steering=steering, max_tokens=24))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"].strip() == chat_cli(model, "Tell me about cats.", *args)


def test_steered_request_alone_equals_alignez_chat_tiny(live: LiveServer, tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    check_alone_equals_chat(live, tiny_model_path, *files)


@pytest.mark.smollm
def test_smollm_isolation_and_chat_equivalence(smollm_path: Path) -> None:
    vec, prof = SMOL_DIR / "helpful.gguf", SMOL_DIR / "helpful.profile.gguf"
    srv = LiveServer(smollm_path, [f"v={vec}"], [f"p={prof}"], parallel=4, batch_wait=BATCH_WAIT)
    try:
        long = ["Write a long story about a dragon.", "Explain in detail how a car engine works.",
                "Describe the history of Rome in detail.", "List twenty fruits with a sentence about each."]
        check_http_isolation(srv, long, [{"v": 4}, {"p": 1, "v": 2}])
        check_alone_equals_chat(srv, smollm_path, vec, prof)
    finally:
        srv.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_cleanly(tiny_model_path: Path, sig: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignez_local", "serve", "-m", str(tiny_model_path), "--port", str(port),
         "--threads", "1", "--ctx", str(CTX)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        # A long answer is streaming when the signal comes: the server must not wait for its end.
        body = {"prompt": "Hi", "max_tokens": 1000, "stream": True, "stop": ["never-appears"]}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as stream:
            next(line for line in stream.iter_lines() if '"text":""' not in line and line.startswith("data: "))
            t0 = time.monotonic()
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "stopped" in err
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()


class LongStream:
    """A long streaming completion read on a background thread, noting when it ended and how."""

    def __init__(self, srv: LiveServer, max_tokens: int = 900) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stop": ["never-appears"], "stream_options": {"include_usage": True}}
        self.srv, self.body = srv, body
        self.first_text = threading.Event()
        self.ended_at: float | None = None
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.first_text.wait(60), "the long stream sent no text"

    def _read(self) -> None:
        with httpx.stream("POST", self.srv.url + "/v1/completions", json=self.body, headers=self.srv.headers, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.lines.append(line[6:])
                    if '"text":""' not in line:
                        self.first_text.set()
        self.ended_at = time.monotonic()

    def result(self) -> tuple[str, dict[str, Any]]:
        """Return (finish_reason, usage) once the stream ended."""
        self.thread.join(300)
        assert self.lines[-1] == "[DONE]", self.lines[-3:]
        chunks = [json.loads(x) for x in self.lines[:-1]]
        finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
        return finish, chunks[-1]["usage"]


def test_request_sent_during_a_long_stream_is_admitted_and_finishes_first(live: LiveServer) -> None:
    wait_idle(live)
    long = LongStream(live)
    r = live.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    short_done = time.monotonic()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    # It was admitted into the running decode, not queued behind the long one.
    assert long.ended_at is None, "the long stream ended before the short request: nothing to prove"
    finish, usage = long.result()
    assert long.ended_at is not None and short_done < long.ended_at
    assert finish == "length" and usage["completion_tokens"] == 900
    assert wait_idle(live)["slots_total"] == 4


def test_a_disconnect_frees_its_slot_while_the_others_decode(tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    # A longer context than the shared server's, so the long stream outlasts the hang-ups by far
    # (measured: 900 tokens take ~3 s here, one hang-up and its slot freed ~0.35 s).
    srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], [f"p={files[1]}"], ctx=4096)
    try:
        long = LongStream(srv, max_tokens=3500)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.8, "stream": True})
        for _ in range(8):
            with httpx.stream("POST", srv.url + "/v1/completions", content=body, headers=srv.headers, timeout=60) as r:
                next(line for line in r.iter_lines() if line.startswith("data: ") and '"text":""' not in line)
            # Hung up mid-stream: its slot is free again while the long stream still decodes.
            deadline = time.monotonic() + 30
            while srv.health()["slots_processing"] != 1:
                assert time.monotonic() < deadline and long.ended_at is None, srv.health()
                time.sleep(0.02)
        ok = srv.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert long.ended_at is None, "the long stream ended early: nothing to prove"
        finish, usage = long.result()
        assert finish == "length" and usage["completion_tokens"] == 3500
        assert wait_idle(srv) == {"status": "ok", "slots_total": 4, "slots_processing": 0, "requests_waiting": 0,
                              "requests_parsing": 0}
    finally:
        srv.close()


SYSTEM = "You are a careful assistant. You answer every question in one short, friendly sentence. " * 2


def test_cache_prompt_reads_a_shared_system_prompt_once_per_slot(tiny_model_path: Path, files: tuple[Path, Path]) -> None:
    """--cache-prompt: a request reads only what follows the prompt prefix an earlier request
    steered alike left in its slot, also after the server was idle; steered otherwise, it reads
    all. The answers stay the tokens the server gives without the cache (this model, greedy)."""
    asks = [("Name a colour.", {}), ("What is two plus two?", {}), ("Name a colour.", {"v": 3.0}),
            ("Write a short greeting.", {"v": 3.0}), ("Tell me about the sea.", {})]
    got = {}
    for cache in (False, True):
        srv = LiveServer(tiny_model_path, [f"v={files[0]}:3"], parallel=1, cache_prompt=cache)
        try:
            before = srv.engine.counts.tokens
            texts = []
            for text, steering in asks:  # one after the other: each finds the server idle
                body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                        "max_tokens": 8, "temperature": 0, "steering": steering}
                r = srv.post("/v1/chat/completions", body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["message"]["content"])
            got[cache] = (texts, srv.engine.counts.tokens - before)
            toks = [srv.engine.tokenize(srv.engine.format_chat([{"role": "system", "content": SYSTEM},
                                                               {"role": "user", "content": t}])) for t, _ in asks]
        finally:
            srv.close()
    # Reused: the 2nd after the 1st (both unsteered) and the 4th after the 3rd (the same vector);
    # the 3rd and the 5th follow a request steered otherwise and read their whole prompt.
    saved = sum(common_prefix_len(toks[i - 1][:-1], toks[i], len(toks[i]) - 1) for i in (1, 3))
    assert saved >= 2 * MIN_SHARED_PREFIX
    assert got[False][1] - got[True][1] == saved
    assert got[True][0] == got[False][0]


def test_cache_prompt_gives_way_when_the_context_is_needed(tiny_model_path: Path) -> None:
    """Cells kept for reuse never make a request fail: when they would not leave room, they go."""
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}],
            "max_tokens": 8, "temperature": 0}
    srv = LiveServer(tiny_model_path, parallel=2, cache_prompt=True, ctx=256)
    try:
        n = len(srv.engine.tokenize(srv.engine.format_chat(body["messages"])))
        big = {**body, "max_tokens": 256 - n}  # its budget is the whole context
        for b in (body, big, body, big):
            r = srv.post("/v1/chat/completions", b)
            assert r.status_code == 200, r.text
        assert srv.health()["slots_processing"] == 0
    finally:
        srv.close()
