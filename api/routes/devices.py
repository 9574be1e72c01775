"""The device registry: list and export devices (viewer), register one (admin) or a CSV of them
(admin), change a device's site, status or reporting interval (operator), decommission one (operator).

A city-scoped key registers only in its cities (403 otherwise, also for an id registered in another
city), lists and exports only its cities' devices, and does not see other cities' devices (404, as for
an id that does not exist).  A device's `state` is the Device health definitions' (analytics/health.py),
read through their own SQL: `live`, `silent`, or `malformed` (not live, and its recent uplinks were
rejected: it sends only malformed frames); null for a device that is not active or not yet installed."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from analytics.health import BATTERY_SQL, NOT_LIVE_SQL, battery_params
from api.csv_import import MAX_SHOWN, import_csv, import_devices_skipping, require_csv
from api.deps import Admin, AppSettings, Conn, DeviceId, Operator, Pool, Viewer, audit_write, device_city
from api.pagination import Page, PageQuery
from api.problems import PROBLEM
from api.schemas import CityCode, RegistrationResult, Text, device_in_model
from iotjx.apikeys import ApiKey
from iotjx.devices import MAX_REPORTING_INTERVAL_S, SITE_CODE, DeviceRecord, parse_csv, register_devices
from iotjx.model import NETWORKS, PILOTS

router = APIRouter(tags=["devices"])

DeviceIn = device_in_model()
STATES = ("live", "silent", "malformed")
CSV_EXAMPLE = ("device_id,model,network,city,site_kind,site_name\n"
               "869975034012345,cjt188-nb-water-std,nbiot,Yingtan,residential,龙岗小区\n")


class DeviceOut(BaseModel):
    device_id: str
    model: str
    codec: str
    pilot: str
    network: str
    city: int | None = Field(description="the division code of the device's site")
    site_id: str | None = Field(description="the catalogue code of its site; null for an unverified site")
    site_kind: str | None
    site_name: str | None
    installed_at: datetime
    status: Literal["active", "inactive", "retired"]
    reporting_interval_s: int = Field(description="the device's own, else its model's")
    last_seen: datetime | None
    uplinks: int
    state: Literal[STATES] | None = Field(  # type: ignore[valid-type]
        description="live / silent / malformed (sends only malformed frames), as Device health defines them; "
                    "null for a device not active or not yet installed")
    live: bool


class LineError(BaseModel):
    line: int = Field(description="the CSV line (1: the header)")
    error: str


class BulkResult(RegistrationResult):
    skipped: int = Field(0, description="on_error=skip: lines not imported (each is in `errors`)")
    errors: list[LineError] = Field([], description="on_error=skip: the bad lines and why (the first "
                                                    f"{MAX_SHOWN}, by line)")
    errors_total: int = Field(0, description="on_error=skip: every reason counted")


class DevicePatch(BaseModel):
    """What an operator may change; a field left out is left as it is."""

    model_config = ConfigDict(extra="forbid")

    site_id: str | None = Field(None, pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                                description="move the device to this catalogue site (omitted or null: stays)")
    status: Literal["active", "inactive"] | None = Field(
        None, description="omitted or null: unchanged; to retire a device, decommission it")
    reporting_interval_s: int | None = Field(None, gt=0, le=MAX_REPORTING_INTERVAL_S,
                                             description="seconds; null: the model's; omitted: unchanged")


class Decommissioned(BaseModel):
    device_id: str
    status: Literal["retired"]
    previous_status: Literal["active", "inactive", "retired"]
    mqtt_account_removed: bool
    coap_token_removed: bool
    commands_expired: int = Field(description="commands that were still waiting for it (queued or sent)")


# --------------------------------------------------------------------------- the query behind list, CSV and GET

@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """The filters of a device list (None: any)."""

    city: int | None = None
    pilot: str | None = None
    network: str | None = None
    model: str | None = None
    site_id: str | None = None
    status: str | None = None
    state: str | None = None
    battery_low: bool | None = None
    ids: tuple[str, ...] | None = None       # only these devices (the health SQL reads only theirs)


COLUMNS = ("device_id", "model", "codec", "pilot", "network", "city", "site_id", "site_kind", "site_name",
           "installed_at", "status", "reporting_interval_s", "last_seen", "uplinks", "state", "own_interval_s")


# The filters that need no health SQL, and the key's scope.
_WHERE = """
        WHERE (%(after)s::text IS NULL OR d.device_id > %(after)s::text)
          AND (%(scope)s::int[] IS NULL OR s.city_code = ANY(%(scope)s::int[]))
          AND (%(city)s::int IS NULL OR s.city_code = %(city)s::int)
          AND (%(pilot)s::text IS NULL OR d.pilot = %(pilot)s::text)
          AND (%(network)s::text IS NULL OR d.network = %(network)s::text)
          AND (%(model)s::text IS NULL OR d.model = %(model)s::text)
          AND (%(site)s::text IS NULL OR s.code = %(site)s::text)
          AND (%(status)s::text IS NULL OR d.status = %(status)s::text)
          AND (%(ids)s::text[] IS NULL OR d.device_id = ANY(%(ids)s::text[]))"""


def _device_query(f: DeviceFilter, key: ApiKey, *, after: str | None = None, limit: int | None = None
                  ) -> tuple[str, dict[str, Any]]:
    """SQL and parameters for the devices `f` selects that `key` may see, by device_id.  The state and
    the battery come from analytics.health's own SQL (parameter t: the instant, from the transaction)."""
    battery = f.battery_low is not None
    sql = f"""
        WITH nl AS ({NOT_LIVE_SQL}){f", bat AS ({BATTERY_SQL})" if battery else ""}
        SELECT d.device_id, d.model, m.codec, d.pilot, d.network, s.city_code, s.code, s.kind, s.name,
               d.installed_at, d.status, coalesce(d.reporting_interval_s, m.reporting_interval_s),
               st.last_seen, coalesce(st.uplinks, 0),
               CASE WHEN d.status = 'active' AND d.installed_at <= %(t)s THEN
                    CASE WHEN nl.device_id IS NULL THEN 'live' WHEN nl.malformed THEN 'malformed' ELSE 'silent' END
               END AS state,
               d.reporting_interval_s
        FROM devices d JOIN device_models m USING (model) LEFT JOIN sites s ON s.site_id = d.site_id
        LEFT JOIN device_state st ON st.device_id = d.device_id LEFT JOIN nl ON nl.device_id = d.device_id
        {"LEFT JOIN bat ON bat.device_id = d.device_id" if battery else ""}
        {_WHERE}
          {"AND coalesce(bat.low, false) = %(battery)s" if battery else ""}"""
    sql = f"""SELECT * FROM ({sql}) x WHERE (%(state)s::text IS NULL OR x.state = %(state)s::text)
              ORDER BY x.device_id {"LIMIT %(limit)s" if limit is not None else ""}"""
    return sql, _params(f, key, after=after, limit=limit)


