"""The system's own state: /health (open, minimal without a key), /metrics, and the API's own
description (/openapi.json, /docs), which need a key like everything else."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from api.auth import STATE_KEY
from api.deps import Pool, Viewer, WholeProvince
from ingest.metrics import render_prometheus
from iotjx import __version__
from iotjx.db import storage_kind

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


@router.get("/health", summary="ok / degraded / down; with a key without a city scope: database, gateways, queue",
            response_model=Health, response_model_exclude_unset=True,
            responses={200: {"content": {"application/json": {"examples": {
                "without a key": {"value": {"status": "ok"}}}}}}})
def health(request: Request, pool: Pool) -> Health:
    """Open to every caller (a load balancer's probe): without a key only the status, since the rest
    (gateway ids, versions, database errors) helps an attacker more than a probe."""
    out = _health(pool)
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None or key.cities is not None:
        return Health(status=out["status"])
    return Health.model_validate(out)


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
