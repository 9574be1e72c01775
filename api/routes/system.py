"""The system's own state: /health (open, minimal without a key; 503 when the database is down, for a
load balancer's or compose's probe), /ready (with a key: 200, or 503 naming what is not ready, for an
orchestrator's readiness probe), /metrics, and the API's own description (/openapi.json, /docs), which
need a key like everything else."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from api.auth import STATE_KEY
from api.deps import AppSettings, Pool, Viewer, WholeProvince
from api.problems import NOT_READY, PROBLEM, ReadyCheck, problem
from ingest.metrics import render_prometheus
from iotjx import __version__
from iotjx.db import connect, storage_kind
from iotjx.db.migrations import MIGRATIONS

router = APIRouter(tags=["system"])

GATEWAY_STALE_S = 30


class DatabaseHealth(BaseModel):
    reachable: bool
    storage: str | None = Field(None, description="postgresql or timescaledb")
    schema_version: int | None = Field(None, description="the last migration applied")
    error: str | None = Field(None, description="why it cannot be reached")


class SpoolHealth(BaseModel):
    """A gateway's durable spool (ingest/spool.py); the journal fields only when it is enabled."""

    enabled: bool
    mode: Literal["direct", "spooling"]
    full: bool
    db_batch_busy_s: float = Field(description="how long the oldest batch in the database has been waiting")
    directory: str | None = None
    segments: int | None = None
    uplinks: int | None = None
    bytes: int | None = None
    limit_bytes: int | None = None
    oldest_received_at: float | None = Field(None, description="Unix time of the oldest spooled uplink")
    age_s: float | None = None


class GatewayHealth(BaseModel):
    gateway_id: str
    broker_connected: bool
    queue_depth: int
    spool: SpoolHealth | None
    counters: dict[str, int | float | str | None] = Field(
        description="the gateway's counters by name (uplinks stored, rejected by reason, per transport …); "
                    "`last_error`: its last database error or null")
    updated_at: datetime = Field(description="its last heartbeat")
    stale: bool = Field(description=f"no heartbeat for over {GATEWAY_STALE_S} s: left out of the status")


class Health(BaseModel):
    """Without a key, or with a city-scoped one: `status` alone."""

    status: Literal["ok", "degraded", "down"] = Field(
        description="ok; degraded: no live gateway, or none connected to the broker; down: no database")
    version: str | None = None
    database: DatabaseHealth | None = None
    gateways: list[GatewayHealth] | None = None
    broker_connected: bool | None = Field(None, description="a live gateway is connected to the broker")
    queue_depth: int | None = Field(None, description="uplinks waiting in the live gateways' queues")


def _without_metrics(counters: dict[str, Any] | None) -> dict[str, Any]:
    # The counters are numbers (and last_error, text): anything nested is not one, and is left out
    # rather than break the typed answer of a probe.
    return {k: v for k, v in (counters or {}).items()
            if k != "metrics" and (v is None or isinstance(v, (int, float, str)))}


def _health(pool) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "version": __version__}
    try:
        with pool.connection(timeout=5) as conn:
            kind = storage_kind(conn)
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
            gateways = conn.execute("""
                SELECT gateway_id, broker_connected, queue_depth, counters, updated_at,
                       extract(epoch FROM now() - updated_at) FROM gateway_status ORDER BY gateway_id""").fetchall()
    except (psycopg.Error, TimeoutError) as exc:
        return {"status": "down", "version": __version__,
                "database": {"reachable": False, "error": str(exc).splitlines()[0]}}
    out["database"] = {"reachable": True, "storage": kind, "schema_version": version}
    out["gateways"] = [{"gateway_id": g[0], "broker_connected": g[1], "queue_depth": g[2],
                        "spool": (g[3] or {}).pop("spool", None), "counters": _without_metrics(g[3]),
                        "updated_at": g[4], "stale": g[5] > GATEWAY_STALE_S} for g in gateways]
    live = [g for g in out["gateways"] if not g["stale"]]
    out["broker_connected"] = any(g["broker_connected"] for g in live)
    out["queue_depth"] = sum(g["queue_depth"] for g in live)
    if not live or not out["broker_connected"]:
        out["status"] = "degraded"
    return out


@router.get("/health", summary="ok / degraded (200) or down (503); with a key without a city scope: database, "
                               "gateways, queue",
            response_model=Health, response_model_exclude_unset=True,
            responses={200: {"content": {"application/json": {"examples": {
                "without a key": {"value": {"status": "ok"}}}}}},
                       503: {**PROBLEM, "description": "down: the database cannot be reached (retry after "
                                                       "`Retry-After` seconds)"}})
