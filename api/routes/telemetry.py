"""Telemetry of one device or one site: fields per local interval with one aggregate (viewer), read from
the writer's rollups where they serve, else from the readings (analytics/telemetry.py; README
"Telemetry").  The answer is streamed: no cap on the number of intervals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel

from analytics.telemetry import AGGS, INTERVALS, TelemetryError, plan, rows
from api.deps import AppSettings, DeviceId, Pool, Viewer, device_city
from api.problems import PROBLEM
from iotjx.sites import SITE_CODE

router = APIRouter(tags=["telemetry"])

MAX_FIELDS = 16


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("give a time zone offset (e.g. 2026-12-01T00:00:00+08:00)")
    if not 2000 <= value.year <= 2100:      # the kernels' bucket arithmetic takes epoch seconds of 1900-2200
        raise ValueError("a time from 2000 to 2100")
    return value


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value[:64]!r} is not an IANA time zone such as Asia/Shanghai") from None
    return value


def _fields(value: str | None) -> str | None:
    if value is None:
        return None
    names = [f.strip() for f in value.split(",") if f.strip()]
    if not names or len(names) > MAX_FIELDS or any(not f.replace("_", "").isalnum() or not f.isascii() for f in names):
        raise ValueError(f"a comma-separated list of 1-{MAX_FIELDS} field names, e.g. flow_m3,battery_low")
    return ",".join(names)


Aware = Annotated[datetime, AfterValidator(_aware)]
Interval = Literal[tuple(INTERVALS)]        # type: ignore[valid-type]
Agg = Literal[tuple(AGGS)]                  # type: ignore[valid-type]
SiteCode = Annotated[str, Path(pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                               description="the catalogue site id")]


class Point(BaseModel):
    t: datetime                                  # the interval's local start
    values: dict[str, float | None]              # field -> aggregate (None: no value in the interval)


class TelemetryOut(BaseModel):
    device_id: str | None = None
    site_id: str | None = None
    fields: list[str]
    interval: str
    agg: str
    tz: str
    sources: dict[str, str]                      # field -> "rollup:<table>" or "readings:<table>"
    points: list[Point]


_DESCRIPTION = ("Fields per local interval with one aggregate. `fields`: comma-separated (default: the family "
                "table's); `from`/`to` with an offset, [from, to); `interval` 5m 15m 1h 1d 1w 1mo; `agg` sum avg min "
                "max count last; `tz` an IANA zone (default IOTJX_TIMEZONE). Served from a rollup when one tiles the "
                "interval and keeps the aggregate (and `tz` is the writer's zone), else from the readings by "
                "measurement time; `sources` says which. `source=readings` forces the readings. Streamed, "
                "no cap on the number of intervals.")


def _params(fields, from_, to, interval, agg, tz, source):
    return {"fields": [] if fields is None else fields.split(","), "since": from_, "until": to, "interval": interval,
            "agg": agg, "tz": tz, "source": source}


@router.get("/devices/{device_id}/telemetry", response_model=TelemetryOut, summary="A device's telemetry series",
            description=_DESCRIPTION, responses={404: PROBLEM, 422: PROBLEM})
def device_telemetry(key: Viewer, device_id: DeviceId, pool: Pool, settings: AppSettings,
                     from_: Annotated[Aware, Query(alias="from")], to: Annotated[Aware, Query()],
                     interval: Annotated[Interval, Query()] = "1h", agg: Annotated[Agg, Query()] = "avg",
                     fields: Annotated[str | None, Query(max_length=512), AfterValidator(_fields)] = None,
                     tz: Annotated[str | None, Query(max_length=64), AfterValidator(lambda v: v and _zone(v))] = None,
                     source: Annotated[Literal["auto", "readings"], Query()] = "auto") -> StreamingResponse:
    with pool.connection() as conn:             # returned before the stream takes its own (see _answer)
        device_city(conn, key, device_id)
        dkey, family = conn.execute("""SELECT d.device_key, coalesce(m.family, m.pilot) FROM devices d
                                       JOIN device_models m USING (model) WHERE d.device_id = %s""",
                                    (device_id,)).fetchone()
    p = _params(fields, from_, to, interval, agg, tz or settings.timezone, source)
    return _answer(pool, settings, "device", dkey, [family], p, {"device_id": device_id})


@router.get("/sites/{site_id}/telemetry", response_model=TelemetryOut, summary="A site's telemetry series",
            description=_DESCRIPTION + " A site's series aggregates its devices' readings.",
            responses={404: PROBLEM, 422: PROBLEM})
def site_telemetry(key: Viewer, site_id: SiteCode, pool: Pool, settings: AppSettings,
                   from_: Annotated[Aware, Query(alias="from")], to: Annotated[Aware, Query()],
                   interval: Annotated[Interval, Query()] = "1h", agg: Annotated[Agg, Query()] = "avg",
                   fields: Annotated[str | None, Query(max_length=512), AfterValidator(_fields)] = None,
                   tz: Annotated[str | None, Query(max_length=64), AfterValidator(lambda v: v and _zone(v))] = None,
                   source: Annotated[Literal["auto", "readings"], Query()] = "auto") -> StreamingResponse:
    with pool.connection() as conn:             # returned before the stream takes its own (see _answer)
        row = conn.execute("SELECT site_id, city_code FROM sites WHERE code = %s", (site_id,)).fetchone()
        if row is None or not key.sees_city(row[1]):
            raise HTTPException(404, f"no site {site_id}")
        families = [f for f, in conn.execute("""SELECT DISTINCT coalesce(m.family, m.pilot) FROM devices d
                                                JOIN device_models m USING (model) WHERE d.site_id = %s ORDER BY 1""",
                                             (row[0],))] or ["water"]
    p = _params(fields, from_, to, interval, agg, tz or settings.timezone, source)
    return _answer(pool, settings, "site", row[0], families, p, {"site_id": site_id})


def _answer(pool, settings, target: str, key: int, families: list[str], p: dict, who: dict) -> StreamingResponse:
    """The streamed answer.  Its body takes a pool connection of its own while it is read; the route holds
    none by then (a `Conn` dependency would be held until the response is sent: with as many telemetry
    requests in flight as the pool has connections, each would wait for a second one until the pool's
    timeout — benchmarks/api_latency.py at 16 concurrent requests)."""
    zone = ZoneInfo(p["tz"])
    if p["until"] <= p["since"]:
        raise HTTPException(422, "to must be after from")
    try:
        series = plan(target=target, key=key, families=families, fields=p["fields"], interval=p["interval"],
                      agg=p["agg"], tz=zone, rollup_tz=settings.tz if settings.rollups else None, source=p["source"])
    except TelemetryError as exc:
        raise HTTPException(422, str(exc)) from None
    head = {**who, "fields": list(series.fields), "interval": p["interval"], "agg": p["agg"], "tz": p["tz"],
            "sources": series.sources}

    def body() -> Iterator[bytes]:
        text = json.dumps(head, ensure_ascii=False)
        yield (text[:-1] + ',"points":[').encode()
        first = True
        buffered: list[str] = []
        with pool.connection() as conn:                # the stream's own: held while it is read
            for start, values in rows(conn, series, p["since"], p["until"], zone):
                buffered.append(("" if first else ",") + json.dumps({"t": start.isoformat(), "values": values}))
                first = False
                if len(buffered) >= 500:
                    yield "".join(buffered).encode()
                    buffered.clear()
        yield ("".join(buffered) + "]}").encode()

    return StreamingResponse(body(), media_type="application/json")
