"""Request bounds, applied before any route runs: a body size limit on every route, and URLs
without NUL characters.

The body limit is checked twice: a declared Content-Length over the limit is answered 413 at once,
without reading a byte; a chunked body is counted as it streams, and the read that passes the limit
raises 413 (an HTTPException, which FastAPI lets through its body parsing, so the route never sees
the body and the answer is a problem document).  FastAPI's own `max_body_size` answers 413 in plain
text, which is why this is written here."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class CleanUrl:
    """400 for a path or query holding NUL (PostgreSQL text cannot hold it; no identifier has it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")
                                        or b"\x00" in scope.get("query_string", b"")):
            return await problem(400, "bad request", "the URL holds a NUL character")(scope, receive, send)
        await self.app(scope, receive, send)


__all__ = ["BodyLimit", "CleanUrl"]