def _params(f: DeviceFilter, key: ApiKey, *, after: str | None, limit: int | None) -> dict[str, Any]:
    scope = list(key.cities) if key.cities is not None else None
    ids = list(f.ids) if f.ids is not None else None
    return {**battery_params(None, f.city, ids), "after": after, "scope": scope, "city": f.city, "pilot": f.pilot,
            "network": f.network, "model": f.model, "site": f.site_id, "status": f.status,
            "battery": f.battery_low, "state": f.state, "limit": limit}


def _page_ids(conn: psycopg.Connection, f: DeviceFilter, key: ApiKey, *, after: str | None, limit: int) -> list[str]:
    """The ids of a page when no filter needs the health SQL: an index range, so that the health SQL
    then reads only these devices, not the fleet."""
    sql = f"""SELECT d.device_id FROM devices d LEFT JOIN sites s ON s.site_id = d.site_id {_WHERE}
              ORDER BY d.device_id LIMIT %(limit)s"""
    return [r[0] for r in conn.execute(sql, _params(f, key, after=after, limit=limit))]


def _begin(conn: psycopg.Connection, live_factor: float, params: dict[str, Any]) -> dict[str, Any]:
    """In the caller's transaction: JIT off (as analytics.health: the plan over the readings is costed
    high enough to be compiled, which costs more than the query) and the instant, the database's clock."""
    conn.execute("SET LOCAL jit = off")
    return {**params, "t": conn.execute("SELECT now()").fetchone()[0], "f": live_factor}


