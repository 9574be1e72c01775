"""Telemetry series of one device or one site: fields × local intervals × one aggregate, read from the
writer's rollups where they serve the question, from the readings otherwise (README "Telemetry").

* **Intervals** `5m`, `15m`, `1h`, `1d`, `1w` (local weeks from Monday), `1mo` (local months), in a
  time zone (`tz`, default the writer's IOTJX_TIMEZONE); an interval starts on the local clock.  No cap
  on how many intervals a series has: the rows are read with a server-side cursor.
* **Aggregates** `sum`, `avg`, `min`, `max`, `count` (readings with the field), `last` (the newest by
  measurement time).  An average is Σ sum / Σ n over the parts, never an average of averages.
* **Fields** are the numeric columns of the device's family table (`FIELDS`, booleans as 1/0) and its
  radio figures; a site's are those of its devices' families.
* **Source**: a rollup serves when its level's buckets tile the interval (a device: the day levels for
  1d/1w/1mo, the lane × 5-minute level for a detector's sums at any interval; a site: the site ×
  15-minute levels from 15m up), it keeps the aggregate asked (min/max/last are not kept for every
  value), and `tz` is the writer's zone; else the readings, bucketed by measurement time (README
  "Rollups": the device's plausible clock, else the receive time).  A rollup bucket counts for the
  interval its start is in; a readings row for the one its measurement time is in.  `source="readings"`
  forces the readings (to audit a rollup)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from zoneinfo import ZoneInfo

import psycopg

from analytics.rollups import LEVELS, MEASUREMENT_AHEAD_S, MEASUREMENT_BEHIND_S, Level
from analytics.water import measured_sql

INTERVALS: dict[str, int | str] = {"5m": 300, "15m": 900, "1h": 3600, "1d": 86400, "1w": "week", "1mo": "month"}
AGGS = ("sum", "avg", "min", "max", "count", "last")
_PLAUSIBLE = (f"BETWEEN r.time - interval '{MEASUREMENT_BEHIND_S} seconds' "
              f"AND r.time + interval '{MEASUREMENT_AHEAD_S} seconds'")
# Per readings table: the measurement time, and each field as SQL over a row `r`.
SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "water_readings": (measured_sql("r"), {
        "flow_m3": "r.flow_m3", "settlement_flow_m3": "r.settlement_flow_m3", "battery_low": "r.battery_low::int",
        "valve_closed": "CASE r.valve WHEN 'closed' THEN 1 WHEN 'open' THEN 0 WHEN 'abnormal' THEN 0 END"}),
    "fire_events": (f"CASE WHEN coalesce(r.event_time, r.sent_at) {_PLAUSIBLE} THEN coalesce(r.event_time, r.sent_at) "
                    "ELSE r.time END", {"fire_alarm": "r.fire_alarm::int", "fault": "r.fault::int",
                                        "analog_value": "r.analog_value"}),
    "traffic_flow": ("r.time", {
        "count_a": "r.count_a", "count_b": "r.count_b", "count_c": "r.count_c",
        "occupancy_pct": "r.occupancy_pct", "speed_kmh": "r.speed_kmh", "headway_s": "r.headway_s"}),
    "parking_events": ("r.time", {"occupied": "r.occupied::int", "occupancy_changed": "r.occupancy_changed::int",
                                  "battery_mv": "r.battery_mv", "temperature_c": "r.temperature_c"}),
    "radio_readings": ("r.time", {"rsrp_dbm": "r.rsrp_dbm", "sinr_db": "r.sinr_db", "rsrq_db": "r.rsrq_db",
                                  "ecl": "r.ecl"}),
}
FAMILY_TABLES = {"water": "water_readings", "fire": "fire_events", "traffic": "traffic_flow",
                 "parking": "parking_events"}
FIELDS: dict[str, tuple[str, ...]] = {table: tuple(cols) for table, (_, cols) in SOURCES.items()}


class TelemetryError(ValueError):
    """A question the series cannot answer (an unknown field, interval or aggregate): a 422."""


@dataclass(frozen=True, slots=True)
class Query:
    """One statement of a series: its source, and SQL giving (bucket start, value per field) ordered."""

    source: str               # "rollup:<table>" or "readings:<table>"
    fields: tuple[str, ...]
    sql: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Series:
    fields: tuple[str, ...]
    sources: dict[str, str]   # field -> "rollup:<table>" / "readings:<table>"
    queries: tuple[Query, ...]


def fields_of(families: Sequence[str]) -> tuple[str, ...]:
    """The fields a device (or a site's devices) of these families can be asked for."""
    out: list[str] = []
    for family in families:
        table = FAMILY_TABLES.get(family)
        if table:
            out += [f for f in FIELDS[table] if f not in out]
    return tuple(out) + tuple(f for f in FIELDS["radio_readings"] if f not in out)


def plan(*, target: str, key: int, families: Sequence[str], fields: Sequence[str], interval: str, agg: str,
         tz: ZoneInfo, rollup_tz: ZoneInfo | None, source: str = "auto") -> Series:
    """The statements of a series of `target` ("device": `key` is its device_key; "site": its site_id)."""
    if interval not in INTERVALS:
        raise TelemetryError(f"interval must be one of {', '.join(INTERVALS)}, not {interval!r}")
    if agg not in AGGS:
        raise TelemetryError(f"agg must be one of {', '.join(AGGS)}, not {agg!r}")
    if source not in ("auto", "readings"):
        raise TelemetryError(f"source must be auto or readings, not {source!r}")
    known = fields_of(families)
    fields = tuple(dict.fromkeys(fields)) or tuple(f for f in known if f in FIELDS[_table_of(families, known[0])])
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise TelemetryError(f"unknown field(s) {', '.join(map(repr, unknown))}: this {target} has "
                             f"{', '.join(known) or 'none'}")
    use_rollups = source == "auto" and rollup_tz is not None and tz.key == rollup_tz.key
    # Each field from the rollup that serves it (else its readings); fields of one source in one statement.
    groups: dict[tuple[str, str | None], list[str]] = {}
    levels: dict[str, Level] = {}
    for f in fields:
        table = _table_of(families, f)
        level = _level_for(target, table, [f], interval, agg) if use_rollups else None
        if level is not None:
            levels[level.table] = level
        groups.setdefault((table, level.table if level else None), []).append(f)
    queries, sources = [], {}
    for (table, level_table), fs in groups.items():
        q = (_rollup_query(levels[level_table], target, key, fs, interval, agg) if level_table
             else _readings_query(table, target, key, fs, interval, agg))
        queries.append(q)
        sources.update(dict.fromkeys(fs, q.source))
    return Series(fields, sources, tuple(queries))


def rows(conn: psycopg.Connection, series: Series, since: datetime, until: datetime, tz: ZoneInfo,
         chunk: int = 2000) -> Iterator[tuple[datetime, dict[str, float | None]]]:
    """(interval start, {field: value}) in time order, every field of the series (None where a part
    has no value in that interval), read with server-side cursors: memory bounded by `chunk`."""
    if since.tzinfo is None or until.tzinfo is None:
        raise TelemetryError("from and to must be timezone-aware")
    if until <= since:
        raise TelemetryError("to must be after from")

    def stream(k: int, q: Query) -> Iterator[tuple[datetime, dict]]:
        with conn.cursor(name=f"iotjx_telemetry_{k}") as cur:     # server-side: fetched `chunk` at a time
            cur.execute(q.sql, {**q.params, "since": since, "until": until, "tz": tz.key})
            while batch := cur.fetchmany(chunk):
                for r in batch:
                    yield r[0], dict(zip(q.fields, (None if v is None else float(v) for v in r[1:]), strict=True))

    with conn.transaction():                     # a server-side cursor lives in a transaction
        merged = heapq.merge(*(stream(k, q) for k, q in enumerate(series.queries)), key=lambda item: item[0])
        for start, parts in groupby(merged, key=lambda item: item[0]):
            values = dict.fromkeys(series.fields)
            for _, part in parts:
                values.update(part)
            yield start.astimezone(tz), values


def _table_of(families: Sequence[str], f: str) -> str:
    for family in families:
        table = FAMILY_TABLES.get(family)
        if table and f in FIELDS[table]:
            return table
    return "radio_readings"


def _bucket(col: str, interval: str) -> str:
    step = INTERVALS[interval]
    if isinstance(step, int):
        return (f"(date_bin('{step} seconds', {col} AT TIME ZONE %(tz)s, timestamp '2000-01-01') "
                f"AT TIME ZONE %(tz)s)")
    return f"(date_trunc('{step}', {col} AT TIME ZONE %(tz)s) AT TIME ZONE %(tz)s)"


def _level_for(target: str, table: str, fs: Sequence[str], interval: str, agg: str) -> Level | None:
    step = INTERVALS[interval]
    seconds = 86400 if isinstance(step, str) else step
    for level in LEVELS:
        if level.source != table or level.all_time:
            continue
        if target == "device" and level.key not in ("device", "lane"):
            continue
        if target == "site" and level.key != "site":
            continue
        if seconds < level.width_s or seconds % level.width_s:
            continue
        kept = {v.name: v.aggregates for v in level.values}
        need = {"sum": "sum", "avg": "sum", "count": "n", "min": "min", "max": "max", "last": "last"}[agg]
        if level.key == "lane" and agg in ("min", "last"):
            continue          # a detector's min or last is not the min or last of its lanes' values
        if all(f in kept and need in kept[f] for f in fs):
            return level
    return None


def _rollup_query(level: Level, target: str, key: int, fs: Sequence[str], interval: str, agg: str) -> Query:
    col = "site_id" if level.key == "site" else "device_key"
    exprs = []
    for f in fs:
        exprs.append({"sum": f"sum(r.{f}_sum)", "count": f"sum(r.{f}_n)",
                      "avg": f"sum(r.{f}_sum) / nullif(sum(r.{f}_n), 0)", "min": f"min(r.{f}_min)",
                      "max": f"max(r.{f}_max)",
                      "last": f"(array_agg(r.{f}_last ORDER BY r.{f}_last_t DESC) "
                              f"FILTER (WHERE r.{f}_last_t IS NOT NULL))[1]"}[agg])
    sql = (f"SELECT {_bucket('r.bucket', interval)} AS b, {', '.join(exprs)} FROM {level.table} r "
           f"WHERE r.{col} = %(key)s AND r.bucket >= %(since)s AND r.bucket < %(until)s GROUP BY 1 ORDER BY 1")
    return Query(f"rollup:{level.table}", tuple(fs), sql, {"key": key})


def _readings_query(table: str, target: str, key: int, fs: Sequence[str], interval: str, agg: str) -> Query:
    mt, cols = SOURCES[table]
    exprs = []
    for f in fs:
        e = cols[f]
        exprs.append({"sum": f"sum({e})", "count": f"count({e})", "avg": f"avg({e})", "min": f"min({e})",
                      "max": f"max({e})",
                      "last": f"(array_agg({e} ORDER BY {mt} DESC) FILTER (WHERE {e} IS NOT NULL))[1]"}[agg])
    who = "d.device_key = %(key)s" if target == "device" else "d.site_id = %(key)s"
    # The measurement time may precede the receive time by MEASUREMENT_BEHIND_S: the receive-time range
    # (the partition key) is widened by it, the measurement time then selects.
    sql = (f"SELECT {_bucket(mt, interval)} AS b, {', '.join(exprs)} FROM {table} r JOIN devices d USING (device_id) "
           f"WHERE {who} AND r.time >= %(since)s - interval '{MEASUREMENT_AHEAD_S} seconds' "
           f"AND r.time < %(until)s + interval '{MEASUREMENT_BEHIND_S} seconds' "
           f"AND {mt} >= %(since)s AND {mt} < %(until)s GROUP BY 1 ORDER BY 1")
    return Query(f"readings:{table}", tuple(fs), sql, {"key": key})


__all__ = ["AGGS", "FIELDS", "INTERVALS", "Series", "TelemetryError", "fields_of", "plan", "rows"]
