"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI error body."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None,
        code: str | None = None, type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def unauthorized(message: str) -> ApiError:
    return ApiError(message, 401, code="invalid_api_key", type_="authentication_error")


async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(str(exc.detail), exc.status_code, code=code).response()


async def on_internal_error(_request: Request, exc: Exception) -> JSONResponse:
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, type_="server_error").response()


HANDLERS = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_internal_error}
