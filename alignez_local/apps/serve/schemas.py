"""Request bodies of /v1/chat/completions and /v1/completions, checked field by field.

Every problem becomes an ``ApiError`` (400, OpenAI's shape) naming the field, so a client learns
what to fix. OpenAI fields the server does not implement (tools, response_format, logit_bias ...)
are refused by name unless they hold their neutral value (``UNSUPPORTED``); fields that change
nothing here (``user``, ``metadata``, ``store`` ...) and other servers' extensions are ignored, as
llama.cpp's and llama-cpp-python's servers do.

``parse_request`` runs on a worker thread, never on the event loop: rendering the chat template
and tokenizing cost time in proportion to the request, so the ``Limits`` bound every step of it
(body bytes, messages, text bytes, tokens) before the step runs.
"""

from __future__ import annotations

import json
import math
import random
import reprlib
from dataclasses import dataclass
from typing import Any

from alignez_local.apps.serve.errors import ApiError
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.llama.vocab import PromptTooLong

MAX_STOPS = 4  # OpenAI's limit
MAX_TOKENS = 32768  # Sampling.check's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit of top_logprobs (also taken for the legacy logprobs: N)
MAX_MODEL_NAME = 256  # the model field is echoed back; no id is longer
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system

# OpenAI's fields for features this server lacks, with the values that ask for nothing (clients
# often send these by default). Any other value gets a 400 naming the field.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "grammar": (None, ""),  # llama-server's structured-output fields, which a client may try here
    "json_schema": (None, {}),
}

_show = reprlib.Repr()
_show.maxstring = _show.maxother = 40
_show.maxlevel = 3  # a value nested 900 deep is shown shallowly, never recursed into


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (``alignez serve``'s --max-body-mb, --max-messages,
    --max-prompt-tokens, --completions-specials; docs/serve.md)."""

    max_body_bytes: int = 4_000_000  # --max-body-mb 4
    max_messages: int = 2048
    max_prompt_tokens: int | None = None  # None: the context
    # /v1/completions' raw prompt: control-token text read as control tokens (llama-server's way,
    # and what a raw prompt is for); False reads it as text, as chat content always is.
    completions_specials: bool = True


@dataclass(frozen=True)
class GenRequest:
    """A checked generation request, ready for the worker."""

    chat: bool
    prompt: str  # /v1/completions: the raw prompt (logprobs' text offsets count from its end); chat: ""
    tokens: list[int]
    sampling: Sampling
    steering: dict[str, float]
    stream: bool
    include_usage: bool
    model: str
    # None: no logprobs. k: each token's logprob and its k most likely alternatives (chat:
    # logprobs=true, top_logprobs=k; /v1/completions: logprobs=k, the legacy shape).
    logprobs: int | None = None

    @property
    def n_prompt(self) -> int:
        return len(self.tokens)


def parse_json(raw: bytes) -> dict[str, Any]:
    """Return the JSON object in ``raw`` (ApiError when it is not one)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON ({_show.repr(str(err))}); send a JSON object",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply; send a JSON object of a few levels", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    return body


def _text(value: str, param: str) -> str:
    """Return ``value`` when it can be encoded as UTF-8 (JSON's ``"\\ud800"`` is a lone surrogate that cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{param} is not valid Unicode text (it holds a lone surrogate such as \\ud800)",
                       param=param, code="invalid_value") from None
    return value


def _neutral(v: Any, n: Any) -> bool:
    # Python has True == 1 and 0 == False; JSON does not.
    return v is n if isinstance(v, bool) or isinstance(n, bool) else v == n


def _unsupported(body: dict[str, Any]) -> None:
    for key, neutral in UNSUPPORTED.items():
        v = body.get(key)
        if not any(_neutral(v, n) for n in neutral):
            raise ApiError(f"{key} is not supported by this server (alignez serve generates plain text only); "
                           f"leave it out", param=key, code="unsupported_parameter")


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    # An int is finite whatever its size (math.isfinite would overflow on a 400-digit one).
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(f"{key} must be a number, got {_show.repr(v)}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(f"{key} {_show.repr(v)} is out of range; use {lo:g} to {hi:g}", param=key, code="invalid_value")
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{key} must be an integer, got {_show.repr(v)}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(f"{key} {_show.repr(v)} is out of range; use {lo} to {hi}", param=key, code="invalid_value")
    return v


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"{key} must be true or false, got {_show.repr(v)}", param=key, code="invalid_type")
    return v


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOPS:
        raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop", code="invalid_type")
    return tuple(_text(s, "stop") for s in items)


def _content(m: dict[str, Any], i: int) -> str:
    """Return a message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return _text(c, f"messages[{i}].content")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
        return _text("".join(p["text"] for p in c), f"messages[{i}].content")
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content", code="invalid_type")


