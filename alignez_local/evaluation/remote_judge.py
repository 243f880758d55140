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

Fan-out, retries, one-line errors and the API key (``ALIGNEZ_JUDGE_API_KEY``, else
``OPENAI_API_KEY``, from the environment only) are ``remote_api.py``'s, shared with ``steer
--generate-url``: requests are shared out over every URL, ``concurrency`` in flight per server,
failures a retry can fix are retried, and every margin is handed to the caller as it arrives
(``on_result``), so the judge's cache keeps what finished before an error or Ctrl-C.

Pairwise mode needs the judge's reply prefilled with "[[" (``judge.PAIRWISE_PREFIX``); a chat
completions API has no faithful way to do that (an assistant message at the end is continued by some
servers and answered by others), so a remote judge refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy.special import logsumexp

from alignez_local.errors import AlignezError
from alignez_local.evaluation.judge import NO_REMOTE_PAIRWISE, ResultFn
from alignez_local.evaluation.judge_prompts import JudgeRequest
from alignez_local.remote_api import DEFAULT_CONCURRENCY, DEFAULT_RETRIES, Role, Servers
from alignez_local.remote_api import base_url as _base_url

KEY_ENVS = ("ALIGNEZ_JUDGE_API_KEY", "OPENAI_API_KEY")
"""Where the API key is read from, first set wins."""
ROLE = Role("judge", "--judge", KEY_ENVS)
TOP_LOGPROBS = 20  # OpenAI's maximum
DEFAULT_TIMEOUT = 120.0

NO_LOGPROBS = ("the server at {url} returned no token log-probabilities; the remote judge needs logprobs/top_logprobs "
               "(llama-server and alignez serve give them)")


def base_url(url: str) -> str:
    """Return the server's base URL (no trailing / or /v1); AlignezError when it is no http(s) URL."""
    return _base_url(url, "--judge-url")


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
        if not model or not model.strip():
            raise AlignezError("--judge-url needs --judge-model NAME: the model name the server serves (see its /v1/models)")
        self.servers = Servers(urls, ROLE, concurrency, timeout, retries)
        self.urls = self.servers.urls
        self.model = model.strip()
        self.name = f"{self.model} at {', '.join(self.urls)}"
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.bounded = 0  # judgments with a verdict word outside the server's top list
        self.requests_per_url = self.servers.requests_per_url

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
        self.servers.fan_out("/v1/chat/completions", bodies, len(bodies), lambda reply, url: self._read(reply, url, words),
                             on_result)

    def _read(self, reply: Any, url: str, words: tuple[str, str]) -> float:
        """Return the margin of a reply (AlignezError when it has no log-probabilities)."""
        listed = top_logprobs(reply)
        if listed is None:
            raise AlignezError(NO_LOGPROBS.format(url=url))
        margin, bounded = word_margin(listed, words)
        self.bounded += bounded
        return margin
