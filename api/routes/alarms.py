"""Fire alarms and faults (analytics/fire.py): the list, one alarm, acknowledge and clear with a
verdict (operator and above; who = the key's actor, when = now; audited); and the water alerts
(analytics/water.py's water_alerts, read-only).  Within the key's cities: an alarm belongs to the city
of its device's site; one of a device without a site is seen only by a key without a city scope.

Freshness: `GET /alarms` brings fire_alarms up to date with `analytics.fire.update_alarms` (incremental,
idempotent) first, at most once per `REFRESH_S` per API process and never while another run holds its
lock (the scheduled analytics loop, another replica): an alarm shows within that time of its frame being
stored, or of the loop's next run.  Water alerts are as the analytics loop (`update_water`) left them."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from analytics import fire
from api.csv_export import csv_response, csv_responses
from api.deps import Conn, Operator, RowId, Viewer, audit_write
from api.pagination import Page, PageQuery, newest_first
from api.problems import PROBLEM
from api.schemas import CityCode, Note
from iotjx.devices import DEVICE_ID
from iotjx.sites import SITE_CODE

log = logging.getLogger(__name__)
router = APIRouter(tags=["alarms"])

REFRESH_S = 15.0                     # update_alarms at most this often per API process
Kind = Literal[fire.KINDS]  # type: ignore[valid-type]
State = Literal[(*fire.STATES, "open")]  # type: ignore[valid-type]
WATER_KINDS = ("continuous_flow", "reverse_flow", "stopped", "battery_low", "valve_closed", "valve_abnormal")
WaterKind = Literal[WATER_KINDS]  # type: ignore[valid-type]

DeviceFilter = Annotated[str | None, Query(pattern=DEVICE_ID.pattern, max_length=64, description="a device id")]
SiteFilter = Annotated[str | None, Query(pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                                         description="a catalogue site's code")]
CityFilter = Annotated[CityCode | None, Query(description="division code, e.g. 360600")]


class AlarmOut(BaseModel):
    alarm_id: int
    device_id: str
    kind: Kind = Field(description="alarm: the fire-alarm flag; fault: the fault flag")
    state: Literal[fire.STATES] = Field(  # type: ignore[valid-type]
        description="active_unacked → active_acked → cleared; cleared_unacked: restored, not yet acknowledged")
    system_type: int
    system_address: int
    component_type: int
    component_address: int
    description: str | None = Field(description="the component's text in the raising frame")
    raised_at: datetime = Field(description="the time label of the first frame with the flag set")
    received_at: datetime = Field(description="when that frame arrived")
    restored_at: datetime | None = Field(description="the time label of the device's restore frame")
    acked_at: datetime | None
    acked_by: str | None
    cleared_at: datetime | None
    cleared_by: str | None = Field(description="'device' (its restore frame) or the operator's key")
    false_alarm: bool | None = Field(description="the operator's verdict; null until given")
    note: str
    city: int | None = Field(description="division code of the device's site; null: no site")
    site_id: str | None = Field(description="the catalogue code of the device's site (null: none or unverified)")
    site_name: str | None


_ALARM = """
    SELECT a.alarm_id, a.device_id, a.kind, a.state, a.system_type, a.system_address, a.component_type,
           a.component_address, a.description, a.raised_at, a.received_at, a.restored_at, a.acked_at, a.acked_by,
           a.cleared_at, a.cleared_by, a.false_alarm, a.note, s.city_code AS city, s.code AS site_id,
           s.name AS site_name
    FROM fire_alarms a LEFT JOIN devices d ON d.device_id = a.device_id LEFT JOIN sites s ON s.site_id = d.site_id"""


def _alarm(row: tuple) -> AlarmOut:
    return AlarmOut(**dict(zip(AlarmOut.model_fields, row, strict=True)))


def aware(t: datetime | None) -> datetime | None:
    """A query's time, UTC when it names no zone."""
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=UTC)


def time_window(since: datetime | None, until: datetime | None,
                names: tuple[str, str] = ("since", "until")) -> tuple[datetime | None, datetime | None]:
    """A list's [since, until), aware; 422 when until is not after since (`names`: the parameters' names)."""
    since, until = aware(since), aware(until)
    if since is not None and until is not None and until <= since:
        raise HTTPException(422, f"{names[1]} ({until.isoformat()}) must be after {names[0]} ({since.isoformat()})")
    return since, until


def _city_in_scope(key, city: int | None) -> None:  # noqa: ANN001 - an ApiKey
    if city is not None and not key.sees_city(city):
        raise HTTPException(403, f"city {city} is outside this key's cities")


