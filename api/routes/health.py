"""Device health (analytics/health.py, README "Device health"; viewer, within the key's cities): the
report now — online rate per city × pilot × network, silent devices, devices sending only malformed
frames, batteries — and uplink success per device over a window, with CSV twins.

`/health` itself is the service's probe (api/routes/system.py); these are the fleet's figures."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import psycopg
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from analytics import health
from api.deps import AppSettings, Conn, Viewer
from api.figures import (CityFilter, From, To, cities_for, city_of, csv_response, csv_responses, page_by_device,
                         per_city, window)
from api.pagination import Page, PageQuery
from api.problems import PROBLEM

router = APIRouter(tags=["health"])

MAX_SUCCESS_DAYS = 31           # the raw log's retention (IOTJX_RAW_RETENTION_DAYS, 30) bounds what it can count


class OnlineRateOut(BaseModel):
    city: int | None = Field(description="division code; null: devices without a site")
    city_name_zh: str | None
    city_name_en: str | None
    pilot: str
    network: str
    registered: int
    active: int
    online: int = Field(description="active and live (coverage's definition)")
    rate: float | None = Field(description="online / active")


class NotLiveOut(BaseModel):
    device_id: str
    model: str
    family: str
    network: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    site_name: str | None
    interval_s: int
    last_seen: datetime | None = Field(description="its last stored uplink; null: never heard")
    since: datetime = Field(description="last_seen, else installed_at")
    silent_s: float
    rejects: int = Field(description="rejects with its id in its live window (malformed senders)")
    last_reject_at: datetime | None
    last_reason: str | None
    last_detail: str | None


class BatteryOut(BaseModel):
    device_id: str
    model: str
    family: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    site_name: str | None
    state: Literal[health.STATES]  # type: ignore[valid-type]
    value: float | None
    unit: str | None = Field(description="mV or %")
    source: str | None = Field(description="water_bit, parking, smoke_0x88, battery_pct")
    at: datetime | None = Field(description="the reading's receive time")


class BatteryCounts(BaseModel):
    ok: int
    low: int
    unknown: int


class HealthReportOut(BaseModel):
    now: datetime
    online: list[OnlineRateOut]
    silent_total: int
    silent: list[NotLiveOut] = Field(description="longest silent first, at most limit")
    malformed_total: int
    malformed: list[NotLiveOut] = Field(description="sending only malformed frames, longest silent first, at most limit")
    batteries: BatteryCounts
    low_batteries: list[BatteryOut] = Field(description="by device id, at most limit")
    suppressed_rejects: int | None = Field(
        description="rejects only tallied (no device id) in the longest live window; null for a city-scoped key")


def _online(r: health.OnlineRate) -> OnlineRateOut:
    return OnlineRateOut(**city_of(r.city_code), pilot=r.pilot, network=r.network, registered=r.registered,
                         active=r.active, online=r.online, rate=r.rate)


def _not_live(d: health.SilentDevice) -> NotLiveOut:
    return NotLiveOut(device_id=d.device_id, model=d.model, family=d.family, network=d.network, **city_of(d.city_code),
                      site_name=d.site_name, interval_s=d.interval_s, last_seen=d.last_seen, since=d.since,
                      silent_s=d.silent_s, rejects=d.rejects, last_reject_at=d.last_reject_at,
                      last_reason=d.last_reason, last_detail=d.last_detail)


def _reports(key, conn: psycopg.Connection, settings, city: int | None) -> list[health.HealthReport]:
    now = conn.execute("SELECT now()").fetchone()[0]
    return [health.health_report(conn, live_factor=settings.live_factor, tz=settings.tz, now=now, city=c,
                                 battery_thresholds=settings.battery_thresholds) for c in cities_for(key, city)]


@router.get("/health/report", response_model=HealthReportOut, responses={403: PROBLEM, 422: PROBLEM},
            summary="The fleet's health now: online rates, silent and malformed-only devices, batteries",
            description="analytics.health.health_report: online (live) / active per city × pilot × network; the "
                        "silent devices and those sending only malformed frames (the longest silent first, the first "
                        "`limit`, and how many); battery states counted, and the low ones (the first `limit`). The "
                        "whole lists: `GET /devices?state=silent`, `state=malformed`, `battery_low=true`.")
def report(key: Viewer, conn: Conn, settings: AppSettings, city: CityFilter = None,
           limit: Annotated[int, Query(ge=0, le=1000, description="devices listed per list")] = 100) -> HealthReportOut:
    reports = _reports(key, conn, settings, city)
    silent = sorted((d for r in reports for d in r.silent), key=lambda d: (d.since, d.device_id))
    malformed = sorted((d for r in reports for d in r.malformed), key=lambda d: (d.since, d.device_id))
    batteries = [b for r in reports for b in r.batteries]
    low = sorted((b for b in batteries if b.state == "low"), key=lambda b: b.device_id)
    counts = {s: sum(b.state == s for b in batteries) for s in health.STATES}
    return HealthReportOut(
        now=reports[0].now, online=[_online(o) for r in reports for o in r.online],
        silent_total=len(silent), silent=[_not_live(d) for d in silent[:limit]],
        malformed_total=len(malformed), malformed=[_not_live(d) for d in malformed[:limit]],
        batteries=BatteryCounts(**counts),
        low_batteries=[BatteryOut(device_id=b.device_id, model=b.model, family=b.family, **city_of(b.city_code),
                                  site_name=b.site_name, state=b.state, value=b.value, unit=b.unit, source=b.source,
                                  at=b.at) for b in low[:limit]],
        suppressed_rejects=reports[0].suppressed_rejects if key.cities is None else None)


@router.get("/health/online.csv", response_class=StreamingResponse, responses=csv_responses("one cell a line"),
            summary="Online rate per city × pilot × network now, as CSV")
def online_csv(key: Viewer, conn: Conn, settings: AppSettings, city: CityFilter = None) -> StreamingResponse:
    now = conn.execute("SELECT now()").fetchone()[0]
    rows = per_city(key, city, lambda c: health.online_rates(conn, live_factor=settings.live_factor, tz=settings.tz,
                                                             now=now, city=c))
    return csv_response(OnlineRateOut, [_online(r) for r in rows], "health-online.csv")


class UplinkSuccessOut(BaseModel):
    device_id: str
    model: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    interval_s: int
    counted_from: datetime = Field(description="max(from, installed_at)")
    received: int = Field(description="stored uplinks in [counted_from, to)")
    expected: int = Field(description="whole reporting intervals from counted_from to to")
    success: float | None = Field(description="min(1, received / expected); null: nothing expected yet")


def _success(conn: psycopg.Connection, since: datetime, until: datetime, city: int | None, after: str | None = None,
             limit: int | None = None) -> list[UplinkSuccessOut]:
    rows = health.uplink_success(conn, since, until, city, after=after, limit=limit)
    return [UplinkSuccessOut(device_id=u.device_id, model=u.model, **city_of(u.city_code), interval_s=u.interval_s,
                             counted_from=u.counted_from, received=u.received, expected=u.expected, success=u.success)
            for u in rows]


_SUCCESS_DOC = (f"Per active device installed before `to`: stored uplinks in [from, to) / whole reporting intervals "
                f"expected (at most {MAX_SUCCESS_DAYS} days: the raw log's retention).")


@router.get("/health/uplink-success", response_model=Page[UplinkSuccessOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Uplink success per device over a window", description=_SUCCESS_DOC + " By device id, paginated.")
def uplink_success(key: Viewer, conn: Conn, page: PageQuery, from_: From, to: To,
                   city: CityFilter = None) -> Page[UplinkSuccessOut]:
    since, until = window(from_, to, MAX_SUCCESS_DAYS)
    return page_by_device(key, city, page, lambda c, after, n: _success(conn, since, until, c, after, n))


@router.get("/health/uplink-success.csv", response_class=StreamingResponse, responses=csv_responses("one device a line"),
            summary="Uplink success per device over a window, as CSV (same parameters)", description=_SUCCESS_DOC)
def uplink_success_csv(key: Viewer, conn: Conn, from_: From, to: To, city: CityFilter = None) -> StreamingResponse:
    since, until = window(from_, to, MAX_SUCCESS_DAYS)
    rows = sorted(per_city(key, city, lambda c: _success(conn, since, until, c)), key=lambda u: u.device_id)
    return csv_response(UplinkSuccessOut, rows, "health-uplink-success.csv")
