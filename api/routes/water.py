"""Water figures (analytics/water.py, README "Water"; viewer, within the key's cities): consumption per
city (and per district) and local day, the sites' nights (minimum night flow and leakage), silent meters
and stopped meters, each with a CSV twin.  The per-meter alerts are `GET /water/alerts` (api/routes/alarms.py).

Days are the local days `update_water` stored them under (IOTJX_TIMEZONE); the figures are as the
analytics loop last left them."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

import psycopg
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from analytics import health, water
from api.deps import AppSettings, Conn, Viewer
from api.figures import (CityFilter, Day, cities_for, city_of, csv_response, csv_responses, day_window,
                         page_by_device, per_city, site_codes)
from api.pagination import Page, PageQuery, newest_first
from api.problems import PROBLEM
from api.routes.telemetry import SiteCode

router = APIRouter(tags=["water"])

MAX_DAYS = 366


class _CityDay(BaseModel):
    day: date = Field(description="local day")
    city: int | None = Field(description="division code; null: meters without a site")
    city_name_zh: str | None
    city_name_en: str | None


Meters = Annotated[int, Field(description="meters with a reading that day")]
ConsumptionM3 = Annotated[float, Field(description="sum of the meters' deltas (roll-overs and replacements accounted)")]
ReverseM3 = Annotated[float, Field(description="reverse flow (negative deltas), m³")]


class CityDayOut(_CityDay):
    meters: Meters
    consumption_m3: ConsumptionM3
    reverse_m3: ReverseM3


def _consumption(key, conn: psycopg.Connection, from_: date, to: date, city: int | None) -> list[CityDayOut]:
    since, until = day_window(from_, to, MAX_DAYS)
    rows = per_city(key, city, lambda c: water.consumption_by_city(conn, since, date.fromordinal(until.toordinal() - 1),
                                                                   c))
    rows.sort(key=lambda r: (r.day, r.city_code))
    return [CityDayOut(day=r.day, **city_of(r.city_code), meters=r.meters, consumption_m3=r.consumption_m3,
                       reverse_m3=r.reverse_m3) for r in rows]


FromDay = Annotated[Day, Query(alias="from", description="first local day (YYYY-MM-DD)")]
ToDay = Annotated[Day, Query(description="the day after the last (exclusive); at most 366 days after from")]


@router.get("/water/consumption", response_model=list[CityDayOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Water consumption per city and local day",
            description="The meters' daily consumption (`water_daily`) summed per city and local day in [from, to), "
                        "by day then city. A city-scoped key gets its cities' rows.")
def consumption(key: Viewer, conn: Conn, from_: FromDay, to: ToDay,
                city: CityFilter = None) -> list[CityDayOut]:
    return _consumption(key, conn, from_, to, city)


@router.get("/water/consumption.csv", response_class=StreamingResponse, responses=csv_responses("one line per city and day"),
            summary="Water consumption per city and local day, as CSV (same parameters)")
def consumption_csv(key: Viewer, conn: Conn, from_: FromDay, to: ToDay,
                    city: CityFilter = None) -> StreamingResponse:
    return csv_response(CityDayOut, _consumption(key, conn, from_, to, city), "water-consumption.csv")


class DistrictDayOut(_CityDay):
    district_code: int | None = Field(description="county-level division (GB/T 2260); null: unknown (the site has "
                                                   "no district: an unverified site, or none given) or no site")
    district_name_zh: str | None
    district_name_en: str | None
    meters: Meters
    consumption_m3: ConsumptionM3
    reverse_m3: ReverseM3


def _by_district(key, conn: psycopg.Connection, from_: date, to: date, city: int | None) -> list[DistrictDayOut]:
    since, until = day_window(from_, to, MAX_DAYS)
    last = date.fromordinal(until.toordinal() - 1)
    rows = per_city(key, city, lambda c: water.consumption_by_district(conn, since, last, c))
    rows.sort(key=lambda r: (r.day, r.city_code, r.district_code is None, r.district_code or 0))
    return [DistrictDayOut(day=r.day, **city_of(r.city_code), district_code=r.district_code,
                           district_name_zh=r.district_zh, district_name_en=r.district_en, meters=r.meters,
                           consumption_m3=r.consumption_m3, reverse_m3=r.reverse_m3) for r in rows]


@router.get("/water/consumption/districts", response_model=list[DistrictDayOut],
            responses={403: PROBLEM, 422: PROBLEM}, summary="Water consumption per district (区/县) and local day",
            description="As `/water/consumption`, one level down: the meters' daily consumption summed per city, "
                        "district and local day in [from, to), by day, city, then district (the unknown district "
                        "last). Meters of a site without a district (unverified sites) count in their city's row "
                        "with `district_code` null; a city's districts add up to its `/water/consumption` row. "
                        "A city-scoped key gets its cities' rows.")
def consumption_by_district(key: Viewer, conn: Conn, from_: FromDay, to: ToDay,
                            city: CityFilter = None) -> list[DistrictDayOut]:
    return _by_district(key, conn, from_, to, city)


@router.get("/water/consumption/districts.csv", response_class=StreamingResponse,
            responses=csv_responses("one line per city, district and day"),
            summary="Water consumption per district and local day, as CSV (same parameters)")
def consumption_by_district_csv(key: Viewer, conn: Conn, from_: FromDay, to: ToDay,
                                city: CityFilter = None) -> StreamingResponse:
    return csv_response(DistrictDayOut, _by_district(key, conn, from_, to, city), "water-consumption-districts.csv")


class SiteNightOut(BaseModel):
    site_id: str | None = Field(description="the catalogue code of the site (null: an unverified site)")
    site_name: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    day: date = Field(description="the local day of the night (its window, 02:00–04:00 by default)")
    mnf_m3h: float = Field(description="minimum night flow: the smallest hourly slot of the counted meters' sum, m³/h")
    meters: int = Field(description="meters counted that night")
    leakage_m3h: float | None = Field(description="percentile (P20) of the MNF over the night and those before (7)")
    nights: int | None = Field(description="nights in that percentile")


def _nights_out(conn: psycopg.Connection, nights: list[water.SiteNight]) -> list[SiteNightOut]:
    codes = site_codes(conn, (n.site_id for n in nights))
    return [SiteNightOut(site_id=codes.get(n.site_id), site_name=n.site_name, **city_of(n.city_code), day=n.day,
                         mnf_m3h=n.mnf_m3h, meters=n.meters, leakage_m3h=n.leakage_m3h, nights=n.nights) for n in nights]


@router.get("/water/nights", response_model=list[SiteNightOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="The sites' latest nights, highest leakage first",
            description="Each site's latest night up to `day` (within the leakage window), highest leakage first, then "
                        "MNF; the first `limit`. `day` defaults to today (local).")
def nights(key: Viewer, conn: Conn, settings: AppSettings,
           day: Annotated[Day | None, Query(description="local day (default: today)")] = None,
           city: CityFilter = None,
           limit: Annotated[int, Query(ge=1, le=1000, description="sites returned")] = 20) -> list[SiteNightOut]:
    day = day or datetime.now(settings.tz).date()
    rows = per_city(key, city, lambda c: water.site_nights(conn, day, c, limit,
                                                           leakage_days=settings.water_leakage_days))
    rows.sort(key=lambda s: (-(s.leakage_m3h if s.leakage_m3h is not None else float("-inf")), -s.mnf_m3h, s.site_id))
    return _nights_out(conn, rows[:limit])


def _site_nights(key, conn: psycopg.Connection, site_id: str, from_: date, to: date) -> list[SiteNightOut]:
    since, until = day_window(from_, to, MAX_DAYS)
    row = conn.execute("SELECT site_id, city_code FROM sites WHERE code = %s", (site_id,)).fetchone()
    if row is None or not key.sees_city(row[1]):
        raise HTTPException(404, f"no site {site_id}")
    return _nights_out(conn, water.site_night_series(conn, row[0], since, until))


@router.get("/water/sites/{site_id}/nights", response_model=list[SiteNightOut], responses={404: PROBLEM, 422: PROBLEM},
            summary="A site's nights: minimum night flow and leakage per night",
            description="The site's nights in [from, to) (`water_night`), oldest first; nights without a figure "
                        "(no meter covered the window) absent.")
def site_nights(key: Viewer, conn: Conn, site_id: SiteCode, from_: FromDay,
                to: ToDay) -> list[SiteNightOut]:
    return _site_nights(key, conn, site_id, from_, to)


@router.get("/water/sites/{site_id}/nights.csv", response_class=StreamingResponse,
            responses=csv_responses("one line per night"), summary="A site's nights, as CSV (same parameters)")
def site_nights_csv(key: Viewer, conn: Conn, site_id: SiteCode, from_: FromDay,
                    to: ToDay) -> StreamingResponse:
    return csv_response(SiteNightOut, _site_nights(key, conn, site_id, from_, to), f"water-nights-{site_id}.csv")


class SilentMeterOut(BaseModel):
    device_id: str
    model: str
    network: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    site_name: str | None
    interval_s: int = Field(description="the reporting interval (the device's, else its model's)")
    last_seen: datetime | None = Field(description="its last stored uplink; null: never heard")
    since: datetime = Field(description="last_seen, else installed_at")
    silent_s: float = Field(description="now − since")


def _silent_rows(conn: psycopg.Connection, settings, now, city: int | None, after: str | None = None,
                 limit: int | None = None) -> list[SilentMeterOut]:
    rows = health.silent_page(conn, now, live_factor=settings.live_factor, city=city, family="water", after=after,
                              limit=limit)
    return [SilentMeterOut(device_id=d.device_id, model=d.model, network=d.network, **city_of(d.city_code),
                           site_name=d.site_name, interval_s=d.interval_s, last_seen=d.last_seen, since=d.since,
                           silent_s=d.silent_s) for d in rows]


def _now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]


@router.get("/water/silent-meters", response_model=Page[SilentMeterOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Silent water meters, by device id",
            description="Active water meters that are not live now (README \"Device health\": no stored uplink within "
                        "live_factor × the interval; meters sending only malformed frames are not silent — see "
                        "`/health/report`). Cursor-paginated by device id.")
def silent_meters(key: Viewer, conn: Conn, settings: AppSettings, page: PageQuery,
                  city: CityFilter = None) -> Page[SilentMeterOut]:
    now = _now(conn)
    return page_by_device(key, city, page, lambda c, after, n: _silent_rows(conn, settings, now, c, after, n))


@router.get("/water/silent-meters.csv", response_class=StreamingResponse, responses=csv_responses("one meter a line"),
            summary="Silent water meters, as CSV, longest silent first")
def silent_meters_csv(key: Viewer, conn: Conn, settings: AppSettings, city: CityFilter = None) -> StreamingResponse:
    now = _now(conn)
    rows = sorted(per_city(key, city, lambda c: _silent_rows(conn, settings, now, c)),
                  key=lambda m: (m.since, m.device_id))
    return csv_response(SilentMeterOut, rows, "water-silent-meters.csv")


class StoppedMeterOut(BaseModel):
    alert_id: int
    device_id: str
    stopped_since: datetime = Field(description="measurement time of the reading that opened the stopped alert")
    detail: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    site_id: str | None
    site_name: str | None


_STOPPED = """
    SELECT a.alert_id, a.device_id, a.opened_at, a.detail, s.city_code, s.code, s.name
    FROM water_alerts a LEFT JOIN devices d ON d.device_id = a.device_id LEFT JOIN sites s ON s.site_id = d.site_id
    WHERE a.kind = 'stopped' AND a.closed_at IS NULL
      AND (%(city)s::int IS NULL OR s.city_code = %(city)s)
      AND (%(cities)s::int[] IS NULL OR s.city_code = ANY(%(cities)s))"""


def _stopped_out(r: tuple) -> StoppedMeterOut:
    return StoppedMeterOut(alert_id=r[0], device_id=r[1], stopped_since=r[2], detail=r[3], **city_of(r[4]),
                           site_id=r[5], site_name=r[6])


@router.get("/water/stopped-meters", response_model=Page[StoppedMeterOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Stopped water meters (an open stopped alert), newest first",
            description="Meters whose valve is open and whose register has not risen for IOTJX_WATER_STOPPED_DAYS "
                        "(7) days: the open `stopped` water alerts, newest first; cursor-paginated.")
def stopped_meters(key: Viewer, conn: Conn, page: PageQuery, city: CityFilter = None) -> Page[StoppedMeterOut]:
    cities_for(key, city)
    tail, keyset = newest_first(page, "a.opened_at", "a.alert_id")
    rows = conn.execute(_STOPPED + tail, {"city": city, "cities": None if key.cities is None else list(key.cities),
                                          **keyset}).fetchall()
    return page.of([_stopped_out(r) for r in rows], key=lambda m: (m.stopped_since, m.alert_id))


@router.get("/water/stopped-meters.csv", response_class=StreamingResponse, responses=csv_responses("one meter a line"),
            summary="Stopped water meters, as CSV, newest first")
def stopped_meters_csv(key: Viewer, conn: Conn, city: CityFilter = None) -> StreamingResponse:
    cities_for(key, city)
    rows = conn.execute(_STOPPED + " ORDER BY a.opened_at DESC, a.alert_id DESC",
                        {"city": city, "cities": None if key.cities is None else list(key.cities)}).fetchall()
    return csv_response(StoppedMeterOut, (_stopped_out(r) for r in rows), "water-stopped-meters.csv")