def health(request: Request, pool: Pool):
    """Open to every caller (a load balancer's probe): without a key only the status, since the rest
    (gateway ids, versions, database errors) helps an attacker more than a probe.  Down is a 503 (a
    problem document), so that an HTTP probe (compose, Kubernetes liveness) needs no body parsing;
    degraded stays 200: the API still answers reads without a live gateway."""
    out = _health(pool)
    key = request.scope.get("state", {}).get(STATE_KEY)
    full = key is not None and key.cities is None
    if out["status"] == "down":
        detail = "down: the database cannot be reached"
        if full:
            detail += f" ({out['database']['error']})"
        return problem(503, "service unavailable", detail, headers={"Retry-After": "5"})
    if not full:
        return Health(status=out["status"])
    return Health.model_validate(out)


class Readiness(BaseModel):
    ready: Literal[True] = Field(description="every check passed (a 503 problem document lists them otherwise)")
    checks: list[ReadyCheck]


READY_CONNECT_S = 3


def _checks(request: Request, pool, settings) -> list[ReadyCheck]:
    out: list[ReadyCheck] = []
    stats = pool.get_stats()
    exhausted = stats.get("requests_waiting", 0) > 0 or (
        stats.get("pool_size", 0) >= pool.max_size and stats.get("pool_available", 0) == 0)
    out.append(ReadyCheck(name="pool", ready=not exhausted,
                          detail=f"{stats.get('pool_available', 0)} of {stats.get('pool_size', 0)} connections free "
                                 f"(at most {pool.max_size}), {stats.get('requests_waiting', 0)} requests waiting"))
    head = MIGRATIONS[-1].version
    try:
        # A connection of its own: the database is checked even when the pool is exhausted.
        with connect(settings.database_url, application_name="iotjx-ready") as conn:
            conn.execute(f"SET statement_timeout = {READY_CONNECT_S * 1000}")
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        out.append(ReadyCheck(name="database", ready=True, detail="reachable"))
        out.append(ReadyCheck(name="schema", ready=version == head,
                              detail=f"at migration {version}; this API needs {head}"
                                     + ("" if version == head else " (run `iotjx db upgrade`)")))
    except (psycopg.Error, OSError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        out.append(ReadyCheck(name="database", ready=False, detail=f"cannot be reached: {why}"))
        out.append(ReadyCheck(name="schema", ready=False, detail="unknown: the database cannot be reached"))
    catalogue = getattr(request.app.state, "catalogue", None)
    out.append(ReadyCheck(name="catalogue", ready=bool(catalogue),
                          detail=f"{len(catalogue)} targets loaded" if catalogue else "no coverage targets loaded"))
    runner = getattr(request.app.state, "jobs", None)
    alive = runner is not None and runner.running
    out.append(ReadyCheck(name="jobs", ready=alive, detail="the job runner is running" if alive
                          else "the job runner is not running: re-decodes would stay queued"))
    return out


@router.get("/ready", response_model=Readiness,
            responses={503: {**PROBLEM, "description": "not ready: `checks` says what (type …/not-ready)"}},
            summary="Readiness for an orchestrator: 200, or 503 naming what is not ready",
            description="Checks the database (reached on a connection of its own), the schema (at the migration "
                        "this API was built for), the coverage catalogue (loaded), the connection pool (not "
                        "exhausted) and the background job runner (alive). A key without a city scope (any role): "
                        "the details are the whole system's.")
def ready(key: WholeProvince, request: Request, pool: Pool, settings: AppSettings):
    checks = _checks(request, pool, settings)
    failing = [c.name for c in checks if not c.ready]
    if failing:
        return problem(503, "not ready", f"not ready: {', '.join(failing)}", headers={"Retry-After": "5"},
                       kind=NOT_READY, checks=[c.model_dump() for c in checks])
    return Readiness(ready=True, checks=checks)


@router.get("/metrics", summary="Ingest metrics of every live gateway, Prometheus text format",
            response_class=PlainTextResponse)
def metrics(key: WholeProvince, pool: Pool) -> str:
    with pool.connection() as conn:
        rows = conn.execute("""SELECT gateway_id, counters->'metrics' FROM gateway_status
                               WHERE updated_at > now() - make_interval(secs => %s)
                                 AND counters ? 'metrics'""", (GATEWAY_STALE_S,)).fetchall()
    return render_prometheus({gateway_id: snapshot for gateway_id, snapshot in rows})


@router.get("/openapi.json", include_in_schema=False)
def openapi(key: Viewer, request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs(key: Viewer) -> HTMLResponse:
    # The page loads /openapi.json itself: a browser needs the header on that request too.
    return get_swagger_ui_html(openapi_url="/openapi.json", title="iotjx API",
                               swagger_ui_parameters={"persistAuthorization": True})
