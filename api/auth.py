"""Who is calling: the API key of every request, checked before any route runs.

Nothing answers a caller without a valid key but `/health` (whose answer without a key is only
`{"status": …}`): an unknown path, `/docs` or `/openapi.json` without a key is a 401 like every
other route, not a route map.  A key that is presented and not valid (malformed, unknown, wrong
secret, revoked) is a 401 on every path, /health included.  The key found is left in the request's
state for the routes' role dependencies (`api/deps.py`); it is looked up on every request (one
primary-key read, on a worker thread), never cached, so a revoke takes effect at once."""

from __future__ import annotations

import logging

import psycopg
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem
from iotjx.apikeys import ApiKey, authenticate

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iotjx"'}
STATE_KEY = "api_key"


def bearer(scope: Scope) -> str | None:
    """The key in ``Authorization: Bearer KEY``, or None when there is no such header."""
    value = Headers(scope=scope).get("authorization")
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


class Authenticate:
    """Puts the caller's ApiKey (or None on an open path) in ``scope["state"]["api_key"]``."""

    def __init__(self, app: ASGIApp, pool: ConnectionPool) -> None:
        self.app, self.pool = app, pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        open_path = scope["path"] in OPEN_PATHS
        presented = bearer(scope)
        key: ApiKey | None = None
        if presented is None:
            if not open_path:
                return await problem(401, "unauthorized", "send an API key: Authorization: Bearer KEY",
                                     headers=CHALLENGE)(scope, receive, send)
        else:
            try:
                key = await run_in_threadpool(self._lookup, presented)
            except (psycopg.Error, TimeoutError) as exc:
                if not open_path:        # /health answers "down" on its own
                    log.warning("cannot check an API key: %s", str(exc).splitlines()[0])
                    return await problem(503, "database unavailable", "the key cannot be checked now; try again",
                                         headers={"Retry-After": "5"})(scope, receive, send)
                presented = None
            if key is None and presented is not None:
                return await problem(401, "unauthorized", "this API key is not valid (unknown, malformed or revoked)",
                                     headers=CHALLENGE)(scope, receive, send)
        scope.setdefault("state", {})[STATE_KEY] = key
        await self.app(scope, receive, send)

    def _lookup(self, presented: str) -> ApiKey | None:
        with self.pool.connection(timeout=10) as conn:
            return authenticate(conn, presented)


__all__ = ["OPEN_PATHS", "STATE_KEY", "Authenticate", "bearer"]
