"""A judge on any OpenAI-compatible server: margins from the API's token log-probabilities.

``RemoteBackend`` is ``judge.py``'s ``MarginBackend`` over HTTP (httpx, the ``remote`` extra). Each
judge request is one ``POST {URL}/v1/chat/completions`` with the same system and user messages the
local judge formats with its chat template, and ``max_tokens=1, temperature=0, logprobs=true,
top_logprobs=20``. The margin ``log p(word 1) - log p(word 2)`` is read from ``top_logprobs`` of the
first generated token: ``log p(word)`` is the logsumexp of the listed tokens whose text, stripped of
whitespace, is exactly the word ("Yes", " Yes", "\\nYes"...), as the local judge sums its "Yes" and
" Yes" tokens.

A word absent from the top list gets a bound: the smallest listed log-probability (each of its
tokens is less likely than that). The margin is then a bound too (at least that large when the
second word is missing, at most when the first is; 0 when both are), and ``bounded`` counts these
judgments (the report records it). A server that lists 20 alternatives rarely leaves a verdict word
out when the judge was asked for it.

Fan-out: requests are shared out over every URL, ``concurrency`` in flight per server, each
server's workers taking the next request as soon as one is done (a faster server takes more).
Connection errors, timeouts, 429 and 5xx replies are retried ``retries`` times with exponential
backoff; what still fails, and any reply a retry cannot fix (401/403, another 4xx, no log-
probabilities), stops the run with one AlignezError line. Every margin is handed to the caller as it
arrives (``on_result``), so the judge's cache keeps what finished before an error or Ctrl-C.

The API key comes from the environment only (``ALIGNEZ_JUDGE_API_KEY``, else ``OPENAI_API_KEY``),
never from the command line, and is never written to a report.

Pairwise mode needs the judge's reply prefilled with "[[" (``judge.PAIRWISE_PREFIX``); a chat
completions API has no faithful way to do that (an assistant message at the end is continued by some
servers and answered by others), so a remote judge refuses it.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any

from scipy.special import logsumexp

from alignez_local.errors import AlignezError
from alignez_local.evaluation.judge import NO_REMOTE_PAIRWISE, ResultFn
from alignez_local.evaluation.judge_prompts import JudgeRequest

KEY_ENVS = ("ALIGNEZ_JUDGE_API_KEY", "OPENAI_API_KEY")
"""Where the API key is read from, first set wins."""
TOP_LOGPROBS = 20  # OpenAI's maximum
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 3
BACKOFF_S = 0.5  # first retry after 0.5 s, then 1, 2, ...
MAX_BACKOFF_S = 30.0

NO_LOGPROBS = ("the server at {url} returned no token log-probabilities; the remote judge needs logprobs/top_logprobs "
               "(llama-server and alignez serve give them)")


def api_key() -> tuple[str | None, str | None]:
    """Return (key, the variable it came from), (None, None) when none is set."""
    for name in KEY_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None, None


def base_url(url: str) -> str:
    """Return the server's base URL (no trailing / or /v1); AlignezError when it is no http(s) URL."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")) or len(u.split("://", 1)[1]) == 0:
        raise AlignezError(f"--judge-url {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8080")
    return u[: -len("/v1")] if u.endswith("/v1") else u


