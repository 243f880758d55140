"""Request bodies of /v1/chat/completions and /v1/completions, checked field by field.

Every problem becomes an ``ApiError`` (400, OpenAI's shape) naming the field, so a client learns
what to fix. Fields the server does not know are ignored, as llama.cpp's and llama-cpp-python's
servers do (clients send many optional ones).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any

from alignez_local.apps.serve.errors import ApiError
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine, Sampling

MAX_STOPS = 4  # OpenAI's limit
MAX_TOKENS = 32768  # Sampling.check's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit of top_logprobs (also taken for the legacy logprobs: N)


@dataclass(frozen=True)
class GenRequest:
    """A checked generation request, ready for the worker."""

    chat: bool
    prompt: str
    n_prompt: int
    sampling: Sampling
    steering: dict[str, float]
    stream: bool
    include_usage: bool
    model: str
    # None: no logprobs. k: each token's logprob and its k most likely alternatives (chat:
    # logprobs=true, top_logprobs=k; /v1/completions: logprobs=k, the legacy shape).
    logprobs: int | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    """Return the JSON object in ``raw`` (ApiError when it is not one)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON ({err}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"{key} must be a number, got {v!r}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(f"{key} {v} is out of range; use {lo:g} to {hi:g}", param=key, code="invalid_value")
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{key} must be an integer, got {v!r}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(f"{key} {v} is out of range; use {lo} to {hi}", param=key, code="invalid_value")
    return v


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"{key} must be true or false, got {v!r}", param=key, code="invalid_type")
    return v


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOPS:
        raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop", code="invalid_type")
    return tuple(items)


def _content(m: dict[str, Any], i: int) -> str:
    """Return a message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content", code="invalid_type")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError("messages is required: a list of {role, content} objects", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty list of {role, content} objects", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(f"messages[{i}] needs a role: system, user or assistant", param=f"messages[{i}].role", code="invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompt(body: dict[str, Any]) -> str:
    p = body.get("prompt")
    if p is None:
        raise ApiError("prompt is required: a string", param="prompt", code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise ApiError("prompt must be a string (or a list holding one string); send one prompt per request", param="prompt", code="invalid_type")
    return p


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Return how many alternatives per token the request wants, or None when it wants no logprobs."""
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if chat:
        if _flag(body, "logprobs"):
            return top or 0
        if top is not None:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return None
    if top is not None:
        raise ApiError(f"top_logprobs is a chat completions field; on /v1/completions send logprobs: N (0 to {MAX_TOP_LOGPROBS})",
                       param="top_logprobs", code="invalid_value")
    if body.get("logprobs") is False:
        return None
    if body.get("logprobs") is True:
        raise ApiError(f"logprobs on /v1/completions is how many alternatives per token: an integer, 0 to {MAX_TOP_LOGPROBS}",
                       param="logprobs", code="invalid_type")
    return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def parse_request(
    body: dict[str, Any], chat: bool, engine: Engine, steering: SteeringSet, default_max_tokens: int
) -> GenRequest:
    """Return the checked request in ``body`` (ApiError naming the field otherwise).

    Tokenizes the prompt here (the vocabulary is read-only, so this is safe beside a running
    decode) to refuse a prompt that cannot fit the context before anything is streamed.
    """
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ApiError("model must be a string", param="model", code="invalid_type")
    n = _integer(body, "n", 1, 1)
    del n  # only one choice per request; anything else was refused above
    field = "messages" if chat else "prompt"
    if chat:
        try:
            prompt = engine.format_chat(_messages(body))
        except AlignezError as err:
            raise ApiError(str(err), param="messages", code="invalid_value") from None
    else:
        prompt = _prompt(body)
    n_prompt = len(engine.tokenize(prompt))
    if n_prompt == 0:
        raise ApiError(f"{field} is empty; give some text", param=field, code="invalid_value")
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS) if chat else None
    max_tokens = max_tokens or _integer(body, "max_tokens", 1, MAX_TOKENS)
    room = engine.n_ctx - n_prompt
    if room < 1 or (max_tokens is not None and max_tokens > room):
        want = f" + {max_tokens} to generate" if max_tokens else ""
        raise ApiError(
            f"this model's context is {engine.n_ctx} tokens, but the request needs {n_prompt} prompt tokens{want}; "
            "shorten the prompt or lower max_tokens", param=field, code="context_length_exceeded",
        )
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    sampling = Sampling(
        temperature=temperature,
        top_p=_number(body, "top_p", 1e-9, 1.0, 1.0),
        top_k=_integer(body, "top_k", 0, 1 << 20) or 0,
        # No seed: a fresh one per request, as OpenAI does. A given seed is folded into llama.cpp's range.
        seed=(seed % (2**32 - 1)) if seed is not None else random.randrange(2**32 - 1),
        max_tokens=max_tokens or min(default_max_tokens, room),
        repeat_penalty=_number(body, "repeat_penalty", 0.5, 3.0, 1.0),
        stop=_stops(body) or ((engine.default_stop) if chat else ()),
    )
    try:
        chosen = steering.resolve(body.get("steering"))
    except AlignezError as err:
        raise ApiError(str(err), param="steering", code="invalid_steering") from None
    logprobs = _logprobs(body, chat)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("stream_options must be an object", param="stream_options", code="invalid_type")
    return GenRequest(
        chat=chat, prompt=prompt, n_prompt=n_prompt, sampling=sampling, steering=chosen,
        stream=_flag(body, "stream"), include_usage=_flag(opts or {}, "include_usage"), model=model, logprobs=logprobs,
    )
