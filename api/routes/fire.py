"""Fire figures beside the alarms (api/routes/alarms.py): the offline fire devices now
(analytics.fire.offline_devices; viewer, within the key's cities), JSON and CSV."""

from __future__ import annotations

from datetime import datetime

import psycopg
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from analytics import fire
from api.deps import AppSettings, Conn, Viewer
from api.figures import CityFilter, DeviceWhere, city_of, csv_response, csv_responses, page_by_device, per_city
from api.pagination import Page, PageQuery
from api.problems import PROBLEM

router = APIRouter(tags=["fire"])


class OfflineDeviceOut(DeviceWhere):
    last_seen: datetime | None = Field(description="its last stored uplink; null: never heard since installation")
    interval_s: int = Field(description="the heartbeat (reporting) interval, the device's else its model's")
    silent_s: float = Field(description="now − (last_seen or installed_at)")


def _offline(conn: psycopg.Connection, settings, now: datetime, city: int | None, after: str | None = None,
             limit: int | None = None) -> list[OfflineDeviceOut]:
    rows = fire.offline_devices(conn, now, city, offline_factor=settings.fire_offline_factor, after=after, limit=limit)
    return [OfflineDeviceOut(device_id=d.device_id, model=d.model, **city_of(d.city_code), site_name=d.site_name,
                             last_seen=d.last_seen, interval_s=d.interval_s, silent_s=d.silent_s) for d in rows]


def _now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]


_DOC = ("Active fire devices silent for more than IOTJX_FIRE_OFFLINE_FACTOR (2) × their heartbeat interval now "
        "(README \"Fire alarms\"; the UITD's 300 s heartbeat: offline after 10 min).")


@router.get("/fire/offline", response_model=Page[OfflineDeviceOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Offline fire devices, by device id", description=_DOC + " Cursor-paginated by device id.")
def offline(key: Viewer, conn: Conn, settings: AppSettings, page: PageQuery,
            city: CityFilter = None) -> Page[OfflineDeviceOut]:
    now = _now(conn)
    return page_by_device(key, city, page, lambda c, after, n: _offline(conn, settings, now, c, after, n))


@router.get("/fire/offline.csv", response_class=StreamingResponse, responses=csv_responses("one device a line"),
            summary="Offline fire devices, as CSV, longest silent first", description=_DOC)
def offline_csv(key: Viewer, conn: Conn, settings: AppSettings, city: CityFilter = None) -> StreamingResponse:
    now = _now(conn)
    rows = sorted(per_city(key, city, lambda c: _offline(conn, settings, now, c)),
                  key=lambda d: (-d.silent_s, d.device_id))
    return csv_response(OfflineDeviceOut, rows, "fire-offline.csv")
