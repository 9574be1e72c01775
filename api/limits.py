"""Request bounds, applied before any route runs: a request rate per API key, a body size limit on
every route, URLs without NUL characters; and CORS for the origins configured (none by default).

The body limit is checked twice: a declared Content-Length over the limit is answered 413 at once,
without reading a byte; a chunked body is counted as it streams, and the read that passes the limit
raises 413 (an HTTPException, which FastAPI lets through its body parsing, so the route never sees
the body and the answer is a problem document).  FastAPI's own `max_body_size` answers 413 in plain
text, which is why this is written here."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import OPEN_PATHS, STATE_KEY
from api.problems import problem


def _too_large(limit: int) -> str:
    return f"the request body is larger than this route takes ({limit} bytes)"


class BodyLimit:
    """413 for a body over `default` bytes, or over `per_path[path]` for the paths named there."""

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int] | None = None) -> None:
        self.app, self.default, self.per_path = app, default, dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope["path"], self.default)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            detail = _too_large(limit) if status == 413 else "Content-Length is not a number"
            return await problem(status, "request body too large" if status == 413 else "bad request",
                                 detail)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take()` spends one, or says how long until one is there."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """0 when a token was spent; else the seconds until one will be there (nothing spent)."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimit:
    """429 + Retry-After for a key past its rate: a token bucket per API key id (`rate` requests a second
    sustained, `burst` at once), kept in this process.  Placed after Authenticate, so it counts only
    requests made with a valid key; /health (a load balancer's probe) is never limited.  `rate` 0: off."""

    MAX_BUCKETS = 100_000       # keys seen; past it the fullest buckets (idle keys) are forgotten

    def __init__(self, app: ASGIApp, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.rate, self.burst, self.clock = app, rate, burst, clock
        self.buckets: dict[str, TokenBucket] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = scope.get("state", {}).get(STATE_KEY) if scope["type"] == "http" else None
        if key is None or self.rate <= 0 or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        now = self.clock()
        bucket = self.buckets.get(key.key_id)
        if bucket is None:
            if len(self.buckets) >= self.MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self.buckets[key.key_id] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        if wait:
            retry = max(1, math.ceil(wait))
            return await problem(429, "too many requests",
                                 f"this key may make {self.rate:g} requests a second ({self.burst} at once); "
                                 f"retry in {retry} s", headers={"Retry-After": str(retry)})(scope, receive, send)
        await self.app(scope, receive, send)

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled is the same as a new one: forgetting it changes nothing.
        for key_id in [k for k, b in self.buckets.items() if b.tokens + (now - b.at) * b.rate >= b.burst]:
            del self.buckets[key_id]
        if len(self.buckets) >= self.MAX_BUCKETS:     # every key busy at once: keep the newest half
            for key_id in list(self.buckets)[: len(self.buckets) // 2]:
                del self.buckets[key_id]


class Cors(CORSMiddleware):
    """Starlette's CORS, its refused preflight (an origin, method or header not allowed) a 400 problem
    document rather than plain text.  Installed only when IOTJX_API_CORS_ORIGINS lists origins."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(app, allow_origins=origins, allow_credentials=False,
                         allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                         expose_headers=["Retry-After", "Allow", "WWW-Authenticate"], max_age=600)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        return problem(400, "bad request", f"{bytes(response.body).decode()[:200]} (IOTJX_API_CORS_ORIGINS allows "
                                           f"{', '.join(self.allow_origins)[:300]})", kind="cors-refused")


class CleanUrl:
    """400 for a path or query holding NUL (PostgreSQL text cannot hold it; no identifier has it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")
                                        or b"\x00" in scope.get("query_string", b"")):
            return await problem(400, "bad request", "the URL holds a NUL character")(scope, receive, send)
        await self.app(scope, receive, send)


__all__ = ["BodyLimit", "CleanUrl", "Cors", "RateLimit", "TokenBucket"]