def _out(row: tuple) -> DeviceOut:
    values = dict(zip(COLUMNS, row, strict=True))
    values.pop("own_interval_s")
    return DeviceOut(**values, live=values["state"] == "live")


def _read_device(conn: psycopg.Connection, key: ApiKey, device_id: str, live_factor: float) -> DeviceOut:
    with conn.transaction():
        row = conn.execute("SELECT s.city_code FROM devices d LEFT JOIN sites s USING (site_id) "
                           "WHERE d.device_id = %s", (device_id,)).fetchone()
        if row is None or not key.sees_city(row[0]):
            raise HTTPException(404, f"no device {device_id}")
        sql, params = _device_query(DeviceFilter(ids=(device_id,)), key)
        params = _begin(conn, live_factor, params)
        found = conn.execute(sql, params).fetchone()
    if found is None:
        raise HTTPException(404, f"no device {device_id}")
    return _out(found)


# --------------------------------------------------------------------------- filters, shared by list and CSV

def _device_filters(
        key: Viewer,
        city: Annotated[CityCode | None, Query(description="division code, e.g. 360600")] = None,
        pilot: Annotated[Literal[PILOTS] | None, Query()] = None,  # type: ignore[valid-type]
        network: Annotated[Literal[NETWORKS] | None, Query()] = None,  # type: ignore[valid-type]
        model: Annotated[Text | None, Query(max_length=100, examples=["cjt188-nb-water-std"])] = None,
        site_id: Annotated[str | None, Query(pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                                             description="a catalogue site's code (`site_id` of /sites)")] = None,
        status: Annotated[Literal["active", "inactive", "retired"] | None, Query()] = None,
        state: Annotated[Literal[STATES] | None, Query(  # type: ignore[valid-type]
            description="live / silent / malformed (sends only malformed frames), as Device health defines them; "
                        "only active devices installed by now have a state")] = None,
        battery_low: Annotated[bool | None, Query(
            description="true: active devices whose latest battery reading is low (Device health's battery "
                        "state); false: every other device")] = None) -> DeviceFilter:
    if city is not None and not key.sees_city(city):
        raise HTTPException(403, f"city {city} is outside this key's cities")
    return DeviceFilter(city=city, pilot=pilot, network=network, model=model, site_id=site_id, status=status,
                        state=state, battery_low=battery_low)


Filters = Annotated[DeviceFilter, Depends(_device_filters)]
FILTERS_DOC = ("Filters combine (and); a city-scoped key gets only its cities' devices. `state` and `battery_low` "
               "are the Device health definitions (README), at the database's clock.")


@router.get("/devices", response_model=Page[DeviceOut], summary="Devices, filtered, by device_id",
            description=FILTERS_DOC + " Paginated by cursor (`next_cursor`).", responses={403: PROBLEM, 422: PROBLEM})
def list_devices(key: Viewer, filters: Filters, page: PageQuery, conn: Conn, settings: AppSettings) -> Page[DeviceOut]:
    after = page.after(1)[0] if page.cursor is not None else None
    if after is not None and not isinstance(after, str):
        raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page as is)")
    with conn.transaction():
        if filters.state is None and filters.battery_low is None:
            ids = _page_ids(conn, filters, key, after=after, limit=page.limit + 1)
            sql, params = _device_query(replace(filters, ids=tuple(ids)), key)
        else:
            sql, params = _device_query(filters, key, after=after, limit=page.limit + 1)
        params = _begin(conn, settings.live_factor, params)
        rows = conn.execute(sql, params).fetchall()
    return page.of([_out(r) for r in rows], key=lambda d: (d.device_id,))


CSV_HEADER = ("device_id", "model", "network", "city", "site_kind", "site_name", "site_id", "installed_at",
              "reporting_interval_s", "status", "pilot", "codec", "last_seen", "uplinks", "state")
