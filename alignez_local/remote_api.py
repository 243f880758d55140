"""The one owner of talking to OpenAI-compatible servers (httpx, the ``remote`` extra): URL checks,
the API key from the environment, fan-out over several servers with retries, one-line errors.

Two stages use it, each as a ``Role`` that names it in every message and flag: the remote judge
(``evaluation/remote_judge.py``, ``--judge-url``) and the text stages of ``steer``
(``align/remote_text.py``, ``--generate-url``). What a request asks and how a reply is read stays
with them; this module only moves the requests.

Fan-out: requests are shared out over every URL, ``concurrency`` in flight per server, each
server's workers taking the next request as soon as one is done (a faster server takes more).
Connection errors, timeouts, 429 and 5xx replies are retried ``retries`` times with exponential
backoff; what still fails, and any reply a retry cannot fix (401/403, another 4xx, a reply that is
not JSON, or one the caller's reader refuses), stops the run with one AlignezError line. Every
result is handed to the caller as it arrives (``on_result``), so work finished before an error or
Ctrl-C is kept by the caller (the judge's cache, the pairs file).

The API key comes from the environment only (the role's variables, first set wins), never from the
command line, and is never written to a report.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from alignez_local.errors import AlignezError

DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 3
BACKOFF_S = 0.5  # first retry after 0.5 s, then 1, 2, ...
MAX_BACKOFF_S = 30.0

T = TypeVar("T")
ReadFn = Callable[[Any, str], T]
"""read(the reply's JSON, the server's URL) -> the caller's value (AlignezError for a reply it cannot use)."""


@dataclass(frozen=True)
class Role:
    """Which stage talks to the servers: its name in messages ("judge"), its flags' prefix
    ("--judge": --judge-url, --judge-timeout, --judge-concurrency) and its key variables."""

    name: str
    flag: str
    key_envs: tuple[str, ...]

    def server(self, url: str) -> str:
        return f"the {self.name} server at {url}"


def need_httpx(role: Role) -> None:
    """Return None when httpx is installed, else raise the line that says how to install it."""
    if importlib.util.find_spec("httpx") is None:
        raise AlignezError(f"{role.flag}-url needs httpx; install it with: pip install 'alignez-local[remote]'")


def api_key(envs: Sequence[str]) -> tuple[str | None, str | None]:
    """Return (key, the variable it came from), (None, None) when none of ``envs`` is set."""
    for name in envs:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None, None


