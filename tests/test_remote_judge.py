"""The remote judge (``evaluation/remote_judge.py``) over real HTTP against the real ``alignez serve``
app on a free port (``test_serve_http.LiveServer``: create_app + uvicorn, one engine thread).

- Its margins equal the local Judge's on the same model (SmolLM2-135M) for 32 (question, answer)
  pairs (quality), and 8 of them for the refusal and yes/no questions: within TOL nats (see there).
- ``alignez eval --judge-url`` run as a subprocess (tiny random model answering, the tiny model
  served as judge: only the mechanics are checked): a dead server, a slow one, one without
  log-probabilities and a wrong or missing key each end the run with one ``error:`` line, no
  traceback, and lose no finished work (the answers, and every finished judgment in
  judge_cache.jsonl, are reused by ``--resume``).
- Retries and the request's shape against small stand-in servers (``http.server``, no model): a 503
  is retried, a 400 is one line at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignez_local.errors import AlignezError
from alignez_local.evaluation.judge import Judge
from alignez_local.evaluation.judge_cache import JudgeCache
from alignez_local.evaluation.remote_judge import NO_LOGPROBS, RemoteBackend, word_margin
from alignez_local.llama.engine import Engine
from test_eval_resume import _write_vector

from alignez_local.testing import free_port, judge_pairs
from test_serve_http import KEY, LiveServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "eval"]

# Remote and local margins of the same prompt, both decoded alone (server --parallel 1 and one
# request in flight; a local engine with one slot and no shared prefix): the same llama.cpp decode
# of the same tokens, so the logits are the same bits (test_serve_logprobs measured the server's
# logprobs bit-identical to Engine.generate's). What is left is that the local judge also sums the
# verdict tokens the server's top 20 leave out (SmolLM2's " Yes"/" No", about e^-10 here, adding
# about 1e-4 nats), so TOL = 2e-3 nats, far below the 0.5-nat tie margin. Decoded in other batch
# shapes the two differ by much more: SmolLM2's margins move by up to 0.25 nats between a prompt
# decoded alone and in a batch of 8 (llama.cpp's sums depend on the batch; docs/results.md).
TOL = 2e-3


def test_word_margin_reads_every_spacing_and_bounds_a_missing_word() -> None:
    listed = [("Yes", -1.0), (" Yes", -2.0), ("No", -1.5), ("\nNo", -3.0), ("Maybe", -4.0), ("Yes", -1.0)]
    m, bounded = word_margin(listed, ("Yes", "No"))
    assert not bounded
    assert m == pytest.approx(np.logaddexp(-1.0, -2.0) - np.logaddexp(-1.5, -3.0))
    # "No" is not listed: it gets the smallest listed log-probability, and the judgment is marked.
    m, bounded = word_margin([("Yes", -0.5), ("Sure", -2.0), ("Ok", -6.0)], ("Yes", "No"))
    assert bounded and m == pytest.approx(-0.5 - -6.0)


@pytest.mark.smollm
@pytest.mark.slow
def test_remote_margins_equal_the_local_judges(smollm_path: Path) -> None:
    pairs = judge_pairs(32)
    few = pairs[:8]  # the other questions share the code path; 8 keep the test's minutes down
    assert len(pairs) >= 32 and len(set(pairs)) == len(pairs)
    instruction = "Does this answer address the question?"
    srv = LiveServer(smollm_path, api_key=None, parallel=1, ctx=4096, max_tokens=1)
    try:
        remote = Judge(RemoteBackend([srv.url], "smollm2", concurrency=1))
        got = [remote.scores(pairs), remote.refusal_scores(few), remote.yes_probability(instruction, few)]
        assert remote.backend.bounded == 0  # both verdict words were in every top-20 list
        assert remote.calls == len(pairs) + 2 * len(few) and remote.engine is None
    finally:
        srv.close()
    with Engine(smollm_path, n_ctx=4096, n_threads=1, n_parallel=1) as eng:
        eng.share_prefix = False  # each prompt decoded whole, as the server decodes it
        local = Judge(eng)
        want = [local.scores(pairs), local.refusal_scores(few), local.yes_probability(instruction, few)]
    for g, w in zip(got, want):
        assert np.isfinite(g).all() and np.ptp(g) > 0.01  # real, varied numbers
        np.testing.assert_allclose(g, w, atol=TOL)


def test_remote_pairwise_is_refused() -> None:
    backend = RemoteBackend(["http://127.0.0.1:9"], "m")
    with pytest.raises(AlignezError, match="pairwise"):
        Judge(backend, mode="pairwise")


# --- alignez eval --judge-url through the CLI ------------------------------------------------------


class StandIn(BaseHTTPRequestHandler):
    """A stand-in for a third-party OpenAI-compatible server (no model): ``reply(body)`` gives the
    status and JSON of each POST."""

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        status, reply = self.reply(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class NoLogprobsHandler(StandIn):
    """A stand-in for a third-party OpenAI-compatible server that does not return log-probabilities
    (not for llama.cpp: llama-server and alignez serve return them): a valid chat completion, no
    ``logprobs``."""

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Yes"}, "finish_reason": "length"}]}


class FlakyHandler(StandIn):
    """A stand-in third-party server (no model) that fails its first two requests with 503, then
    answers with fixed log-probabilities; a request for model "bad" gets a 400."""

    seen: list[dict[str, Any]] = []

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        FlakyHandler.seen.append(body)
        if body["model"] == "bad":
            return 400, {"error": {"message": "no such model: bad"}}
        if len(FlakyHandler.seen) <= 2:
            return 503, {"error": {"message": "loading"}}
        top = [{"token": "Yes", "logprob": -0.5}, {"token": " Yes", "logprob": -2.0}, {"token": "No", "logprob": -1.5}]
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
                                  "logprobs": {"content": [{"token": "Yes", "logprob": -0.5, "top_logprobs": top}]}}]}


def serve_handler(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Return a stand-in server running in a thread, and its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_5xx_is_retried_and_4xx_is_one_line() -> None:
    httpd, url = serve_handler(FlakyHandler)
    try:
        judge = Judge(RemoteBackend([url + "/v1"], "m", concurrency=1))
        [m] = judge.scores([("Is the sky blue?", "Yes, on a clear day.")])
        assert m == pytest.approx(np.logaddexp(-0.5, -2.0) - -1.5)
        assert len(FlakyHandler.seen) == 3  # two 503s retried, then the answer
        sent = FlakyHandler.seen[-1]
        assert sent["max_tokens"] == 1 and sent["temperature"] == 0 and sent["logprobs"] is True
        assert sent["top_logprobs"] == 20 and [m["role"] for m in sent["messages"]] == ["system", "user"]
        FlakyHandler.seen.clear()
        with pytest.raises(AlignezError, match="HTTP 400: no such model: bad"):
            Judge(RemoteBackend([url], "bad")).scores([("q", "a")])
        assert len(FlakyHandler.seen) == 1  # a 4xx is not retried
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def no_logprobs_url() -> Iterator[str]:
    httpd, url = serve_handler(NoLogprobsHandler)
    yield url
    httpd.shutdown()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tiny_model_path, api_key=KEY, parallel=4, ctx=2048, max_tokens=1)
    yield srv
    srv.close()


def run_eval_cli(out: Path, model: Path, vector: Path, urls: list[str], *extra: str,
                 key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNEZ_JUDGE_API_KEY", "OPENAI_API_KEY")}
    env.update(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")
    if key is not None:
        env["ALIGNEZ_JUDGE_API_KEY"] = key
    args = [*CLI, "-m", str(model), "--vector", str(vector), "--kinds", "helpful", "--limit", "4",
            "--max-tokens", "6", "--threads", "1", "--ctx", "1024", "--parallel", "4", "--out", str(out),
            "--judge-model", "tiny", "--behaviour", "off", *extra]
    for u in urls:
        args += ["--judge-url", u]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Return the run's error line after checking: exit code != 0, no traceback, exactly one
    ``error:`` line, the last of stderr, containing every needle."""
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def saved_answers(out: Path) -> list[tuple[str, ...]]:
    """Return every saved (unsteered, steered...) answer text per prompt of OUT/report.json."""
    rep = json.loads((out / "report.json").read_text())
    return [(p["unsteered"]["answer"], *(s["answer"] for s in p["steered"])) for p in rep["prompts"]]


