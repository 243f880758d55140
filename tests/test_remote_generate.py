"""``steer --generate-url`` (``align/remote_text.py``): the text stages written by a real ``alignez
serve`` (``test_serve_http.LiveServer``: the app on a free port, its own engine) on the tiny random
model, against the local path.

- Greedy, the pairs written through the server are the local path's, byte for byte, and so are the
  bench's unsteered and prompting answers; a re-run reuses every written pair (nothing is asked of
  the server, which may be gone).
- The model check: a server on another model (other width and layers) is refused in one line,
  before anything is written.
- Through the CLI (``alignez generate`` and ``alignez steer``, subprocesses): a bad URL, an
  unreachable server, a wrong model and a missing key are each one ``error:`` line, a non-zero exit
  and no file; ``steer --generate-url --screen-only`` screens on the server.
- A server that offers no way to check its model (a stand-in with no /v1/models, no /tokenize, no
  token counts) is named in one warning line, and used.
- ``steer --generate-url`` end to end: report.json and every pair name the servers, never the key.
- llama-server (skipped where ``~/llama-tools/bin/llama-server`` is missing): its /tokenize is
  compared token for token, and its greedy answers without a repeat penalty are counted against
  the local ones (llama-server puts the prompt in the penalty window, so steer's 1.1 is not compared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignez_local.align.axes import get_axis
from alignez_local.align.behaviour_bench import axis_bench
from alignez_local.align.preferences import GenerationSettings, generate_preferences
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine
from alignez_local.prompt_sets import select_queries
from alignez_local.testing import free_port, write_tiny_llama
from test_remote_judge import StandIn, one_error_line, serve_handler
from test_serve_http import KEY, LiveServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()"]
GREEDY = GenerationSettings(temperature=0.0, response_tokens=16)
LLAMA_SERVER = Path.home() / "llama-tools" / "bin" / "llama-server"


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tiny_model_path, api_key=KEY, parallel=4, ctx=2048, max_tokens=16)
    yield srv
    srv.close()


@pytest.fixture()
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNEZ_GENERATE_API_KEY", KEY)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_remote_pairs_and_bench_answers_equal_the_local_ones(tmp_path: Path, tiny_engine: Engine, server: LiveServer,
                                                             key: None) -> None:
    axis, queries = get_axis("french"), select_queries(None, 10, axis="french")
    writer = RemoteWriter([server.url + "/v1"], concurrency=2)
    [line] = writer.check_model(tiny_engine, "tiny")
    assert "serves tiny: the same vocabulary" in line and "width 64" in line and "prompt token count" in line
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert generate_preferences(tiny_engine, queries, axis, local, GREEDY, quiet=True) == (10, 0)
    assert generate_preferences(tiny_engine, queries, axis, remote, GREEDY, quiet=True, writer=writer) == (10, 0)
    mine, theirs = records(local), records(remote)
    assert [r["id"] for r in mine] == [r["id"] for r in theirs]
    assert [r["response"] for r in mine] == [r["response"] for r in theirs]
    assert all(r["written_by"] == {"urls": [server.url], "model": {server.url: "test-model"}} for r in theirs)
    assert writer.servers.requests_per_url[server.url] == 20  # one request per answer
    # The bench's fixed conditions (the screen's answers): the same texts through the server.
    held = select_queries(None, 40, axis="french")[30:]
    local_bench = axis_bench(tiny_engine, axis, None, held[:4], held[4:8])
    remote_bench = axis_bench(tiny_engine, axis, None, held[:4], held[4:8], writer=writer)
    for condition in ("unsteered", "prompting"):
        assert remote_bench.fixed(condition, "choose").answers == local_bench.fixed(condition, "choose").answers
    # Resume: a longer run asks only for the new pairs; a finished file needs no server at all.
    more = select_queries(None, 12, axis="french")
    assert generate_preferences(tiny_engine, more, axis, remote, GREEDY, quiet=True, writer=writer) == (2, 10)
    assert records(remote)[:10] == theirs
    gone = RemoteWriter([f"http://127.0.0.1:{free_port()}"], retries=0)
    assert generate_preferences(tiny_engine, more, axis, remote, GREEDY, quiet=True, writer=gone) == (0, 12)


def test_a_server_on_another_model_is_refused(tmp_path: Path, tiny_engine: Engine, key: None) -> None:
    other = LiveServer(write_tiny_llama(tmp_path / "other.gguf", n_layer=3, n_embd=32), api_key=KEY, parallel=2, ctx=1024)
    try:
        with pytest.raises(AlignezError, match=r"serves another model than tiny \(width 32 there, 64 here\)"):
            RemoteWriter([other.url]).check_model(tiny_engine, "tiny")
    finally:
        other.close()


class UncheckableHandler(StandIn):
    """A stand-in OpenAI-compatible server (no model) that lists nothing, has no /tokenize and
    reports no token counts: every completion is "Bonjour."."""

    def reply(self, body: dict) -> tuple[int, dict]:
        if self.path != "/v1/completions":
            return 404, {"error": {"message": "not found"}}
        return 200, {"choices": [{"index": 0, "text": "Bonjour.", "finish_reason": "stop"}]}


def test_a_server_that_cannot_be_checked_is_named_in_one_line(tmp_path: Path, tiny_engine: Engine) -> None:
    httpd, url = serve_handler(UncheckableHandler)
    try:
        writer = RemoteWriter([url], model="some-model")
        assert writer.check_model(tiny_engine, "tiny") == [
            f"warning: cannot check that the generation server at {url} serves tiny: it lists no vocabulary size, "
            "has no /tokenize and reports no token counts; start it on the same GGUF file"]
        axis, queries = get_axis("french"), select_queries(None, 2, axis="french")
        assert generate_preferences(tiny_engine, queries, axis, tmp_path / "p.jsonl", GREEDY, quiet=True, writer=writer) == (2, 0)
        assert all(r["response"] == {"positive": "Bonjour.", "negative": "Bonjour."} for r in records(tmp_path / "p.jsonl"))
    finally:
        httpd.shutdown()


def run_cli(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNEZ_GENERATE_API_KEY", "OPENAI_API_KEY")}
    env.update(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")
    if key is not None:
        env["ALIGNEZ_GENERATE_API_KEY"] = key
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_failures_are_one_line_and_write_nothing(tmp_path: Path, tiny_model_path: Path, server: LiveServer) -> None:
    out = tmp_path / "pairs.jsonl"
    base = ["generate", "-m", str(tiny_model_path), "--threads", "1", "--limit", "2", "--response-tokens", "8", "-o", str(out)]
    one_error_line(run_cli(*base, "--generate-url", "localhost:8080"), "--generate-url 'localhost:8080' is not an http(s) URL")
    dead = f"http://127.0.0.1:{free_port()}"
    one_error_line(run_cli(*base, "--generate-url", dead), f"cannot reach the generation server at {dead}",
                   "connection refused", "--generate-url")
    one_error_line(run_cli(*base, "--generate-url", server.url, key=None), "needs an API key", "ALIGNEZ_GENERATE_API_KEY")
    other_model = write_tiny_llama(tmp_path / "other.gguf", n_layer=3, n_embd=32)
    one_error_line(run_cli("generate", "-m", str(other_model), *base[3:], "--generate-url", server.url),
                   "serves another model than", "width 64 there, 32 here")
    assert not out.exists()
    ok = run_cli(*base, "--generate-url", server.url)
    assert ok.returncode == 0, ok.stderr
    assert "2 new pairs, 0 already there" in ok.stdout and "serves " in ok.stderr


def test_steer_screens_on_the_server(tmp_path: Path, tiny_model_path: Path, server: LiveServer) -> None:
    before = dict(server.health())
    t0 = time.monotonic()
    r = run_cli("steer", "-m", str(tiny_model_path), "--axis", "french", "--screen-only", "--threads", "1",
                "--generate-url", server.url, "--generate-concurrency", "2")
    assert r.returncode == 0, r.stderr
    assert "the generation server at" in r.stderr and "screen: asked by a system prompt" in r.stderr
    assert server.health()["slots_processing"] == 0 and before["status"] == "ok" and time.monotonic() - t0 < 120
    local = run_cli("steer", "-m", str(tiny_model_path), "--axis", "french", "--screen-only", "--threads", "1")
    screen = [ln for ln in r.stderr.splitlines() if ln.startswith("screen:")]
    assert screen == [ln for ln in local.stderr.splitlines() if ln.startswith("screen:")]


@pytest.mark.slow
def test_steer_end_to_end_through_the_server(tmp_path: Path, tiny_model_path: Path, server: LiveServer) -> None:
    out = tmp_path / "run"
    args = ["steer", "-m", str(tiny_model_path), "--limit", "8", "--response-tokens", "16", "--strengths", "1,8",
            "--threads", "1", "--temperature", "0", "-o", str(out), "--generate-url", server.url]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["text_stages"]["urls"] == [server.url] and rep["text_stages"]["requests_per_url"][server.url] >= 16
    assert KEY not in (out / "report.json").read_text() and KEY not in (out / "preferences.jsonl").read_text()
    assert all(rec["written_by"]["urls"] == [server.url] for rec in records(out / "preferences.jsonl"))
    assert "8 new pairs, 0 already there" in r.stderr  # a re-run's reuse: test_remote_pairs_and_bench_answers_equal_the_local_ones


@pytest.mark.skipif(not LLAMA_SERVER.is_file(), reason="llama.cpp's llama-server is not built here")
def test_llama_server_is_checked_by_its_tokenizer(tmp_path: Path, tiny_model_path: Path, tiny_engine: Engine) -> None:
    port = free_port()
    with open(tmp_path / "llama-server.log", "w") as log:
        proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(tiny_model_path), "--port", str(port), "-t", "1",
                                 "-np", "2", "-c", "2048", "-fa", "off"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        writer = RemoteWriter([url], concurrency=2, retries=8)  # retried while it loads (503)
        lines = writer.check_model(tiny_engine, "tiny")
        assert any("token ids of a probe prompt" in ln and "vocabulary 328" in ln for ln in lines), lines
        assert any(ln.startswith("note:") and "repeat-penalty" in ln for ln in lines), lines
        axis, queries = get_axis("french"), select_queries(None, 6, axis="french")
        plain = GenerationSettings(temperature=0.0, response_tokens=16, repeat_penalty=1.0)
        generate_preferences(tiny_engine, queries, axis, tmp_path / "l.jsonl", plain, quiet=True)
        generate_preferences(tiny_engine, queries, axis, tmp_path / "r.jsonl", plain, quiet=True, writer=writer)
        same = sum(a["response"] == b["response"] for a, b in zip(records(tmp_path / "l.jsonl"), records(tmp_path / "r.jsonl")))
        # The random model's answers are mostly byte tokens whose text can end mid-character, which
        # llama-server and the local detokenizer end differently; most pairs still agree.
        assert same >= 4, same
    finally:
        proc.terminate()
        proc.wait(30)