def _filters(key, time_col: str, **given) -> tuple[list[str], dict]:  # noqa: ANN001 - an ApiKey
    """The WHERE conditions of an alarm list (`a` the list's table, `s` the device's site): only those of the
    filters given, and the key's city scope unless `city` (already checked within it) narrows further.  Not
    `(%(x)s IS NULL OR …)` for every filter: once psycopg prepares the statement (its 5th run on a connection)
    PostgreSQL may switch to a generic plan, which cannot drop those branches — at 47,000 alarms it read the
    whole table and joined every row for a city's page (0.76 s; benchmarks/README.md "API latency")."""
    where = ["true"]
    for name, cond in (("kind", "a.kind = %(kind)s"), ("city", "s.city_code = %(city)s"), ("site", "s.code = %(site)s"),
                       ("device", "a.device_id = %(device)s"), ("since", f"{time_col} >= %(since)s"),
                       ("until", f"{time_col} < %(until)s")):
        if given[name] is not None:
            where.append(cond)
    cities = None if key.cities is None or given["city"] is not None else list(key.cities)
    if cities is not None:
        where.append("s.city_code = ANY(%(cities)s)")
    return where, {**given, "cities": cities}


_REFRESH_LOCK = threading.Lock()


def refresh_alarms(request: Request, conn: psycopg.Connection) -> None:
    """`update_alarms`, at most once per REFRESH_S per app, by one request at a time, and not while
    another run holds its lock (then that run is bringing the table up to date).  A failure is logged:
    the list is then answered as the table stands."""
    state = request.app.state
    if time.monotonic() - getattr(state, "alarms_refreshed_at", -1e18) < REFRESH_S:
        return
    if not _REFRESH_LOCK.acquire(blocking=False):
        return
    try:
        state.alarms_refreshed_at = time.monotonic()
        busy = conn.execute("""SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0
                               AND objid = %s AND objsubid = 1 AND granted)""", (fire.LOCK_ID,)).fetchone()[0]
        if not busy:
            fire.update_alarms(conn)
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        log.warning("fire alarms not brought up to date before a list: %s", str(exc).splitlines()[0] if str(exc) else exc)
    finally:
        _REFRESH_LOCK.release()


_ALARM_LIST_DESC = ("Alarm and fault episodes per component (GB/T 26875.3 component states), newest `raised_at` first. "
                    "`state=open`: every state but cleared. A city-scoped key sees only its cities' alarms.")
EXPORT_MAX_ROWS = 100_000          # a CSV export's rows at most (a narrower window or filter for more)


def _alarm_query(key: Viewer, kind: Annotated[Kind | None, Query()] = None,
                 state: Annotated[State | None, Query(description="a state, or open (not cleared)")] = None,
                 city: CityFilter = None, site: SiteFilter = None, device: DeviceFilter = None,
                 since: Annotated[datetime | None, Query(description="raised at or after (without a zone: UTC)")] = None,
                 until: Annotated[datetime | None, Query(description="raised before")] = None) -> tuple[str, dict]:
    """The alarm list's filters (a dependency of the list and its CSV): SELECT … WHERE (no order, no
    limit) and its parameters."""
    since, until = time_window(since, until)
    _city_in_scope(key, city)
    where, params = _filters(key, "a.raised_at", kind=kind, city=city, site=site, device=device, since=since,
                             until=until)
    if state == "open":
        where.append("a.state <> 'cleared'")
    elif state is not None:
        where.append("a.state = %(state)s")
    return _ALARM + " WHERE " + " AND ".join(where), {**params, "state": state}


AlarmQuery = Annotated[tuple[str, dict], Depends(_alarm_query)]


def _export_rows(conn: psycopg.Connection, sql: str, params: dict) -> list[tuple]:
    rows = conn.execute(sql + " LIMIT %(export_n)s", {**params, "export_n": EXPORT_MAX_ROWS + 1}).fetchall()
    if len(rows) > EXPORT_MAX_ROWS:
        raise HTTPException(422, f"more than {EXPORT_MAX_ROWS:,} rows match: narrow since/until or the filters")
    return rows


def _visible(conn: psycopg.Connection, key, alarm_id: int, *, lock: bool = False) -> AlarmOut:  # noqa: ANN001
    row = conn.execute(_ALARM + " WHERE a.alarm_id = %s" + (" FOR UPDATE OF a" if lock else ""),
                       (alarm_id,)).fetchone()
    if row is None or not key.sees_city(row[18]):
        raise HTTPException(404, f"no fire alarm {alarm_id}")
    return _alarm(row)


