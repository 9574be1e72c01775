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
from pydantic import BaseModel, Field
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.downlink import DownlinkError
from iotjx.apikeys import ApiKeyError
from iotjx.devices import RegistrationError
from iotjx.sites import SiteError

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://iotjx.example/problems/"

# One stable `type` per kind of error (docs/api.md "Errors" lists them).  The URI names the kind of
# error; it is an identifier, not a page the API serves.  A status not listed gets `http-<status>`.
TYPES = {
    400: "bad-request",                 # a URL holding NUL, a Content-Length that is not a number
    401: "unauthorized",                # no key, or a key that is malformed, unknown or revoked
    403: "forbidden",                   # the key's role is too low, or the object is outside its cities
    404: "not-found",                   # no such object (or one outside the key's cities)
    405: "method-not-allowed",          # the path exists, not with this method (Allow lists those it takes)
    409: "conflict",                    # the request contradicts what is stored
    413: "request-too-large",           # a body over IOTJX_API_MAX_BODY / IOTJX_API_MAX_IMPORT_BYTES
    415: "unsupported-media-type",      # not text/csv to a CSV import; CSV bytes that are not UTF-8
    422: "invalid-request",             # input refused: validation, unknown query parameter, bad records
    429: "rate-limited",                # past the key's rate (Retry-After says when to come back)
    500: "internal-error",              # a bug: logged with its traceback
    503: "unavailable",                 # the database cannot be reached (Retry-After); /health: down
}
NOT_READY = "not-ready"                 # a 503 of /ready: what is not ready in `checks`
NO_ROUTE = "no-route"                   # a 404 for a path no route has (not a missing object)


def problem_type(status: int, kind: str | None = None) -> str:
    """The `type` URI of an error: `kind`'s, else the one of its status."""
    return TYPE_BASE + (kind or TYPES.get(status, f"http-{status}"))


class ProblemError(BaseModel):
    """One refused input: a CSV line, a field, or both."""

    line: int | None = Field(None, description="the CSV line (1: the header), for imports")
    field: str | None = Field(None, description="where the input was refused, e.g. `body.model`, `query.city`")
    error: str = Field(description="why")


class ReadyCheck(BaseModel):
    """One readiness check of /ready."""

    name: str = Field(description="database, schema, catalogue, pool or jobs")
    ready: bool
    detail: str


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every error answer, as `application/problem+json`."""

    type: str = Field(description=f"the kind of error, stable: {TYPE_BASE}<kind> (docs/api.md \"Errors\")",
                      examples=[TYPE_BASE + "not-found"])
    title: str = Field(description="a short summary of the kind of error")
    status: int = Field(description="the HTTP status", ge=400, le=599)
    detail: str = Field(description="what went wrong with this request, for a person")
    errors: list[ProblemError] | None = Field(None, description="each refused input (validation, CSV imports)")
    errors_total: int | None = Field(None, description="CSV imports: how many errors there were in all")
    errors_shown: int | None = Field(None, description="CSV imports: how many are listed in `errors`")
    job_id: int | None = Field(None, description="a 409 of POST /rejects/redecode: the job already queued or running")
    checks: list[ReadyCheck] | None = Field(None, description="a 503 of /ready: every check, those not ready with why")


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# The OpenAPI description of an error response, for `responses={status: PROBLEM}`.
PROBLEM = {"description": "a problem document (RFC 9457)", "content": {MEDIA_TYPE: {"schema": PROBLEM_REF}}}


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


def problem(status: int, title: str, detail: Any, headers: dict[str, str] | None = None, *,
            kind: str | None = None, **extensions: Any) -> ProblemResponse:
    """An RFC 9457 problem document of `type` problem_type(status, kind).  `detail` is text; given a
    list of refused inputs instead (dicts with `error` and `line` and/or `field`), they become the
    `errors` member and `detail` says how many.  `extensions` become extra members (`errors_total`)."""
    if isinstance(detail, list):
        errors = [e if isinstance(e, dict) else {"error": str(e)} for e in detail]
        first = errors[0].get("error", "") if errors else ""
        total = extensions.get("errors_total", len(errors))
        detail = (f"{total} error(s); the first: {first}" if total != 1 else str(first)) if errors else title
        extensions = {"errors": errors, **extensions}
    elif not isinstance(detail, str):
        detail = title if detail is None else str(detail)
    return ProblemResponse({"type": problem_type(status, kind), "title": title, "status": status, "detail": detail,
                            **extensions}, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at this path (Starlette's 405 names only the first route's)."""
    try:
        from fastapi.routing import iter_route_contexts          # FastAPI ≥ 0.16x: included routers are lazy
        routes = [c.route for c in iter_route_contexts(request.app.routes)]
    except ImportError:                                         # pragma: no cover - older FastAPI
        routes = list(request.app.routes)
    probe = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
             "method": request.method}
    methods: set[str] = set()
    for route in routes:
        if getattr(route, "methods", None) and route.matches(probe)[0] is not Match.NONE:
            methods |= set(route.methods)
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return ", ".join(sorted(methods, key=lambda m: order.index(m) if m in order else len(order)))


