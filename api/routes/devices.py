"""The device registry: register one device or a CSV of them (admin), read one (viewer).

A city-scoped key registers only in its cities (403 otherwise, also for an id registered in another
city) and does not see other cities' devices (404, as for an id that does not exist)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from api.csv_import import import_csv
from api.deps import Admin, Conn, DeviceId, Pool, Viewer, audit_write
from api.problems import PROBLEM
from api.schemas import RegistrationResult, device_in_model
from iotjx.devices import DeviceRecord, parse_csv, register_devices

router = APIRouter(tags=["devices"])

DeviceIn = device_in_model()


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


@router.post("/devices/bulk", response_model=RegistrationResult, summary="Register devices from CSV (all or nothing)",
             description="Errors name their CSV line; the first 100 are listed and `errors_total` counts them all. "
                         "The body is limited by IOTJX_API_MAX_IMPORT_BYTES.",
             responses={403: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
             openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"},
                 "example": "device_id,model,network,city,site_kind,site_name\n"
                            "869975034012345,cjt188-nb-water-std,nbiot,Yingtan,residential,龙岗小区\n"}}}})
async def register_bulk(key: Admin, request: Request, pool: Pool) -> RegistrationResult:
    return RegistrationResult(**await import_csv(request, key, pool, parse=parse_csv, apply=register_devices,
                                                 noun="devices"))


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
