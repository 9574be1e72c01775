"""What routes depend on, declared once: who may call them, the database, the audit log.

A route says who may call it in its signature (``key: Viewer``, ``key: Operator``, ``key: Admin``;
``key: WholeProvince`` for figures of the whole system, which a city-scoped key may not see).
`tests/api/test_route_roles.py` walks the route table and fails on a route that does not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from api.auth import CHALLENGE, STATE_KEY
from iotjx import audit
from iotjx.apikeys import KEY_ID, ApiKey
from iotjx.devices import DEVICE_ID
from iotjx.settings import Settings

# Declares the scheme in the OpenAPI document (the "Authorize" button of /docs); the key itself was
# checked by api.auth.Authenticate before the route was reached.
_bearer = HTTPBearer(auto_error=False, description="an API key: `iotjx keys create --role viewer`")


def current_key(request: Request,
                _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> ApiKey:
    """The caller's key (401 when there is none)."""
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None:
        raise HTTPException(401, "send an API key: Authorization: Bearer KEY", headers=CHALLENGE)
    return key


def require_role(role: str, *, whole_province: bool = False):
    """A dependency giving the caller's key when its role is `role` or above (else 403); with
    `whole_province`, also only to a key without a city scope."""

    def check(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
        if not key.allows(role):
            raise HTTPException(403, f"this needs a {role} key; this key is a {key.role}")
        if whole_province and key.cities is not None:
            raise HTTPException(403, "these are figures of the whole system: they need a key without a city scope")
        return key

    check.required_role = role          # read by the route-table test and the OpenAPI document (403)
    check.whole_province = whole_province
    return check


Viewer = Annotated[ApiKey, Depends(require_role("viewer"))]
Operator = Annotated[ApiKey, Depends(require_role("operator"))]
Admin = Annotated[ApiKey, Depends(require_role("admin"))]
WholeProvince = Annotated[ApiKey, Depends(require_role("viewer", whole_province=True))]
WholeProvinceAdmin = Annotated[ApiKey, Depends(require_role("admin", whole_province=True))]


def _pool(request: Request) -> ConnectionPool:
    return request.app.state.pool


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _connection(pool: Annotated[ConnectionPool, Depends(_pool)]) -> Iterator[psycopg.Connection]:
    with pool.connection() as conn:
        yield conn


Pool = Annotated[ConnectionPool, Depends(_pool)]
Conn = Annotated[psycopg.Connection, Depends(_connection)]
AppSettings = Annotated[Settings, Depends(_settings)]

# Path parameters, bounded so that nothing unstorable (NUL, a 10 MB id, a number past bigint)
# reaches a query.
DeviceId = Annotated[str, Path(pattern=DEVICE_ID.pattern, max_length=64, examples=["869975034012345"],
                               description="IMEI or carrier platform id")]
KeyId = Annotated[str, Path(pattern=KEY_ID.pattern, description="the public part of a key (16 hex digits)")]
TargetId = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", examples=["5g-base-stations"])]
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def device_city(conn: psycopg.Connection, key: ApiKey, device_id: str, *, lock: bool = False) -> int | None:
    """The city of a device the key may see; 404 when there is no such device *or* it belongs to a
    city outside the key's scope (a scoped key is not told that it exists)."""
    row = conn.execute("SELECT s.city_code FROM devices d LEFT JOIN sites s USING (site_id) WHERE d.device_id = %s"
                       + (" FOR UPDATE OF d" if lock else ""), (device_id,)).fetchone()
    if row is None or not key.sees_city(row[0]):
        raise HTTPException(404, f"no device {device_id}")
    return row[0]


def _query_names(dependant) -> set[str]:
    """The query parameters a route's dependency tree declares (FastAPI's public Dependant fields)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def refuse_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take (every route: an app-wide dependency), so that
    a misspelt or unsupported parameter is never silently ignored."""
    route = request.scope.get("route")
    if route is None or not request.url.query:
        return
    # Kept on the route itself: a cache keyed by id() would outlive an app and meet another's route.
    names = getattr(route, "iotjx_query_names", None)
    if names is None:
        names = route.iotjx_query_names = frozenset(_query_names(route.dependant))
    unknown = sorted({k for k in request.query_params.keys() if k not in names})
    if unknown:
        takes = ", ".join(sorted(names)) or "none"
        raise HTTPException(422, f"unknown query parameter(s) {', '.join(map(repr, unknown))[:200]}; "
                                 f"{getattr(route, 'path', 'this route')} takes: {takes}")


def audit_write(conn: psycopg.Connection, request: Request, key: ApiKey, *, target: str | None,
                change: dict[str, Any], status: int) -> None:
    """The audit row of a write, in the caller's transaction: actor, method, route template, target."""
    route = getattr(request.scope.get("route"), "path", request.url.path)
    audit.record(conn, actor=key.actor, key_id=key.key_id, method=request.method, route=route, target=target,
                 change=change, status=status)


__all__ = ["Admin", "AppSettings", "Conn", "DeviceId", "KeyId", "Operator", "Pool", "RowId", "TargetId", "Viewer",
           "WholeProvince", "WholeProvinceAdmin", "audit_write", "refuse_unknown_query", "current_key", "device_city", "require_role"]