class CityAckKpiOut(BaseModel):
    city: int = Field(description="division code; 0: devices without a site")
    city_name_en: str = Field(description="the city's English name; (no site) for city 0")
    alarms: int = Field(description="alarms raised in the period")
    acked: int
    ack_p50_s: float | None = Field(description="acknowledgement latency (acked_at − received_at), median, s")
    ack_p90_s: float | None
    within_budget: int = Field(description=f"acknowledged within GB 50440's {fire.DISPLAY_BUDGET_S:g} s")
    share_within_budget: float | None


class SiteFalseAlarmsOut(BaseModel):
    city: int
    site_name: str | None
    alarms: int
    with_verdict: int
    false_alarms: int
    false_share: float | None = Field(description="false alarms / alarms with a verdict")


class FireKpisOut(BaseModel):
    since: datetime
    until: datetime
    cities: list[CityAckKpiOut]
    sites: list[SiteFalseAlarmsOut]


@router.get("/alarms/kpis", response_model=FireKpisOut, responses={403: PROBLEM, 422: PROBLEM},
            summary="The monitoring centre's KPIs over alarms raised in [since, until)",
            description="Acknowledgement latency per city (p50/p90, share within the 10 s display budget) and the "
                        "false-alarm share per site (analytics/fire.py). A city-scoped key sees its cities' rows.")
def alarm_kpis(key: Viewer, conn: Conn, request: Request,
               since: Annotated[datetime, Query(description="raised at or after (without a zone: UTC)")],
               until: Annotated[datetime, Query(description="raised before")],
               city: CityFilter = None) -> FireKpisOut:
    since, until = time_window(since, until)
    _city_in_scope(key, city)
    refresh_alarms(request, conn)
    k = fire.fire_kpis(conn, since, until, city)
    return FireKpisOut(
        since=k.since, until=k.until,
        cities=[CityAckKpiOut(city=c.city_code, city_name_en=c.city, alarms=c.alarms, acked=c.acked, ack_p50_s=c.ack_p50_s,
                              ack_p90_s=c.ack_p90_s, within_budget=c.within_budget,
                              share_within_budget=c.share_within_budget)
                for c in k.cities if key.sees_city(c.city_code or None)],
        sites=[SiteFalseAlarmsOut(city=x.city_code, site_name=x.site_name, alarms=x.alarms, with_verdict=x.with_verdict,
                                  false_alarms=x.false_alarms, false_share=x.false_share)
               for x in k.sites if key.sees_city(x.city_code or None)])


@router.get("/alarms/{alarm_id}", response_model=AlarmOut, responses={404: PROBLEM}, summary="One alarm or fault")
def get_alarm(key: Viewer, alarm_id: RowId, conn: Conn) -> AlarmOut:
    return _visible(conn, key, alarm_id)


def _act(conn: psycopg.Connection, request: Request, key, alarm_id: int, action, change: dict) -> AlarmOut:  # noqa: ANN001
    with conn.transaction():
        before = _visible(conn, key, alarm_id, lock=True)
        try:
            action()
        except fire.AlarmNotFound:
            raise HTTPException(404, f"no fire alarm {alarm_id}") from None
        except fire.InvalidTransition as exc:
            raise HTTPException(409, str(exc)) from None
        after = _visible(conn, key, alarm_id)
        audit_write(conn, request, key, target=f"alarm:{alarm_id}", status=200,
                    change={**change, "from": before.state, "to": after.state, "device_id": after.device_id})
    return after


@router.post("/alarms/{alarm_id}/ack", response_model=AlarmOut, responses={404: PROBLEM, 409: PROBLEM},
             summary="Acknowledge an alarm (now, by this key)",
             description="active_unacked → active_acked; cleared_unacked → cleared. 409 when it is already "
                         "acknowledged.")
def ack_alarm(key: Operator, alarm_id: RowId, conn: Conn, request: Request) -> AlarmOut:
    return _act(conn, request, key, alarm_id, lambda: fire.acknowledge(conn, alarm_id, key.actor), {"action": "ack"})


class ClearIn(BaseModel):
    false_alarm: bool = Field(description="the verdict: true when there was no fire (or no fault)")
    note: Note = ""


@router.post("/alarms/{alarm_id}/clear", response_model=AlarmOut, responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM},
             summary="Clear an alarm with a verdict (now, by this key)",
             description="An active alarm becomes cleared (and acknowledged if it was not); one the device already "
                         "restored keeps its cleared_at and takes the verdict. 409 when a verdict was already given.")
def clear_alarm(key: Operator, alarm_id: RowId, body: ClearIn, conn: Conn, request: Request) -> AlarmOut:
    return _act(conn, request, key, alarm_id,
                lambda: fire.clear(conn, alarm_id, key.actor, body.false_alarm, body.note),
                {"action": "clear", "false_alarm": body.false_alarm, "note": body.note})


# --------------------------------------------------------------------------- water alerts

