"""Radio coverage (analytics/radio.py, docs/radio.md; viewer, within the key's cities): the summary
per province, city, site and cell from the writer's latest-radio rollup (cheap: what a board reads), and
the full report over a window — groups, the weak devices with their uplink success — with CSV twins.

The province row is the whole province: only a key without a city scope that names no city gets it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from analytics import radio
from api.deps import AppSettings, Conn, Viewer
from api.figures import (CityFilter, DeviceWhere, From, To, cities_for, city_of, csv_response, csv_responses, site_codes,
                         window)
from api.problems import PROBLEM

router = APIRouter(tags=["radio"])

MAX_SUMMARY_DAYS = 366
MAX_REPORT_DAYS = 31            # uplink success reads the raw log (IOTJX_RAW_RETENTION_DAYS, 30)

Level = Annotated[Literal[radio.LEVELS] | None, Query(description="only groups of this level")]  # type: ignore[valid-type]


class RadioGroupOut(BaseModel):
    level: Literal[radio.LEVELS]  # type: ignore[valid-type]
    city: int | None = Field(description="null for the province (and devices without a site)")
    city_name_zh: str | None
    city_name_en: str | None
    site_id: str | None = Field(description="site level: the catalogue code (null: unverified or no site)")
    site_name: str | None
    cell_id: int | None = Field(description="cell level: the cell id")
    with_radio: int = Field(description="devices with an RSRP or SINR in the window")
    without_radio: int | None = Field(description="active devices without one (null at cell level)")
    rsrp_p10: float | None
    rsrp_p50: float | None
    rsrp_p90: float | None
    sinr_p10: float | None
    sinr_p50: float | None
    sinr_p90: float | None
    with_ecl: int
    ecl0_share: float | None
    ecl1_share: float | None
    ecl2_share: float | None
    covered: int
    weak: int
    coverage_rate: float | None = Field(description="covered / with_radio")


class RadioSummaryOut(BaseModel):
    since: datetime
    until: datetime
    rsrp_min_dbm: float
    sinr_min_db: float
    groups: list[RadioGroupOut]


def _groups(conn: psycopg.Connection, groups: list[radio.RadioGroup], whole: bool,
            level: str | None) -> list[RadioGroupOut]:
    codes = site_codes(conn, (g.site_id for g in groups))
    return [RadioGroupOut(level=g.level, **city_of(g.city_code), site_id=codes.get(g.site_id),
                          site_name=g.site_name, cell_id=g.cell_id, with_radio=g.with_radio,
                          without_radio=g.without_radio, rsrp_p10=g.rsrp_p10, rsrp_p50=g.rsrp_p50,
                          rsrp_p90=g.rsrp_p90, sinr_p10=g.sinr_p10, sinr_p50=g.sinr_p50, sinr_p90=g.sinr_p90,
                          with_ecl=g.with_ecl, ecl0_share=g.ecl_share[0], ecl1_share=g.ecl_share[1],
                          ecl2_share=g.ecl_share[2], covered=g.covered, weak=g.weak, coverage_rate=g.coverage_rate)
            for g in groups if (whole or g.level != "province") and (level is None or g.level == level)]


def _summary(key, conn: psycopg.Connection, settings, from_: datetime, city: int | None,
             level: str | None) -> RadioSummaryOut:
    now = datetime.now(UTC)
    since, until = window(from_, now, MAX_SUMMARY_DAYS)
    cities = cities_for(key, city)
    groups = [g for c in cities for g in radio.radio_summary(conn, since, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                                                              sinr_min_db=settings.radio_sinr_min_db, city=c)]
    return RadioSummaryOut(since=since, until=until, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                           sinr_min_db=settings.radio_sinr_min_db, groups=_groups(conn, groups, cities == [None], level))


_SUMMARY_DOC = ("Per province, city, site and cell over [from, now) (at most 366 days): devices with radio, RSRP "
                "and SINR p10/p50/p90, ECL shares, covered and weak, the coverage rate (RSRP ≥ "
                "IOTJX_RADIO_RSRP_MIN_DBM and SINR ≥ IOTJX_RADIO_SINR_MIN_DB), from each device's latest figures "
                "(the writer's rollup_radio_latest).")


@router.get("/radio/summary", response_model=RadioSummaryOut, responses={403: PROBLEM, 422: PROBLEM},
            summary="Radio coverage per province, city, site and cell (from the rollups)", description=_SUMMARY_DOC)
def summary(key: Viewer, conn: Conn, settings: AppSettings, from_: From, city: CityFilter = None,
            level: Level = None) -> RadioSummaryOut:
    return _summary(key, conn, settings, from_, city, level)


@router.get("/radio/summary.csv", response_class=StreamingResponse, responses=csv_responses("one group a line"),
            summary="Radio coverage per province, city, site and cell, as CSV (same parameters)", description=_SUMMARY_DOC)
def summary_csv(key: Viewer, conn: Conn, settings: AppSettings, from_: From, city: CityFilter = None,
                level: Level = None) -> StreamingResponse:
    return csv_response(RadioGroupOut, _summary(key, conn, settings, from_, city, level).groups, "radio-summary.csv")


class WeakDeviceOut(DeviceWhere):
    cell_id: int | None
    rsrp_dbm: float | None
    sinr_db: float | None
    ecl: int | None
    last_at: datetime | None = Field(description="its latest radio reading in the window")
    reason: str = Field(description="rsrp, sinr or rsrp+sinr: the thresholds it fails")
    uplink_success: float | None = Field(description="stored uplinks / expected in the window (README \"Device health\")")


class RadioReportOut(RadioSummaryOut):
    weak_total: int = Field(description="weak devices in the window")
    weak: list[WeakDeviceOut] = Field(description="the weakest first (lowest RSRP), at most weak_limit")


def _report(key, conn: psycopg.Connection, settings, from_: datetime, to: datetime,
            city: int | None) -> tuple[datetime, datetime, list[radio.RadioGroup], list[WeakDeviceOut], bool]:
    since, until = window(from_, to, MAX_REPORT_DAYS)
    if since >= datetime.now(UTC):
        raise HTTPException(422, "from must be in the past")
    cities = cities_for(key, city)
    groups, weak = [], []
    for c in cities:
        r = radio.radio_report(conn, since, until, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                               sinr_min_db=settings.radio_sinr_min_db, city=c, tz=settings.tz, rollups=settings.rollups,
                               weak_success_only=True)
        groups += r.groups
        weak += r.weak
    weak.sort(key=lambda w: (w.rsrp_dbm is None, w.rsrp_dbm if w.rsrp_dbm is not None else 0.0,
                             w.sinr_db if w.sinr_db is not None else 0.0, w.device_id))      # radio.weak_devices' order
    out = [WeakDeviceOut(device_id=w.device_id, model=w.model, **city_of(w.city_code), site_name=w.site_name,
                         cell_id=w.cell_id, rsrp_dbm=w.rsrp_dbm, sinr_db=w.sinr_db, ecl=w.ecl, last_at=w.last_at,
                         reason=w.reason, uplink_success=w.success) for w in weak]
    return since, until, groups, out, cities == [None]


_REPORT_DOC = (f"Radio coverage over [from, to) (at most {MAX_REPORT_DAYS} days): the groups of `/radio/summary` and "
               "the weak devices with their uplink success (analytics.radio.radio_report).")


@router.get("/radio/report", response_model=RadioReportOut, responses={403: PROBLEM, 422: PROBLEM},
            summary="The radio coverage report over a window: groups and weak devices", description=_REPORT_DOC)
def report(key: Viewer, conn: Conn, settings: AppSettings, from_: From, to: To, city: CityFilter = None,
           level: Level = None,
           weak_limit: Annotated[int, Query(ge=0, le=1000, description="weak devices listed")] = 100) -> RadioReportOut:
    since, until, groups, weak, whole = _report(key, conn, settings, from_, to, city)
    return RadioReportOut(since=since, until=until, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                          sinr_min_db=settings.radio_sinr_min_db, groups=_groups(conn, groups, whole, level),
                          weak_total=len(weak), weak=weak[:weak_limit])


@router.get("/radio/weak.csv", response_class=StreamingResponse, responses=csv_responses("one weak device a line"),
            summary="The report's weak devices, all of them, as CSV", description=_REPORT_DOC)
def weak_csv(key: Viewer, conn: Conn, settings: AppSettings, from_: From, to: To,
             city: CityFilter = None) -> StreamingResponse:
    return csv_response(WeakDeviceOut, _report(key, conn, settings, from_, to, city)[3], "radio-weak.csv")

