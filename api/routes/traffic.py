"""Traffic figures (analytics/traffic.py, README "Traffic"; viewer, within the key's cities): lane and
detector buckets (volume by class, occupancy, time- and space-mean speed, flow, density, level of
service, congestion grade) and parking per site and local hour, each with a CSV twin.

Lane buckets are read from the writer's lane × 5-minute rollup (the readings when IOTJX_ROLLUPS is off):
a window selects whole 5-minute buckets by their start, so give bounds on 5-minute edges."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, PrivateAttr

from analytics import traffic
from api.deps import AppSettings, Conn, Viewer
from api.figures import (CityFilter, From, To, Tz, city_of, csv_response, csv_responses, page_of, per_city, site_codes,
                         window)
from api.pagination import Page, PageQuery
from api.problems import PROBLEM
from iotjx.devices import DEVICE_ID, SITE_KINDS

router = APIRouter(tags=["traffic"])

MAX_FLOW_DAYS = 1               # all detectors: one day of buckets a call
MAX_FLOW_DEVICE_DAYS = 31       # one detector
MAX_PARKING_DAYS = 31

Interval = Annotated[Literal["5m", "15m"], Query(description="bucket width")]
WIDTH_S = {"5m": 300, "15m": 900}
Per = Annotated[Literal["lane", "detector"], Query(description="lane: one row per lane; detector: all its lanes")]
Device = Annotated[str | None, Query(pattern=DEVICE_ID.pattern, max_length=64, description="one detector")]


class FlowBucketOut(BaseModel):
    device_id: str
    lane: int | None = Field(description="the lane (channel); null for a detector's row")
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    start: datetime = Field(description="the bucket's local start")
    width_s: int
    frames: int
    lanes: int = Field(description="distinct lanes in the bucket")
    count_a: int = Field(description="vehicles ≥ 12 m")
    count_b: int = Field(description="vehicles 6–12 m")
    count_c: int = Field(description="vehicles < 6 m")
    unclassified: int = Field(description="vehicles of frames that give only a total")
    volume: int
    occupancy_pct: float | None
    time_mean_kmh: float | None = Field(description="Σ n·v / Σ n")
    space_mean_kmh: float | None = Field(description="Σ n / Σ (n / v)")
    flow_vph: float = Field(description="volume × 3600 / width")
    density_vpkm: float | None
    density_vpkmpl: float | None = Field(description="per lane")
    los: str | None = Field(description="HCM level of service by density (A–F)")
    grade: str | None = Field(description="congestion grade (GB/T 33171 speed bands): smooth … severe")
    road_class: str


def _flow(key, conn: psycopg.Connection, settings, from_: datetime, to: datetime, width: int, per: str,
          city: int | None, device: str | None) -> list[FlowBucketOut]:
    since, until = window(from_, to, MAX_FLOW_DEVICE_DAYS if device else MAX_FLOW_DAYS)
    compute = traffic.flow_buckets_from_rollups if settings.rollups else traffic.flow_buckets
    rows = per_city(key, city, lambda c: compute(conn, since, until, width_s=width, tz=settings.tz, per=per, city=c,
                                                 device_ids=None if device is None else [device],
                                                 bands=settings.speed_bands))
    cities = dict(conn.execute("""SELECT d.device_id, s.city_code FROM devices d LEFT JOIN sites s USING (site_id)
                                  WHERE d.device_id = ANY(%s)""", (sorted({b.device_id for b in rows}),)).fetchall())
    return [FlowBucketOut(device_id=b.device_id, lane=b.channel, **city_of(cities.get(b.device_id)),
                          start=b.start.astimezone(settings.tz), width_s=b.width_s, frames=b.frames, lanes=b.lanes,
                          count_a=b.count_a, count_b=b.count_b, count_c=b.count_c, unclassified=b.unclassified,
                          volume=b.volume, occupancy_pct=b.occupancy_pct, time_mean_kmh=b.time_mean_kmh,
                          space_mean_kmh=b.space_mean_kmh, flow_vph=b.flow_vph, density_vpkm=b.density_vpkm,
                          density_vpkmpl=b.density_vpkmpl, los=b.los, grade=b.grade, road_class=b.road_class)
            for b in rows]


def _flow_key(b: FlowBucketOut) -> tuple:
    return (b.device_id, -1 if b.lane is None else b.lane, b.start)


_FLOW_DOC = (f"Per lane or detector and local bucket over [from, to) (at most {MAX_FLOW_DAYS} day; "
             f"{MAX_FLOW_DEVICE_DAYS} days for one `device`), by device, lane, start. Bounds on 5-minute edges.")


@router.get("/traffic/flow", response_model=Page[FlowBucketOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Traffic buckets: volume, occupancy, speeds, density, level of service, congestion grade",
            description=_FLOW_DOC + " Cursor-paginated.")
def flow(key: Viewer, conn: Conn, settings: AppSettings, page: PageQuery, from_: From, to: To, interval: Interval = "15m",
         per: Per = "lane", city: CityFilter = None, device: Device = None) -> Page[FlowBucketOut]:
    rows = _flow(key, conn, settings, from_, to, WIDTH_S[interval], per, city, device)
    return page_of(rows, page, _flow_key, (str, int, datetime))


@router.get("/traffic/flow.csv", response_class=StreamingResponse, responses=csv_responses("one bucket a line"),
            summary="Traffic buckets, as CSV (same parameters)", description=_FLOW_DOC)
def flow_csv(key: Viewer, conn: Conn, settings: AppSettings, from_: From, to: To, interval: Interval = "15m",
             per: Per = "lane", city: CityFilter = None, device: Device = None) -> StreamingResponse:
    rows = sorted(_flow(key, conn, settings, from_, to, WIDTH_S[interval], per, city, device), key=_flow_key)
    return csv_response(FlowBucketOut, rows, "traffic-flow.csv")


class ParkingHourOut(BaseModel):
    site_id: str | None = Field(description="the catalogue code of the site (null: an unverified site)")
    site_name: str
    site_kind: str = Field(description="parking_lot, scenic_spot, …")
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    hour: datetime = Field(description="the local hour's start")
    spaces: int = Field(description="the site's parking sensors (active and installed, or reporting)")
    known_s: float = Field(description="sensor-seconds with a known state")
    occupied_s: float
    occupancy: float | None = Field(description="occupied_s / known_s")
    arrivals: int
    turnover: float | None = Field(description="arrivals / spaces")
    stays_ended: int
    mean_dwell_s: float | None = Field(description="over the stays that ended in the hour")
    overstays: int = Field(description="of those, longer than IOTJX_TRAFFIC_OVERSTAY_S")
    _site_key: int = PrivateAttr(0)          # the site's row id: the list's order, not shown

    def order(self) -> tuple[int, datetime]:
        return self._site_key, self.hour


Kind = Annotated[Literal[SITE_KINDS] | None, Query(description="only sites of this kind")]  # type: ignore[valid-type]


def _parking(key, conn: psycopg.Connection, settings, from_: datetime, to: datetime, tz: str | None,
             city: int | None, kind: str | None) -> list[ParkingHourOut]:
    since, until = window(from_, to, MAX_PARKING_DAYS)
    zone = ZoneInfo(tz) if tz else settings.tz
    rows = per_city(key, city, lambda c: traffic.parking_hours(conn, since, until, tz=zone, city=c,
                                                               overstay_s=settings.traffic_overstay_s,
                                                               hold_factor=settings.traffic_hold_factor))
    rows = [p for p in rows if kind is None or p.site_kind == kind]
    codes = site_codes(conn, (p.site_id for p in rows))
    out = []
    for p in rows:
        row = ParkingHourOut(
            site_id=codes.get(p.site_id), site_name=p.site_name, site_kind=p.site_kind, **city_of(p.city_code),
            hour=p.hour.astimezone(zone), spaces=p.spaces, known_s=p.known_s, occupied_s=p.occupied_s,
            occupancy=p.occupancy, arrivals=p.arrivals, turnover=p.turnover, stays_ended=p.stays_ended,
            mean_dwell_s=p.mean_dwell_s, overstays=p.overstays)
        row._site_key = p.site_id
        out.append(row)
    return out


_PARKING_DOC = (f"Occupancy, arrivals, turnover, mean dwell and overstays per site with parking sensors (a lot, a "
                f"scenic spot's bays) and local hour over [from, to) (at most {MAX_PARKING_DAYS} days; hour-aligned "
                f"bounds), by site then hour.")


@router.get("/traffic/parking", response_model=Page[ParkingHourOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Parking per site and local hour", description=_PARKING_DOC + " Cursor-paginated.")
def parking(key: Viewer, conn: Conn, settings: AppSettings, page: PageQuery, from_: From, to: To, tz: Tz = None,
            city: CityFilter = None, kind: Kind = None) -> Page[ParkingHourOut]:
    rows = _parking(key, conn, settings, from_, to, tz, city, kind)
    return page_of(rows, page, ParkingHourOut.order, (int, datetime))


@router.get("/traffic/parking.csv", response_class=StreamingResponse, responses=csv_responses("one site-hour a line"),
            summary="Parking per site and local hour, as CSV (same parameters)", description=_PARKING_DOC)
def parking_csv(key: Viewer, conn: Conn, settings: AppSettings, from_: From, to: To, tz: Tz = None,
                city: CityFilter = None, kind: Kind = None) -> StreamingResponse:
    rows = sorted(_parking(key, conn, settings, from_, to, tz, city, kind), key=ParkingHourOut.order)
    return csv_response(ParkingHourOut, rows, "traffic-parking.csv")