def cache_lines(path: Path) -> list[str]:
    """Return the lines of a judge cache file ([] when there is none)."""
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_eval_judge_url_failures_are_one_line_and_keep_finished_work(
        tmp_path: Path, tiny_model_path: Path, tiny_server: LiveServer, no_logprobs_url: str) -> None:
    vector = _write_vector(tmp_path / "v.gguf", seed=1)
    out = tmp_path / "eval"
    dead = f"http://127.0.0.1:{free_port()}"
    good = tiny_server.url

    # A dead server: the answers are done and saved before judging fails.
    r = run_eval_cli(out, tiny_model_path, vector, [dead])
    one_error_line(r, dead, "connection refused", "report.json")
    answers = saved_answers(out)
    assert len(answers) == 4 and all(len(a) == 2 for a in answers)
    assert json.loads((out / "report.json").read_text())["complete"] is False

    def again(urls: list[str], *extra: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        r = run_eval_cli(out, tiny_model_path, vector, urls, "--resume", *extra, key=key)
        assert saved_answers(out) == answers  # the answers are reused, never redone nor lost
        return r

    # A slow server (the real alignez serve, a timeout shorter than any reply), a server without
    # log-probabilities, a wrong key and no key: one line each, saying what to do.
    one_error_line(again([good], "--judge-timeout", "0.001"), good, "did not answer within 0.001 s", "--judge-timeout")
    one_error_line(again([no_logprobs_url]), NO_LOGPROBS.format(url=no_logprobs_url))
    one_error_line(again([good], key="sk-wrong"), good, "HTTP 401", "ALIGNEZ_JUDGE_API_KEY")
    one_error_line(again([good], key=None), good, "needs an API key", "ALIGNEZ_JUDGE_API_KEY")
    assert cache_lines(out / "judge_cache.jsonl") == []  # nothing was judged yet

    # A good server beside a dead one: the good one's judgments are on disk when the dead one's
    # retries give up, and the error line counts them.
    r = again([good, dead], "--judge-concurrency", "1")
    kept = len(cache_lines(out / "judge_cache.jsonl"))
    one_error_line(r, dead, f"{kept} finished judgments", "judge_cache.jsonl")
    assert kept >= 1

    # The good server alone finishes the run, asking it only for what was not finished.
    r = again([good])
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] is True
    distinct = len({(p["prompt"], a) for p, grp in zip(rep["prompts"], answers) for a in grp})
    assert rep["judge"]["cached_judgments"] == kept
    assert rep["judge"]["prompts_decoded"] == distinct - kept
    assert all(p["steered"][0]["verdict"]["outcome"] in ("win", "tie", "loss") for p in rep["prompts"])
    # The report names the servers and the model, never the key.
    assert rep["models"]["judge"]["urls"] == [good] and rep["models"]["judge"]["model"] == "tiny"
    assert rep["settings"]["judge"] == "tiny"
    for name in ("report.json", "summary.md", "judge_cache.jsonl"):
        assert KEY not in (out / name).read_text()


