"""The HTTP side: a Starlette app with OpenAI's routes, talking to the engine ``Worker``.

Routes: POST /v1/chat/completions, POST /v1/completions (plain JSON or SSE streaming), GET
/v1/models, GET /v1/steering, GET /health (open without the API key, like llama-server's).
Response shapes follow OpenAI's API (and llama-cpp-python's server, which follows it too).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from alignez_local.apps.serve.errors import HANDLERS, ApiError, unauthorized
from alignez_local.apps.serve.schemas import GenRequest, Limits, parse_request
from alignez_local.apps.serve.steering import SteeringSet
from alignez_local.apps.serve.worker import Event, Job, Worker, asyncio_sink
from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Completion, Engine, TokenLogprob

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
# Requests parsed and tokenized at once, on worker threads. Each is bounded by the Limits; more
# threads would only share the same cores, and a burst of requests waits its turn without ever
# holding up the event loop (/health and streaming stay responsive).
PARSE_THREADS = 4


@dataclass
class ServeConfig:
    """What the app needs besides the engine: names, key and defaults."""

    model_id: str
    api_key: str | None = None
    default_max_tokens: int = 512
    batch_wait: float = 0.0  # seconds an idle server waits after a first request for others to start with it
    # Reuse the prompt cells of an earlier request steered alike (Worker.reuse_prompts): on, as in
    # ``alignez serve`` without --deterministic.
    cache_prompt: bool = True
    # Decode every job's planning prefill while a profile or gated vector is loaded, used or not
    # (Worker.plan_every_job): on with --deterministic.
    plan_every_job: bool = False
    limits: Limits = Limits()  # what one request may ask (body bytes, messages, prompt tokens; docs/serve.md)


async def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, refused with a 413 once it is over ``limit`` bytes: at once when
    Content-Length says so (nothing read), else as soon as the bytes received pass it."""
    def too_big(size: str) -> ApiError:
        return ApiError(f"the request body is {size} bytes; this server takes at most {limit} (--max-body-mb)", 413,
                        code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big(declared)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big(f"over {limit}")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody reads this answer; it only keeps an aborted upload out of the log as a traceback.
        raise ApiError("the client went away before sending the whole body", 400, code="client_disconnected") from None
    return b"".join(chunks)


class _Server:
    """The route handlers, sharing the engine, the steering set and the worker."""

    def __init__(self, engine: Engine, steering: SteeringSet, worker: Worker, config: ServeConfig) -> None:
        self.engine = engine
        self.steering = steering
        self.worker = worker
        self.config = config
        self.created = int(time.time())
        self.parsing = 0  # requests being parsed and tokenized on worker threads (for /health)
        self.parse_limiter: anyio.CapacityLimiter | None = None  # made in the lifespan (needs the event loop)

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise unauthorized("no API key given; send the header 'Authorization: Bearer YOUR_KEY'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise unauthorized("the API key is wrong; send the key the server was started with (--api-key)")

    # --- small routes ------------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.worker.stats(), "requests_parsing": self.parsing})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        card = {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "alignez-local",
                # n_vocab and n_embd as llama-server names them: what `steer --generate-url` compares.
                "meta": {"arch": self.engine.arch, "n_layer": self.engine.n_layer, "n_ctx": self.engine.n_ctx,
                         "n_vocab": self.engine.n_vocab, "n_embd": self.engine.n_embd}}
        return JSONResponse({"object": "list", "data": [card]})

    async def steering_list(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse(self.steering.describe())

    # --- generation --------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        self.check_key(request)
        cfg = self.config
        raw = await read_body(request, cfg.limits.max_body_bytes)
        # Parsing, the chat template and the tokenizer take time in proportion to the request: on a
        # worker thread, so the event loop keeps answering everyone else meanwhile.
        self.parsing += 1
        try:
            req = await anyio.to_thread.run_sync(parse_request, raw, chat, self.engine, self.steering, cfg.default_max_tokens,
                                                 cfg.limits, limiter=self.parse_limiter)
        finally:
            self.parsing -= 1
        q: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(req.tokens, req.sampling, req.steering, asyncio_sink(asyncio.get_running_loop(), q),
                  top_logprobs=req.logprobs)
        try:
            self.worker.submit(job)
        except AlignezError as err:
            raise ApiError(str(err), 503, type_="server_error", code="shutting_down") from None
        out = _Shaper(req, self.config.model_id)
        if req.stream:
            return EventSourceResponse(self._stream(job, q, out), ping=15)
        return JSONResponse(await self._collect(request, job, q, out))

    async def _collect(self, request: Request, job: Job, q: "asyncio.Queue[Event]", out: "_Shaper") -> dict[str, Any]:
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return {}
                    continue
                if ev.kind == "error":
                    raise ApiError(ev.text, 500, type_="server_error")
                if ev.kind == "done":
                    assert ev.completion is not None
                    return out.whole(ev.completion)
        finally:
            if not job.finished.is_set():
                job.cancel()

    async def _stream(self, job: Job, q: "asyncio.Queue[Event]", out: "_Shaper") -> AsyncIterator[str]:
        # sse-starlette cancels this generator when the client goes away; finally frees the job.
        try:
            yield out.chunk("", first=True)
            while True:
                ev = await q.get()
                if ev.kind == "text":
                    yield out.chunk(ev.text, logprobs=ev.logprobs)
                elif ev.kind == "error":
                    yield _json(ApiError(ev.text, 500, type_="server_error").body())
                    break
                else:
                    assert ev.completion is not None
                    yield out.chunk("", finish=_finish(ev.completion), logprobs=ev.logprobs or None)
                    if out.req.include_usage:
                        yield out.usage_chunk(ev.completion)
                    break
            yield "[DONE]"
        finally:
            if not job.finished.is_set():
                job.cancel()


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _lp(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # OpenAI's value for "very unlikely"; JSON has no -inf


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")  # a piece may be part of a character: ``bytes`` has it whole


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """Return a chat choice's ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [
        {"token": _text(t.bytes), "logprob": _lp(t.logprob), "bytes": list(t.bytes),
         "top_logprobs": [{"token": _text(b), "logprob": _lp(lp), "bytes": list(b)} for _, b, lp in t.top]}
        for t in tokens
    ]}


def legacy_logprobs(tokens: list[TokenLogprob], base: int) -> dict[str, Any]:
    """Return a text completion choice's ``logprobs`` (the legacy shape): tokens, token_logprobs,
    top_logprobs (the N most likely and the sampled token, as OpenAI's may hold N + 1) and
    text_offset (characters into prompt + text, ``base`` = the prompt's length)."""
    tops = []
    for t in tokens:
        d: dict[str, float] = {}
        for _, b, lp in t.top:
            d.setdefault(_text(b), _lp(lp))  # pieces that decode alike keep the likeliest
        d.setdefault(_text(t.bytes), _lp(t.logprob))
        tops.append(d)
    return {"tokens": [_text(t.bytes) for t in tokens], "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": tops, "text_offset": [base + t.offset for t in tokens]}


class _Shaper:
    """Builds OpenAI response objects for one request (chat or text completion)."""

    def __init__(self, req: GenRequest, model_id: str) -> None:
        self.req = req
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = req.model or model_id
        self.object = "chat.completion" if req.chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.n_prompt_tokens, "completion_tokens": c.n_tokens,
                "total_tokens": c.n_prompt_tokens + c.n_tokens}

    def _logprobs(self, tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if self.req.logprobs is None or tokens is None:
            return None
        return chat_logprobs(tokens) if self.req.chat else legacy_logprobs(tokens, len(self.req.prompt))

    def whole(self, c: Completion) -> dict[str, Any]:
        lps = self._logprobs(c.top_logprobs)
        if self.req.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": c.text},
                                      "logprobs": lps, "finish_reason": _finish(c)}
        else:
            choice = {"index": 0, "text": c.text, "logprobs": lps, "finish_reason": _finish(c)}
        return {**self._head(self.object), "choices": [choice], "usage": self._usage(c), "steering": self.req.steering}

    def chunk(self, text: str, first: bool = False, finish: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> str:
        """Return one SSE chunk; ``logprobs``: the tokens whose text starts in it (None: none)."""
        lps = self._logprobs(logprobs)
        if self.req.chat:
            delta: dict[str, Any] = {} if finish else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}
            return _json({**self._head("chat.completion.chunk"), "choices": [choice]})
        return _json({**self._head("text_completion"),
                      "choices": [{"index": 0, "text": text, "logprobs": lps, "finish_reason": finish}]})

    def usage_chunk(self, c: Completion) -> str:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return _json({**self._head(obj), "choices": [], "usage": self._usage(c)})


def create_app(engine: Engine, steering: SteeringSet, config: ServeConfig, parallel: int | None = None) -> Starlette:
    """Return the app; its lifespan starts the engine worker and stops it cleanly on shutdown."""
    worker = Worker(engine, steering, parallel, config.batch_wait, config.cache_prompt, config.plan_every_job)
    engine.max_piece_bytes  # scans the vocabulary once now (0.1 s per 50k tokens), not on the first request
    srv = _Server(engine, steering, worker, config)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        srv.parse_limiter = anyio.CapacityLimiter(PARSE_THREADS)
        worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    routes = [
        Route("/v1/chat/completions", srv.chat, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/v1/steering", srv.steering_list, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=HANDLERS)  # type: ignore[arg-type]
    app.state.worker = worker
    return app
