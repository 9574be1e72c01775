"""The device registry: register one device or a CSV of them (admin), read one (viewer).

A city-scoped key registers only in its cities (403 otherwise, also for an id registered in another
city) and does not see other cities' devices (404, as for an id that does not exist)."""

from __future__ import annotations

import io
import tempfile
from datetime import datetime

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import Admin, Conn, DeviceId, Pool, Viewer, audit_write
from api.problems import PROBLEM
from api.schemas import RegistrationResult, device_in_model
from iotjx.apikeys import ApiKey
from iotjx.devices import DeviceRecord, Registry, parse_csv, register_devices

router = APIRouter(tags=["devices"])

DeviceIn = device_in_model()
SPOOL_IN_MEMORY = 1 << 20        # a CSV body past this goes to a temporary file while it arrives


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


@router.post("/devices", status_code=201, response_model=RegistrationResult, summary="Register or update one device",
             responses={403: PROBLEM, 422: PROBLEM})
def register_one(key: Admin, device: DeviceIn, request: Request, conn: Conn) -> RegistrationResult:  # type: ignore[valid-type]
    record = DeviceRecord(**device.model_dump())
    with conn.transaction():
        result = register_devices(conn, [record], cities=key.cities)
        audit_write(conn, request, key, target=record.device_id, change={**device.model_dump(), **result}, status=201)
    return RegistrationResult(**result)


def _import(csv_body: tempfile.SpooledTemporaryFile, key: ApiKey, request: Request, pool) -> RegistrationResult:
    """Parse and register, on a worker thread: the event loop keeps answering meanwhile."""
    lines = io.TextIOWrapper(csv_body, encoding="utf-8", newline="")
    with pool.connection() as conn:
        records = parse_csv(lines, registry=Registry.load(conn))
        if not records:
            raise HTTPException(422, "the CSV has a header but no devices")
        with conn.transaction():
            result = register_devices(conn, records, first_line=2, cities=key.cities)
            audit_write(conn, request, key, target=None, change={**result, "devices": len(records)}, status=200)
    return RegistrationResult(**result)


@router.post("/devices/bulk", response_model=RegistrationResult, summary="Register devices from CSV (all or nothing)",
             description="Errors name their CSV line; the first 100 are listed and `errors_total` counts them all. "
                         "The body is limited by IOTJX_API_MAX_IMPORT_BYTES.",
             responses={403: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
             openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"},
                 "example": "device_id,model,network,city,site_kind,site_name\n"
                            "869975034012345,cjt188-nb-water-std,nbiot,Yingtan,residential,龙岗小区\n"}}}})
async def register_bulk(key: Admin, request: Request, pool: Pool) -> RegistrationResult:
    # The body streams into a spooled file (memory up to SPOOL_IN_MEMORY, then disk; its size is
    # bounded by api.limits.BodyLimit) and is parsed a line at a time off the event loop.
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as csv_body:
        async for chunk in request.stream():
            csv_body.write(chunk)
        csv_body.seek(0)
        return await run_in_threadpool(_import, csv_body, key, request, pool)


@router.get("/devices/{device_id}", response_model=DeviceOut, summary="One device and when it was last seen",
            responses={404: PROBLEM})
def get_device(key: Viewer, device_id: DeviceId, conn: Conn) -> DeviceOut:
    row = conn.execute("""
        SELECT d.device_id, d.model, m.codec, d.pilot, d.network, s.city_code, s.kind, s.name,
               d.installed_at, d.status, coalesce(d.reporting_interval_s, m.reporting_interval_s),
               st.last_seen, coalesce(st.uplinks, 0)
        FROM devices d JOIN device_models m USING (model) LEFT JOIN sites s USING (site_id)
        LEFT JOIN device_state st USING (device_id) WHERE d.device_id = %s""", (device_id,)).fetchone()
    if row is None or not key.sees_city(row[5]):
        raise HTTPException(404, f"no device {device_id}")
    return DeviceOut(**dict(zip(DeviceOut.model_fields.keys(), row, strict=True)))