def test_eval_remote_pairwise_fails_before_answering(tmp_path: Path, tiny_model_path: Path) -> None:
    vector = _write_vector(tmp_path / "v.gguf", seed=1)
    r = run_eval_cli(tmp_path / "eval", tiny_model_path, vector, ["http://127.0.0.1:9"], "--mode", "pairwise")
    one_error_line(r, "--mode pairwise", "--mode score")
    assert not (tmp_path / "eval" / "report.json").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_judgments(tmp_path: Path, tiny_server: LiveServer) -> None:
    pairs = [(f"Question {i}?", f"Answer {i}.") for i in range(12)]
    os.environ["ALIGNEZ_JUDGE_API_KEY"] = KEY
    try:
        cache = JudgeCache(tmp_path / "c.jsonl")
        judge = Judge(RemoteBackend([tiny_server.url], "tiny", concurrency=2), cache=cache)

        def stop_after_five(done: int, total: int) -> None:
            if done >= 5:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            judge.scores(pairs, stop_after_five)
        cache.close()
        kept = len(cache_lines(tmp_path / "c.jsonl"))
        assert kept == 5
        # A new judge on the same cache asks only for the rest, and gets the numbers a fresh run gets.
        again = Judge(RemoteBackend([tiny_server.url], "tiny"), cache=JudgeCache(tmp_path / "c.jsonl"))
        resumed = again.scores(pairs)
        assert again.cached == kept and again.calls == len(pairs) - kept
        fresh = Judge(RemoteBackend([tiny_server.url], "tiny", concurrency=1)).scores(pairs)
        np.testing.assert_allclose(resumed, fresh, atol=0.05)  # the tiny model: batch shapes move the bits
    finally:
        del os.environ["ALIGNEZ_JUDGE_API_KEY"]