def _role_checks(dependant) -> list:
    found = [d.call for d in dependant.dependencies if hasattr(d.call, "required_role")]
    for sub in dependant.dependencies:
        found += _role_checks(sub)
    return found


def _may_refuse(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of the operations a key may be refused (403) for its role or its city scope:
    those needing more than a viewer, or a key without a city scope (api/deps.py's require_role)."""
    try:
        from fastapi.routing import iter_route_contexts
        routes = [c.route for c in iter_route_contexts(app.routes)]
    except ImportError:                                         # pragma: no cover - older FastAPI
        routes = list(app.routes)
    out = set()
    for route in routes:
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        if any(c.required_role != "viewer" or getattr(c, "whole_province", False) for c in _role_checks(dependant)):
            out |= {(m, route.path) for m in route.methods}
    return out


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
        return problem(422, "invalid request", [{"field": _field(e["loc"]), "error": e["msg"]} for e in exc.errors()])

    @app.exception_handler(HTTPException)
    async def _http_problem(request: Request, exc: HTTPException):
        status, detail, kind = exc.status_code, exc.detail, None
        if status == 404 and request.scope.get("route") is None:        # no route matched the path
            kind, detail = NO_ROUTE, f"no route {request.url.path[:200]}; the routes are listed in /openapi.json"
        elif status == 405 and detail == _phrase(405):
            allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            exc.headers = {**(exc.headers or {}), "Allow": allowed}
            detail = f"{request.url.path[:200]} does not take {request.method[:20]}; it takes {allowed}"
        return problem(status, _phrase(status), detail, headers=exc.headers, kind=kind)

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
    app.openapi = lambda: _openapi(app)     # type: ignore[method-assign]


# What any operation may answer besides what its route declares: the key check (401), a query
# parameter it does not take or a malformed one (422, app-wide), the rate limit (429), a database away
# (503), a URL with NUL or a bad Content-Length (400), a body too large (413).
_EVERY_OPERATION = {400: "bad request: a URL holding NUL, a Content-Length that is not a number",
                    401: "no API key, or one that is malformed, unknown or revoked",
                    413: "the body is larger than this route takes",
                    422: "invalid input (the field and the reason in `errors`), or a query parameter this route does not take",
                    429: "past this key's request rate: retry after `Retry-After` seconds",
                    500: "an unexpected error (logged)",
                    503: "the database cannot be reached: retry after `Retry-After` seconds"}
_OPEN_OPERATION = {400, 422, 500}       # /health: no key needed, no rate limit, no database needed to answer


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with every error response a problem document of the one `Problem` schema
    (FastAPI's own 422 `HTTPValidationError` replaced) and every status any route can answer listed."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = FastAPI.openapi(app)             # FastAPI's own document (kept in app.openapi_schema), amended here
    refusing = _may_refuse(app)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem_schema.pop("$defs", {}))
    schemas["Problem"] = problem_schema
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            extra = _EVERY_OPERATION if path != "/health" else {s: _EVERY_OPERATION[s] for s in _OPEN_OPERATION}
            if "text/csv" in operation.get("requestBody", {}).get("content", {}):
                extra = {**extra, 415: "the body is not declared text/csv (UTF-8)"}
            if (method.upper(), path) in refusing or any(p.get("name") == "city" for p in operation.get("parameters", [])):
                extra = {**extra, 403: "this key's role is too low, or what the request names is outside its cities"}
            for status, description in extra.items():
                responses.setdefault(str(status), {"description": description})
            for status, response in responses.items():
                if status[:1] in "45":
                    response["content"] = {MEDIA_TYPE: {"schema": PROBLEM_REF}}
                    if response.get("description") in (None, "", "Validation Error", PROBLEM["description"]):
                        response["description"] = _EVERY_OPERATION.get(int(status), _phrase(int(status)))
                    if status == "405":
                        response.setdefault("headers", {})["Allow"] = {"schema": {"type": "string"}}
                    if status in ("429", "503"):
                        response.setdefault("headers", {})["Retry-After"] = {
                            "description": "seconds", "schema": {"type": "integer", "minimum": 0}}
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"#/components/schemas/{unused}"' not in json.dumps(spec):
            del schemas[unused]
    return spec


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


__all__ = ["MEDIA_TYPE", "NOT_READY", "NO_ROUTE", "ReadyCheck", "PROBLEM", "PROBLEM_REF", "TYPES", "TYPE_BASE", "Problem", "ProblemError",
           "ProblemResponse", "install", "problem", "problem_type"]