CSV_BATCH = 2000


def _csv_line(row: tuple) -> list[Any]:
    v = dict(zip(COLUMNS, row, strict=True))
    return [v["device_id"], v["model"], v["network"], v["city"] or "", v["site_kind"] or "", v["site_name"] or "",
            v["site_id"] or "", v["installed_at"].isoformat(), v["own_interval_s"] or "", v["status"], v["pilot"],
            v["codec"], v["last_seen"].isoformat() if v["last_seen"] else "", v["uplinks"], v["state"] or ""]


def _csv_chunks(pool: ConnectionPool, sql: str, params: dict[str, Any], live_factor: float) -> Iterator[bytes]:
    """The CSV a batch of rows at a time, read through a server-side cursor (memory: one batch)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    yield out.getvalue().encode()
    with pool.connection() as conn, conn.transaction():
        params = _begin(conn, live_factor, params)
        with conn.cursor(name="devices_csv") as cur:
            cur.itersize = CSV_BATCH
            cur.execute(sql, params)
            while rows := cur.fetchmany(CSV_BATCH):
                out.seek(0)
                out.truncate()
                writer.writerows(_csv_line(r) for r in rows)
                yield out.getvalue().encode()


@router.get("/devices.csv", response_class=StreamingResponse, summary="The devices as CSV (same filters as /devices)",
            description=FILTERS_DOC + " UTF-8 with a header line, streamed; the columns of `POST /devices/bulk` "
                        "first (a file exported is importable as is), then pilot, codec, last_seen, uplinks, state "
                        "(ignored by the import).",
            responses={200: {"description": "the devices, one per line", "content": {"text/csv": {
                "schema": {"type": "string"}}}}, 403: PROBLEM, 422: PROBLEM})
def export_devices(key: Viewer, filters: Filters, pool: Pool, settings: AppSettings) -> StreamingResponse:
    sql, params = _device_query(filters, key)
    return StreamingResponse(_csv_chunks(pool, sql, params, settings.live_factor), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="devices.csv"'})


# --------------------------------------------------------------------------- writes

@router.post("/devices", status_code=201, response_model=RegistrationResult, summary="Register or update one device",
             description="201 when the device was created, 200 when an existing one was updated.",
             responses={200: {"model": RegistrationResult, "description": "an existing device updated"},
                        403: PROBLEM, 422: PROBLEM})
def register_one(key: Admin, device: DeviceIn, request: Request, response: Response,  # type: ignore[valid-type]
                 conn: Conn) -> RegistrationResult:
    record = DeviceRecord(**device.model_dump())
    with conn.transaction():
        result = register_devices(conn, [record], cities=key.cities)
        response.status_code = 201 if result["created"] else 200
        audit_write(conn, request, key, target=record.device_id, change={**device.model_dump(), **result},
                    status=response.status_code)
    return RegistrationResult(**result)


@router.post("/devices/bulk", response_model=BulkResult, summary="Register devices from CSV",
             description="`on_error=reject` (the default): all or nothing; any bad line is a 422 naming lines and "
                         "reasons (the first 100; `errors_total` counts them all), and nothing is written. "
                         "`on_error=skip`: the good lines are registered (in one transaction) and every bad line "
                         f"is reported in `errors` (the first {MAX_SHOWN}) and counted in `skipped`; a bad line "
                         "writes nothing. Either way a file that cannot be read through (no header, a line "
                         "that is not CSV, not UTF-8) is refused whole. Content-Type text/csv (another "
                         "declared type: 415); the body is limited by IOTJX_API_MAX_IMPORT_BYTES.",
             responses={403: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
             openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"},
                                                                                      "example": CSV_EXAMPLE}}}})
async def register_bulk(key: Admin, request: Request, pool: Pool,
                        on_error: Annotated[Literal["reject", "skip"], Query(
                            description="reject: all or nothing; skip: land the good lines, report the bad")] = "reject"
                        ) -> BulkResult:
    require_csv(request)
    if on_error == "skip":
        return BulkResult(**await import_devices_skipping(request, key, pool))
    return BulkResult(**await import_csv(request, key, pool, parse=parse_csv, apply=register_devices, noun="devices"))


@router.get("/devices/{device_id}", response_model=DeviceOut, summary="One device, its state and when it was last seen",
            responses={404: PROBLEM})
def get_device(key: Viewer, device_id: DeviceId, conn: Conn, settings: AppSettings) -> DeviceOut:
    return _read_device(conn, key, device_id, settings.live_factor)


@router.patch("/devices/{device_id}", response_model=DeviceOut, summary="Change a device's site, status or interval",
              description="Only the fields sent change: `site_id` (a catalogue site's code), `status` (active or "
                          "inactive; to retire a device, decommission it), `reporting_interval_s` (null: the "
                          "model's). Audited with the values before and after. A retired device is not changed (409).",
              responses={403: PROBLEM, 404: PROBLEM, 409: PROBLEM, 422: PROBLEM})
def patch_device(key: Operator, device_id: DeviceId, patch: DevicePatch, request: Request, conn: Conn,
                 settings: AppSettings) -> DeviceOut:
    sent = patch.model_fields_set
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        site_id, code, status, interval = conn.execute(
            "SELECT d.site_id, s.code, d.status, d.reporting_interval_s FROM devices d "
            "LEFT JOIN sites s USING (site_id) WHERE d.device_id = %s", (device_id,)).fetchone()
        if status == "retired":
            raise HTTPException(409, f"device {device_id} is retired (decommissioned); register it again to bring it back")
        before = {"site_id": code, "status": status, "reporting_interval_s": interval}
        after = dict(before)
        if patch.site_id is not None:
            site = conn.execute("SELECT site_id, city_code FROM sites WHERE code = %s", (patch.site_id,)).fetchone()
            if site is None:
                raise HTTPException(422, f"unknown site_id {patch.site_id!r}: not a code of the site catalogue")
            if not key.sees_city(site[1]):
                raise HTTPException(403, f"site {patch.site_id} is in a city outside this key's cities")
            site_id, after["site_id"] = site[0], patch.site_id
        if patch.status is not None:
            after["status"] = patch.status
        if "reporting_interval_s" in sent:
            after["reporting_interval_s"] = patch.reporting_interval_s
        conn.execute("UPDATE devices SET site_id = %s, status = %s, reporting_interval_s = %s WHERE device_id = %s",
                     (site_id, after["status"], after["reporting_interval_s"], device_id))
        changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
        audit_write(conn, request, key, target=device_id, change=changed, status=200)
    return _read_device(conn, key, device_id, settings.live_factor)


@router.post("/devices/{device_id}/decommission", response_model=Decommissioned,
             summary="Retire a device: its readings stay, its credentials go",
             description="Sets status `retired` (the gateway then refuses its uplinks as from an unknown device), "
                         "removes its MQTT account and its CoAP token, expires the commands still waiting for it; "
                         "readings, rollups and its audit trail are kept. Audited. Decommissioning a retired device again changes nothing but removes any "
                         "credential set since.",
             responses={404: PROBLEM})
def decommission(key: Operator, device_id: DeviceId, request: Request, conn: Conn) -> Decommissioned:
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        previous = conn.execute("SELECT status FROM devices WHERE device_id = %s", (device_id,)).fetchone()[0]
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id = %s AND status <> 'retired'", (device_id,))
        mqtt = conn.execute("DELETE FROM mqtt_accounts WHERE device_id = %s AND role = 'device'", (device_id,)).rowcount
        coap = conn.execute("DELETE FROM device_credentials WHERE device_id = %s", (device_id,)).rowcount
        expired = conn.execute("UPDATE downlinks SET status = 'expired' WHERE device_id = %s "
                               "AND status IN ('queued', 'sent')", (device_id,)).rowcount
        out = Decommissioned(device_id=device_id, status="retired", previous_status=previous,
                             mqtt_account_removed=mqtt > 0, coap_token_removed=coap > 0, commands_expired=expired)
        audit_write(conn, request, key, target=device_id, change=out.model_dump(exclude={"device_id"}), status=200)
    return out
