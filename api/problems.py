"""RFC 9457 problem documents: how every error of the API is rendered and documented.

`install(app)` makes every error one: validation errors, HTTP errors (404 for an unknown path,
405, 413 from the body limit), the registry's and the key store's refusals, a database that is away
(503), and — as the last resort — an unexpected exception (500, logged once with its traceback)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.downlink import DownlinkError
from iotjx.apikeys import ApiKeyError
from iotjx.devices import RegistrationError
from iotjx.sites import SiteError

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
# The OpenAPI description of an error response, for `responses={status: PROBLEM}`.
PROBLEM = {"description": "a problem document (RFC 9457)", "content": {MEDIA_TYPE: {"schema": {
    "type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                     "status": {"type": "integer"}, "detail": {}}}}}}


class ProblemResponse(Response):
    media_type = MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        # A refused input may hold a lone surrogate (in a field name, say): answer with \u escapes
        # rather than fail to encode the answer.
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":"), default=str).encode("ascii")


def problem(status: int, title: str, detail: Any, headers: dict[str, str] | None = None,
            **extensions: Any) -> ProblemResponse:
    """An RFC 9457 problem document (`extensions` become extra members, e.g. `errors_total`)."""
    return ProblemResponse({"type": "about:blank", "title": title, "status": status, "detail": detail, **extensions},
                           status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    @app.exception_handler(RegistrationError)
    async def _registration(request: Request, exc: RegistrationError):
        title = {403: "outside this key's cities", 415: "unsupported CSV encoding"}.get(
            exc.status, "invalid site records" if isinstance(exc, SiteError) else "invalid device records")
        return problem(exc.status, title, [{"line": n, "error": m} for n, m in exc.errors],
                       errors_total=exc.total, errors_shown=len(exc.errors))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return problem(422, "invalid request", [{"line": None, "field": _field(e["loc"]), "error": e["msg"]}
                                                for e in exc.errors()])

    @app.exception_handler(HTTPException)
    async def _http_problem(request: Request, exc: HTTPException):
        return problem(exc.status_code, _phrase(exc.status_code), exc.detail, headers=exc.headers)

    @app.exception_handler(ApiKeyError)
    async def _key_refused(request: Request, exc: ApiKeyError):
        return problem(exc.status, _phrase(exc.status), str(exc))

    @app.exception_handler(DownlinkError)
    async def _downlink_refused(request: Request, exc: DownlinkError):
        return problem(exc.status, _phrase(exc.status), str(exc))

    @app.exception_handler(psycopg.OperationalError)
    async def _db_down(request: Request, exc: psycopg.OperationalError):
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
        return problem(503, "database unavailable", "the database cannot be reached; try again shortly",
                       headers={"Retry-After": "5"})

    app.add_middleware(LastResort)


class LastResort:
    """An exception nothing else handled becomes a 500 problem, logged here once with its traceback.

    (Starlette's own last handler re-raises after answering, so the server would log it again.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await problem(500, "internal error", "an unexpected error; it has been logged")(scope, receive, send)


__all__ = ["MEDIA_TYPE", "PROBLEM", "ProblemResponse", "install", "problem"]
