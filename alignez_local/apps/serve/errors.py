"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

MAX_MESSAGE = 1000  # characters: a message quotes the client's values, and a client can send megabytes


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI error body."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None,
        code: str | None = None, type_: str = "invalid_request_error",
    ) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "\u2026"
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        # ASCII JSON: a message may quote the client's text, lone surrogates included, which UTF-8 cannot hold.
        return Response(json.dumps(self.body()), status_code=self.status, headers=headers, media_type="application/json")


def unauthorized(message: str) -> ApiError:
    return ApiError(message, 401, code="invalid_api_key", type_="authentication_error")


async def on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(str(exc.detail), exc.status_code, code=code).response()


async def on_internal_error(_request: Request, exc: Exception) -> Response:
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, type_="server_error").response()


HANDLERS = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_internal_error}