def _messages(body: dict[str, Any], limit: int) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError("messages is required: a list of {role, content} objects", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty list of {role, content} objects", param="messages", code="invalid_type")
    if len(msgs) > limit:
        raise ApiError(f"messages holds {len(msgs)} messages; this server takes at most {limit} (--max-messages)",
                       param="messages", code="too_many_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ApiError(f"messages[{i}] needs a role: {', '.join(ROLES[:-1])} or {ROLES[-1]} (tool calls are not supported)",
                           param=f"messages[{i}].role", code="invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(f"messages[{i}] holds tool calls, which this server does not support",
                           param=f"messages[{i}].tool_calls", code="unsupported_parameter")
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
    return _text(p, "prompt")


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
    raw: bytes, chat: bool, engine: Engine, steering: SteeringSet, default_max_tokens: int, limits: Limits = Limits()
) -> GenRequest:
    """Return the checked request in the JSON body ``raw`` (ApiError naming the field otherwise).

    Tokenizes the prompt (the vocabulary is read-only, so this is safe beside a running decode,
    on any thread) to refuse one that cannot fit before anything is streamed. Chat content is
    tokenized as text: only the chat template's own markup yields control tokens.
    """
    try:
        return _parse_request(parse_json(raw), chat, engine, steering, default_max_tokens, limits)
    except RecursionError:
        # JSON nested just under the decoder's limit parses, and a deeper look at it (a comparison,
        # a repr) can pass the limit then.
        raise ApiError("the request body is nested too deeply; send a JSON object of a few levels", code="invalid_json") from None


def _parse_request(
    body: dict[str, Any], chat: bool, engine: Engine, steering: SteeringSet, default_max_tokens: int, limits: Limits
) -> GenRequest:
    model = body.get("model", "")
    if not isinstance(model, str) or len(model) > MAX_MODEL_NAME:
        raise ApiError(f"model must be a string of at most {MAX_MODEL_NAME} characters", param="model", code="invalid_type")
    _text(model, "model")
    n = _integer(body, "n", 1, 1)
    del n  # only one choice per request; anything else was refused above
    _unsupported(body)
    field = "messages" if chat else "prompt"
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS) if chat else None
    max_tokens = max_tokens or _integer(body, "max_tokens", 1, MAX_TOKENS)
    messages = _messages(body, limits.max_messages) if chat else None
    prompt = "" if chat else _prompt(body)
    # The most prompt tokens this request can have: the operator's limit, and the context less
    # what it asks to generate (at least one token).
    own = limits.max_prompt_tokens is not None and limits.max_prompt_tokens < engine.n_ctx - (max_tokens or 1)
    limit = limits.max_prompt_tokens if own else engine.n_ctx - (max_tokens or 1)
    assert limit is not None

    def too_long(at_least: int) -> ApiError:
        if own:
            return ApiError(f"the {field} is at least {at_least} tokens; this server takes at most {limit} (--max-prompt-tokens)",
                            param=field, code="context_length_exceeded")
        want = f" + {max_tokens} to generate" if max_tokens else ""
        return ApiError(f"this model's context is {engine.n_ctx} tokens, but the request needs at least {at_least} prompt "
                        f"tokens{want}; shorten the prompt or lower max_tokens", param=field, code="context_length_exceeded")

    # Refused before any template or tokenizer runs when the text alone is too long: every token
    # stands for at most max_piece_bytes bytes of text (Vocab.max_piece_bytes says when that holds),
    # so text over limit * max_piece_bytes bytes is over the limit whatever its tokens.
    size = sum(len(m["content"].encode("utf-8")) for m in messages) if messages is not None else len(prompt.encode("utf-8"))
    piece = engine.max_piece_bytes
    if piece is not None and size > limit * piece:
        raise too_long(-(-size // piece))
    try:
        if messages is not None:
            tokens = engine.chat_tokens(messages, limit)
        else:
            tokens = engine.tokenize_parts([(prompt, limits.completions_specials)], limit)
    except PromptTooLong as err:
        raise too_long(err.at_least) from None
    except AlignezError as err:
        raise ApiError(str(err), param="messages", code="invalid_value") from None
    if len(tokens) == 0:
        raise ApiError(f"{field} is empty; give some text", param=field, code="invalid_value")
    room = engine.n_ctx - len(tokens)
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
        chat=chat, prompt=prompt, tokens=tokens, sampling=sampling, steering=chosen,
        stream=_flag(body, "stream"), include_usage=_flag(opts or {}, "include_usage"), model=model, logprobs=logprobs,
    )