def base_url(url: str, flag: str = "--judge-url") -> str:
    """Return the server's base URL (no trailing / or /v1); AlignezError when it is no http(s) URL."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")) or len(u.split("://", 1)[1]) == 0:
        raise AlignezError(f"{flag} {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8080")
    return u[: -len("/v1")] if u.endswith("/v1") else u


class Servers:
    """One or more OpenAI-compatible servers a stage sends its requests to."""

    def __init__(self, urls: Sequence[str], role: Role, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = 120.0, retries: int = DEFAULT_RETRIES) -> None:
        """Return the servers (AlignezError for bad settings or a missing httpx; nothing is sent yet)."""
        need_httpx(role)
        if not urls:
            raise AlignezError(f"the remote {role.name} needs at least one {role.flag}-url")
        if concurrency < 1 or not (timeout > 0) or retries < 0:
            raise AlignezError(f"{role.flag}-concurrency must be at least 1, {role.flag}-timeout above 0 and retries at least 0")
        self.role = role
        self.urls = list(dict.fromkeys(base_url(u, f"{role.flag}-url") for u in urls))
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.requests_per_url = dict.fromkeys(self.urls, 0)

    def headers(self) -> dict[str, str]:
        key, _ = api_key(self.role.key_envs)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def fan_out(self, path: str, bodies: Sequence[dict[str, Any]] | Callable[[str, int], dict[str, Any]], n: int,
                read: ReadFn[T], on_result: Callable[[int, T], None]) -> None:
        """Return None after each of the ``n`` requests (``POST {URL}{path}``) was answered, read and
        handed to ``on_result(i, value)`` in the order they finish. ``bodies``: a list, or
        ``body(url, i)`` where a request depends on the server it goes to (AlignezError when a server
        fails for good; Ctrl-C cancels the requests in flight and raises KeyboardInterrupt)."""
        body = bodies if callable(bodies) else (lambda _url, i: bodies[i])
        asyncio.run(self._fan_out(path, body, n, read, on_result))

    async def _fan_out(self, path: str, body: Callable[[str, int], dict[str, Any]], n: int, read: ReadFn[T],
                       on_result: Callable[[int, T], None]) -> None:
        import httpx

        todo = deque(range(n))
        slots = self.concurrency * len(self.urls)
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        async with httpx.AsyncClient(headers=self.headers(), timeout=self.timeout, limits=limits) as client:

            async def worker(url: str) -> None:
                while todo:
                    i = todo.popleft()
                    r = await self._one(client, "POST", url, path, body(url, i))
                    value = read(_json(r, self.role, url), url)
                    self.requests_per_url[url] += 1
                    on_result(i, value)

            tasks = [asyncio.create_task(worker(u)) for u in self.urls for _ in range(self.concurrency)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()  # the first failure, as its one-line AlignezError
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def call(self, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any | None:
        """Return the JSON of one request to one server (retried as the fan-out's are), None when the
        server has no such route or does not take this body (400, 404, 405, 422, 501): what the
        probes of a server use, which other servers may not offer or may shape otherwise."""
        async def once() -> Any | None:
            import httpx

            async with httpx.AsyncClient(headers=self.headers(), timeout=self.timeout) as client:
                r = await self._one(client, method, url, path, body, missing_ok=True)
                return None if r is None else _json(r, self.role, url)

        return asyncio.run(once())

    async def _one(self, client: Any, method: str, url: str, path: str, body: dict[str, Any] | None,
                   missing_ok: bool = False) -> Any:
        """Return one 200 reply, retrying what a retry can fix (None for a missing route when ``missing_ok``)."""
        import httpx

        role, flag, tries = self.role, self.role.flag, self.retries + 1
        failure = ""
        for attempt in range(tries):
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt)
            try:
                r = await client.request(method, url + path, json=body)
            except httpx.TimeoutException:
                failure = (f"{role.server(url)} did not answer within {self.timeout:g} s ({flag}-timeout), "
                           f"{tries} tries; raise {flag}-timeout or lower {flag}-concurrency")
            except httpx.TransportError as err:
                failure = f"cannot reach {role.server(url)} ({_reason(err)}), {tries} tries; is it running? check {flag}-url"
            else:
                if r.status_code == 200:
                    return r
                if missing_ok and r.status_code in (400, 404, 405, 422, 501):
                    return None
                if r.status_code in (401, 403):
                    raise AlignezError(_key_message(role, url, r.status_code))
                if r.status_code != 429 and r.status_code < 500:
                    hint = "; give the server's base URL, e.g. http://127.0.0.1:8080" if r.status_code == 404 else ""
                    raise AlignezError(f"{role.server(url)} rejected the request (HTTP {r.status_code}: {_error_text(r)}){hint}")
                failure = f"{role.server(url)} failed with HTTP {r.status_code} ({_error_text(r)}), {tries} tries"
                wait = max(wait, min(MAX_BACKOFF_S, _retry_after(r)))
            if attempt < self.retries:
                await asyncio.sleep(wait)
        raise AlignezError(failure)


def _json(r: Any, role: Role, url: str) -> Any:
    """Return a 200 reply's JSON (AlignezError when it is not JSON)."""
    try:
        return r.json()
    except ValueError:
        raise AlignezError(f"{role.server(url)} did not answer with JSON; is it an OpenAI-compatible server?") from None


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


def _key_message(role: Role, url: str, status: int) -> str:
    """Return the one line for a 401/403: which variable to set."""
    key, var = api_key(role.key_envs)
    first, rest = role.key_envs[0], " or ".join(role.key_envs[1:])
    if key is None:
        return f"{role.server(url)} needs an API key (HTTP {status}); set {first}" + (f" (or {rest})" if rest else "") + " to its key"
    return f"{role.server(url)} refused the API key from {var} (HTTP {status}); set {first} to that server's key"


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