class WaterAlertOut(BaseModel):
    alert_id: int
    device_id: str
    kind: WaterKind
    opened_at: datetime = Field(description="measurement time of the reading that opened it")
    closed_at: datetime | None = Field(description="…and of the one that closed it; null: open")
    detail: str
    city: int | None
    site_id: str | None = Field(description="the catalogue code of the meter's site (null: none or unverified)")
    site_name: str | None


@router.get("/alarms", response_model=Page[AlarmOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Fire alarms and faults, newest raised first",
            description=_ALARM_LIST_DESC + " Cursor-paginated.")
def list_alarms(key: Viewer, query: AlarmQuery, conn: Conn, page: PageQuery, request: Request) -> Page[AlarmOut]:
    sql, params = query
    tail, keyset = newest_first(page, "a.raised_at", "a.alarm_id")
    refresh_alarms(request, conn)
    rows = conn.execute(sql + tail, {**params, **keyset}).fetchall()
    return page.of([_alarm(r) for r in rows], key=lambda a: (a.raised_at, a.alarm_id))


@router.get("/alarms.csv", response_class=StreamingResponse, summary="Fire alarms and faults as CSV (as /alarms)",
            description=_ALARM_LIST_DESC + f" Every matching alarm, no pages; more than {EXPORT_MAX_ROWS:,} is a 422 "
                                           "(narrow the window).", responses=csv_responses("the alarms, newest first", (403, 422)))
def export_alarms(key: Viewer, query: AlarmQuery, conn: Conn, request: Request) -> StreamingResponse:
    sql, params = query
    refresh_alarms(request, conn)
    rows = _export_rows(conn, sql + " ORDER BY a.raised_at DESC, a.alarm_id DESC", params)
    return csv_response(AlarmOut, [_alarm(r) for r in rows], "alarms.csv")


_WATER_DESC = ("Continuous flow, reverse flow, stopped meter, battery low, valve closed or abnormal "
               "(analytics/water.py), newest `opened_at` first; read-only.")


def _water_query(key: Viewer, kind: Annotated[WaterKind | None, Query()] = None,
                 is_open: Annotated[bool | None, Query(alias="open", description="true: open only; false: closed only")] = None,
                 city: CityFilter = None, site: SiteFilter = None, device: DeviceFilter = None,
                 since: Annotated[datetime | None, Query(description="opened at or after")] = None,
                 until: Annotated[datetime | None, Query(description="opened before")] = None) -> tuple[str, dict]:
    """The water-alert list's filters (a dependency of the list and its CSV)."""
    since, until = time_window(since, until)
    _city_in_scope(key, city)
    where, params = _filters(key, "a.opened_at", kind=kind, city=city, site=site, device=device, since=since,
                             until=until)
    if is_open is not None:
        where.append("(a.closed_at IS NULL) = %(open)s")
    return ("""
        SELECT a.alert_id, a.device_id, a.kind, a.opened_at, a.closed_at, a.detail, s.city_code, s.code, s.name
        FROM water_alerts a LEFT JOIN devices d ON d.device_id = a.device_id LEFT JOIN sites s ON s.site_id = d.site_id
        WHERE """ + " AND ".join(where), {**params, "open": is_open})


WaterQuery = Annotated[tuple[str, dict], Depends(_water_query)]


def _water_alert(r: tuple) -> WaterAlertOut:
    return WaterAlertOut(**dict(zip(WaterAlertOut.model_fields, r, strict=True)))


@router.get("/water/alerts", response_model=Page[WaterAlertOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Per-meter water alerts, newest opened first", description=_WATER_DESC + " Cursor-paginated.")
def list_water_alerts(key: Viewer, query: WaterQuery, conn: Conn, page: PageQuery) -> Page[WaterAlertOut]:
    sql, params = query
    tail, keyset = newest_first(page, "a.opened_at", "a.alert_id")
    rows = conn.execute(sql + tail, {**params, **keyset}).fetchall()
    return page.of([_water_alert(r) for r in rows], key=lambda a: (a.opened_at, a.alert_id))


@router.get("/water/alerts.csv", response_class=StreamingResponse, summary="Water alerts as CSV (as /water/alerts)",
            description=_WATER_DESC + f" Every matching alert, no pages; more than {EXPORT_MAX_ROWS:,} is a 422.",
            responses=csv_responses("the water alerts, newest first", (403, 422)))
def export_water_alerts(key: Viewer, query: WaterQuery, conn: Conn) -> StreamingResponse:
    sql, params = query
    rows = _export_rows(conn, sql + " ORDER BY a.opened_at DESC, a.alert_id DESC", params)
    return csv_response(WaterAlertOut, [_water_alert(r) for r in rows], "water-alerts.csv")
