"""`create_app(settings)`: the FastAPI application; OpenAPI at /docs."""

from __future__ import annotations

from contextlib import asynccontextmanager
from http import HTTPStatus
from datetime import date, datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field, create_model

from analytics.coverage import breakdown, coverage_report
from api.problems import PROBLEM, problem
from api.routes_downlinks import router as downlinks_router
from ingest.metrics import render_prometheus
from iotjx import __version__
from iotjx.db import storage_kind
from iotjx.db.migrations import CITIES
from iotjx.devices import (DEVICE_ID, SITE_KINDS, DeviceRecord, RegistrationError, bundled_models, parse_csv,
                           register_devices)
from iotjx.settings import Settings
from iotjx.targets import load_catalogue

GATEWAY_STALE_S = 30


def _device_in_model() -> type[BaseModel]:
    """The registration body, its enums taken from the model catalogue, the cities and the site kinds,
    so that a request the schema admits is one the registry accepts."""
    models = tuple(sorted(m["model"] for m in bundled_models()))
    cities = tuple(sorted({str(code) for code, _, _ in CITIES} | {zh for _, zh, _ in CITIES}
                          | {en for _, _, en in CITIES}))
    return create_model(
        "DeviceIn",
        device_id=(str, Field(pattern=DEVICE_ID.pattern, examples=["869975034012345"],
                              description="IMEI or carrier platform id")),
        model=(Literal[models], Field(examples=["cjt188-nb-water-std"])),  # type: ignore[valid-type]
        network=(Literal["nbiot", "cat1"], ...),
        city=(Literal[cities], Field(examples=["360600", "Yingtan", "鹰潭"],  # type: ignore[valid-type]
                                     description="division code or name")),
        site_kind=(Literal[SITE_KINDS], Field(examples=["residential"])),  # type: ignore[valid-type]
        site_name=(str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                              examples=["月湖区 龙岗小区"])),
        installed_at=(datetime | None, None),
        reporting_interval_s=(int | None, Field(None, gt=0, lt=2**31, description="overrides the model's interval")),
        status=(Literal["active", "inactive", "retired"], "active"),
    )



class DeviceOut(BaseModel):
    device_id: str
    model: str
    codec: str
    pilot: str
    network: str
    city: int | None
    site_kind: str | None
    site_name: str | None
    installed_at: datetime
    status: str
    reporting_interval_s: int
    last_seen: datetime | None
    uplinks: int


class RegistrationResult(BaseModel):
    created: int
    updated: int
    sites: int


class Progress(BaseModel):
    value: float
    note: str = ""


class CoverageOut(BaseModel):
    generated_at: datetime
    live_factor: float
    targets: list[dict[str, Any]]
    breakdown: list[dict[str, Any]]


def _without_metrics(counters: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (counters or {}).items() if k != "metrics"}