def top_logprobs(reply: Any) -> list[tuple[str, float]] | None:
    """Return (token text, log-probability) of the first generated token and its listed alternatives,
    None when the reply carries none (OpenAI's chat completion shape)."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
        listed = [(str(e["token"]), e["logprob"]) for e in first.get("top_logprobs") or []]
        listed.append((str(first["token"]), first["logprob"]))
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    out = [(t, float(lp)) for t, lp in listed if isinstance(lp, (int, float)) and not isinstance(lp, bool)]
    return out or None


def word_margin(listed: Sequence[tuple[str, float]], words: tuple[str, str]) -> tuple[float, bool]:
    """Return (log p(words[0]) - log p(words[1]), whether a word was missing and bounded).

    Tokens count for a word when their text stripped is exactly the word; the same token listed twice
    (the generated token is also the first alternative) counts once. A word with no listed token gets
    the smallest listed log-probability (module docstring).
    """
    uniq = dict(listed)
    floor = min(uniq.values())
    logp = []
    for word in words:
        lps = [lp for tok, lp in uniq.items() if tok.strip() == word and lp > -math.inf]
        logp.append(float(logsumexp(lps)) if lps else floor)
    bounded = any(not [t for t in uniq if t.strip() == w] for w in words)
    return logp[0] - logp[1], bounded


class RemoteBackend:
    """Judge margins from OpenAI-compatible servers (one model name, one or more URLs)."""

    engine = None  # no local model

    def __init__(self, urls: Sequence[str], model: str, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES) -> None:
        """Return the backend (AlignezError for bad settings or a missing httpx; nothing is sent yet)."""
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise AlignezError("the remote judge needs httpx; install it with: pip install 'alignez-local[remote]'") from None
        if not urls:
            raise AlignezError("the remote judge needs at least one --judge-url")
        if not model or not model.strip():
            raise AlignezError("--judge-url needs --judge-model NAME: the model name the server serves (see its /v1/models)")
        if concurrency < 1 or not (timeout > 0) or retries < 0:
            raise AlignezError("--judge-concurrency must be at least 1, --judge-timeout above 0 and retries at least 0")
        self.urls = list(dict.fromkeys(base_url(u) for u in urls))
        self.model = model.strip()
        self.name = f"{self.model} at {', '.join(self.urls)}"
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.bounded = 0  # judgments with a verdict word outside the server's top list
        self.requests_per_url = dict.fromkeys(self.urls, 0)

    def cache_id(self) -> str:
        """Return the model name: the same model behind other URLs gives the same judgments."""
        return f"remote:{self.model}"

    def describe(self) -> dict[str, Any]:
        """Return the URLs, model name and reading rule (never the API key)."""
        return {"model": self.model, "model_name": self.model, "urls": self.urls,
                "api": "POST /v1/chat/completions, max_tokens 1, temperature 0, top_logprobs 20",
                "verdict_tokens": "tokens in top_logprobs whose stripped text is the word; a missing word gets "
                                  "the smallest listed log-probability",
                "bounded_judgments": self.bounded, "requests_per_url": self.requests_per_url}

    def close(self) -> None:
        """Return None (connections live only within one ``margins`` call)."""

    def body(self, req: JudgeRequest) -> dict[str, Any]:
        """Return the chat completion request of one judgment."""
        if req.prefix:
            raise AlignezError(NO_REMOTE_PAIRWISE)
        return {"model": self.model,
                "messages": [{"role": "system", "content": req.system}, {"role": "user", "content": req.user}],
                "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}

    def margins(self, requests: Sequence[JudgeRequest], words: tuple[str, str], on_result: ResultFn) -> None:
        """Return None after every request's margin was handed to ``on_result`` (AlignezError when a
        server fails for good; Ctrl-C cancels the requests in flight and raises KeyboardInterrupt)."""
        bodies = [self.body(r) for r in requests]
        asyncio.run(self._fan_out(bodies, words, on_result))

    async def _fan_out(self, bodies: list[dict[str, Any]], words: tuple[str, str], on_result: ResultFn) -> None:
        import httpx

        key, _ = api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        todo = deque(range(len(bodies)))
        n = self.concurrency * len(self.urls)
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits) as client:

            async def worker(url: str) -> None:
                while todo:
                    i = todo.popleft()
                    margin = await self._one(client, url, bodies[i], words)
                    self.requests_per_url[url] += 1
                    on_result(i, margin)

            tasks = [asyncio.create_task(worker(u)) for u in self.urls for _ in range(self.concurrency)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()  # the first failure, as its one-line AlignezError
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client: Any, url: str, body: dict[str, Any], words: tuple[str, str]) -> float:
        """Return one judgment's margin, retrying what a retry can fix."""
        import httpx

        endpoint = url + "/v1/chat/completions"
        failure = ""
        for attempt in range(self.retries + 1):
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt)
            try:
                r = await client.post(endpoint, json=body)
            except httpx.TimeoutException:
                failure = (f"the judge server at {url} did not answer within {self.timeout:g} s (--judge-timeout), "
                           f"{self.retries + 1} tries; raise --judge-timeout or lower --judge-concurrency")
            except httpx.TransportError as err:
                failure = (f"cannot reach the judge server at {url} ({_reason(err)}), {self.retries + 1} tries; "
                           "is it running? check --judge-url")
            else:
                if r.status_code == 200:
                    return self._read(r, url, words)
                if r.status_code in (401, 403):
                    raise AlignezError(_key_message(url, r.status_code))
                if r.status_code != 429 and r.status_code < 500:
                    hint = "; give the server's base URL, e.g. http://127.0.0.1:8080" if r.status_code == 404 else ""
                    raise AlignezError(f"the judge server at {url} rejected the request (HTTP {r.status_code}: "
                                       f"{_error_text(r)}){hint}")
                failure = (f"the judge server at {url} failed with HTTP {r.status_code} ({_error_text(r)}), "
                           f"{self.retries + 1} tries")
                wait = max(wait, min(MAX_BACKOFF_S, _retry_after(r)))
            if attempt < self.retries:
                await asyncio.sleep(wait)
        raise AlignezError(failure)

    def _read(self, r: Any, url: str, words: tuple[str, str]) -> float:
        """Return the margin of a 200 reply (AlignezError when it has no log-probabilities)."""
        try:
            reply = r.json()
        except ValueError:
            raise AlignezError(f"the judge server at {url} did not answer with JSON; is it an OpenAI-compatible server?") from None
        listed = top_logprobs(reply)
        if listed is None:
            raise AlignezError(NO_LOGPROBS.format(url=url))
        margin, bounded = word_margin(listed, words)
        self.bounded += bounded
        return margin


def _reason(err: BaseException) -> str:
    """Return a few words on a transport error ("connection refused", ...), from its causes too."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower():
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "unknown host"
        e = e.__cause__ or e.__context__
    return type(err).__name__ + (f": {str(err)[:80]}" if str(err) else "")


def _key_message(url: str, status: int) -> str:
    """Return the one line for a 401/403: which variable to set."""
    key, var = api_key()
    if key is None:
        return (f"the judge server at {url} needs an API key (HTTP {status}); set {KEY_ENVS[0]} "
                f"(or {KEY_ENVS[1]}) to its key")
    return f"the judge server at {url} refused the API key from {var} (HTTP {status}); set {KEY_ENVS[0]} to that server's key"


def _error_text(r: Any) -> str:
    """Return the server's error message (OpenAI's error shape, else the start of the body)."""
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = r.text
    return " ".join(str(msg).split())[:160] or "no message"


def _retry_after(r: Any) -> float:
    """Return the seconds a 429/503 reply asks to wait (0 when it does not say)."""
    try:
        return max(0.0, float(r.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0