def create_app(settings: Settings) -> FastAPI:
    if settings.database_url is None:
        raise ValueError("the API needs IOTJX_DATABASE_URL")
    catalogue = load_catalogue(settings.targets_file)
    DeviceIn = _device_in_model()
    pool = ConnectionPool(settings.database_url, min_size=1, max_size=8, open=False,
                          kwargs={"application_name": "iotjx-api", "autocommit": True})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.open(wait=False)
        yield
        pool.close()

    app = FastAPI(title="iotjx", version=__version__, lifespan=lifespan,
                  description="Telemetry backend of Jiangxi's mobile-IoT programme (物联江西).")
    app.state.pool = pool
    app.state.settings = settings
    app.include_router(downlinks_router)

    @app.exception_handler(RegistrationError)
    async def _registration(request: Request, exc: RegistrationError):
        return problem(422, "invalid device records", [{"line": n, "error": m} for n, m in exc.errors])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return problem(422, "invalid request", [{"line": None, "field": ".".join(str(p) for p in e["loc"]),
                                                  "error": e["msg"]} for e in exc.errors()])

    @app.exception_handler(HTTPException)
    async def _http_problem(request: Request, exc: HTTPException):
        return problem(exc.status_code, HTTPStatus(exc.status_code).phrase, exc.detail)

    @app.exception_handler(psycopg.OperationalError)
    async def _db_down(request: Request, exc: psycopg.OperationalError):
        return problem(503, "database unavailable", str(exc).splitlines()[0])

    @app.get("/health", summary="Database kind, gateways' broker connection and queue depth")
    def health() -> dict[str, Any]:
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

    def register_one(device) -> RegistrationResult:
        with pool.connection() as conn:
            result = register_devices(conn, [DeviceRecord(**device.model_dump())])
        return RegistrationResult(**result)

    register_one.__annotations__["device"] = DeviceIn     # built at run time from the catalogue
    app.post("/devices", status_code=201, response_model=RegistrationResult, summary="Register or update one device",
             responses={422: PROBLEM})(register_one)

    @app.get("/metrics", summary="Ingest metrics of every live gateway, Prometheus text format",
             response_class=PlainTextResponse)
    def metrics() -> str:
        with pool.connection() as conn:
            rows = conn.execute("""SELECT gateway_id, counters->'metrics' FROM gateway_status
                                   WHERE updated_at > now() - make_interval(secs => %s)
                                     AND counters ? 'metrics'""", (GATEWAY_STALE_S,)).fetchall()
        return render_prometheus({gateway_id: snapshot for gateway_id, snapshot in rows})

    @app.post("/devices/bulk", response_model=RegistrationResult, summary="Register devices from CSV (all or nothing)",
              responses={422: PROBLEM, 415: PROBLEM},
              openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"},
                  "example": "device_id,model,network,city,site_kind,site_name\n"
                             "869975034012345,cjt188-nb-water-std,nbiot,Yingtan,residential,龙岗小区\n"}}}})
    async def register_bulk(request: Request) -> RegistrationResult:
        body = await request.body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(415, "the CSV must be UTF-8") from None
        records = parse_csv(text)
        if not records:
            raise HTTPException(422, "the CSV has a header but no devices")
        with pool.connection() as conn:
            return RegistrationResult(**register_devices(conn, records, first_line=2))

    @app.get("/devices/{device_id}", response_model=DeviceOut, summary="One device and when it was last seen",
             responses={404: PROBLEM})
    def get_device(device_id: str) -> DeviceOut:
        with pool.connection() as conn:
            row = conn.execute("""
                SELECT d.device_id, d.model, m.codec, d.pilot, d.network, s.city_code, s.kind, s.name,
                       d.installed_at, d.status, coalesce(d.reporting_interval_s, m.reporting_interval_s),
                       st.last_seen, coalesce(st.uplinks, 0)
                FROM devices d JOIN device_models m USING (model) LEFT JOIN sites s USING (site_id)
                LEFT JOIN device_state st USING (device_id) WHERE d.device_id = %s""", (device_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no device {device_id}")
        keys = DeviceOut.model_fields.keys()
        return DeviceOut(**dict(zip(keys, row, strict=True)))

    @app.get("/coverage", response_model=CoverageOut, summary="Coverage against every target, and by city/pilot/network")
    def coverage(city: Annotated[int | None, Query(description="division code, e.g. 360600")] = None,
                 pilot: Literal["water", "fire", "traffic"] | None = None,
                 network: Literal["nbiot", "cat1"] | None = None) -> CoverageOut:
        now = datetime.now().astimezone()
        with pool.connection() as conn:
            rows = coverage_report(conn, catalogue, live_factor=settings.live_factor, now=now,
                                   city=city, pilot=pilot, network=network)
            table = breakdown(conn, live_factor=settings.live_factor, now=now)
        table = [r for r in table if (city is None or r["city"] == city) and (pilot is None or r["pilot"] == pilot)
                 and (network is None or r["network"] == network)]
        return CoverageOut(generated_at=now, live_factor=settings.live_factor,
                           targets=[r.as_dict() for r in rows], breakdown=table)

    @app.get("/targets", summary="The targets catalogue")
    def targets() -> list[dict[str, Any]]:
        return [{"target_id": t.target_id, "source": t.source, "clause_zh": t.clause_zh, "clause_en": t.clause_en,
                 "target_zh": t.target_zh, "target_en": t.target_en, "value": t.value, "unit": t.unit,
                 "deadline": t.deadline, "measure": t.measure, "city": t.city, "pilot": t.pilot,
                 "network": t.network, "site_kind": t.site_kind} for t in catalogue]

    @app.put("/targets/{target_id}/progress", summary="Enter the figure for a target no device measures",
             responses={404: PROBLEM, 409: PROBLEM})
    def set_progress(target_id: str, progress: Annotated[Progress, Body()]) -> dict[str, Any]:
        target = next((t for t in catalogue if t.target_id == target_id), None)
        if target is None:
            raise HTTPException(404, f"no target {target_id}")
        if target.measure != "operator":
            raise HTTPException(409, f"{target_id} is measured from devices ({target.measure}), not entered")
        with pool.connection() as conn:
            conn.execute("""INSERT INTO target_progress (target_id, value, note) VALUES (%s, %s, %s)
                            ON CONFLICT (target_id) DO UPDATE SET value = excluded.value, note = excluded.note,
                            updated_at = now()""", (target_id, progress.value, progress.note))
        return {"target_id": target_id, "value": progress.value, "as_of": date.today()}

    return app
