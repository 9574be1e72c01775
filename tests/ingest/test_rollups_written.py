"""The rollups the writer keeps in each batch's transaction (ingest/aggregates.py), held equal to the same
figures recounted by plain SQL over the readings — on the province-mix scenario (every family, radio
envelopes, duplicates, late and out-of-order uplinks), after duplicates, a rolled-back batch, a late
uplink, and at local midnight.

The recount is written here, apart from the code: each family's measurement time and value expressions
in SQL, buckets with date_trunc/date_bin in Asia/Shanghai, and per rollup column the SQL aggregate its
suffix names (count, sum, min, max, and the newest non-NULL value with its time)."""

from __future__ import annotations

import time as wallclock
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

import decoders
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink

TZ = "Asia/Shanghai"
PLAUSIBLE = "BETWEEN r.time - interval '7 days' AND r.time + interval '300 seconds'"
BUCKET = {"day": f"(date_trunc('day', mt AT TIME ZONE '{TZ}') AT TIME ZONE '{TZ}')",
          "15m": f"(date_bin('15 minutes', mt AT TIME ZONE '{TZ}', timestamp '2000-01-01') AT TIME ZONE '{TZ}')",
          "5m": f"(date_bin('5 minutes', mt AT TIME ZONE '{TZ}', timestamp '2000-01-01') AT TIME ZONE '{TZ}')",
          "all": "timestamptz '1970-01-01 00:00:00+00'"}
_VOLUME = ("(coalesce(count_a, 0) + coalesce(count_b, 0) + coalesce(count_c, 0) + "
           "CASE WHEN count_a IS NULL AND count_b IS NULL AND count_c IS NULL "
           "THEN coalesce(round((extra->>'volume')::numeric), 0) ELSE 0 END)")
# Per readings table: the measurement time, and every value the rollups keep, written as SQL.
SOURCES = {
    "water_readings": (f"CASE WHEN meter_time {PLAUSIBLE} THEN meter_time ELSE r.time END", {
        "flow_m3": "flow_m3", "settlement_flow_m3": "settlement_flow_m3", "battery_low": "battery_low::int",
        "valve_closed": "CASE valve WHEN 'closed' THEN 1 WHEN 'open' THEN 0 WHEN 'abnormal' THEN 0 END"}),
    "fire_events": (f"CASE WHEN coalesce(event_time, sent_at) {PLAUSIBLE} THEN coalesce(event_time, sent_at) "
                    "ELSE r.time END", {"fire_alarm": "fire_alarm::int", "fault": "fault::int"}),
    "traffic_flow": ("r.time", {
        "count_a": "count_a", "count_b": "count_b", "count_c": "count_c",
        "unclassified": f"{_VOLUME} - coalesce(count_a, 0) - coalesce(count_b, 0) - coalesce(count_c, 0)",
        "occupancy_pct": "occupancy_pct",
        "timed_n": f"CASE WHEN {_VOLUME} > 0 AND speed_kmh > 0 THEN {_VOLUME} END",
        "speed_n": f"CASE WHEN {_VOLUME} > 0 AND speed_kmh > 0 THEN {_VOLUME} * speed_kmh END",
        "n_per_speed": f"CASE WHEN {_VOLUME} > 0 AND speed_kmh > 0 THEN {_VOLUME} / speed_kmh END"}),
    "parking_events": ("r.time", {"occupied": "occupied::int", "occupancy_changed": "occupancy_changed::int",
                                  "battery_mv": "battery_mv"}),
    "radio_readings": ("r.time", {"rsrp_dbm": "rsrp_dbm", "sinr_db": "sinr_db", "rsrq_db": "rsrq_db", "ecl": "ecl",
                                  "cell_id": "cell_id", "pci": "pci",
                                  "ecl_0": "(ecl = 0)::int", "ecl_1": "(ecl = 1)::int", "ecl_2": "(ecl = 2)::int"}),
}
WHERE: dict[str, str] = {}
# table -> (readings table, key expressions (name, SQL), bucket)
TABLES = {
    "rollup_water_day": ("water_readings", [("device_key", "d.device_key")], "day"),
    "rollup_water_site_15m": ("water_readings", [("site_id", "d.site_id")], "15m"),
    "rollup_fire_day": ("fire_events", [("device_key", "d.device_key")], "day"),
    "rollup_fire_site_15m": ("fire_events", [("site_id", "d.site_id")], "15m"),
    "rollup_traffic_day": ("traffic_flow", [("device_key", "d.device_key")], "day"),
    "rollup_traffic_lane_5m": ("traffic_flow", [("device_key", "d.device_key"), ("lane", "coalesce(channel, 0)")], "5m"),
    "rollup_parking_day": ("parking_events", [("device_key", "d.device_key")], "day"),
    "rollup_parking_site_15m": ("parking_events", [("site_id", "d.site_id")], "15m"),
    "rollup_radio_day": ("radio_readings", [("device_key", "d.device_key")], "day"),
    "rollup_radio_cell_day": ("radio_readings", [("cell_id", "r.cell_id")], "day"),
    "rollup_radio_latest": ("radio_readings", [("device_key", "d.device_key")], "all"),
}


def _columns(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                       "ORDER BY ordinal_position", (table,))]


def _recount_sql(conn, table: str) -> tuple[str, list[str]]:
    source, keys, bucket = TABLES[table]
    mt, values = SOURCES[source]
    cols = [c for c in _columns(conn, table) if c not in {k for k, _ in keys} | {"bucket"}]
    inner = ", ".join([f"{expr} AS {name}" for name, expr in keys] + [f"{mt} AS mt"]
                      + [f"({expr})::float8 AS v_{name}" for name, expr in values.items()])
    aggs = []
    for c in cols:
        if c == "count":
            aggs.append("count(*)")
            continue
        name, agg = c.rsplit("_", 1) if not c.endswith("_last_t") else (c[:-7], "last_t")
        v = f"v_{name}"
        aggs.append({"n": f"count({v})", "sum": f"coalesce(sum({v}), 0)", "min": f"min({v})", "max": f"max({v})",
                     "last": f"(array_agg({v} ORDER BY mt DESC) FILTER (WHERE {v} IS NOT NULL))[1]",
                     "last_t": f"max(mt) FILTER (WHERE {v} IS NOT NULL)"}[agg])
    key_names = [k for k, _ in keys]
    where = " AND ".join(f"{k} IS NOT NULL" for k in key_names)
    sql = (f"WITH x AS (SELECT {inner} FROM {source} r JOIN devices d USING (device_id) "
           f"WHERE {WHERE.get(source, 'true')}) "
           f"SELECT {', '.join(key_names)}, {BUCKET[bucket]} AS bucket, {', '.join(aggs)} FROM x WHERE {where} "
           f"GROUP BY 1{''.join(f', {i + 2}' for i in range(len(key_names)))} ORDER BY 1, 2"
           + (", 3" if len(key_names) > 1 else ""))
    return sql, key_names + ["bucket"] + cols


def _ties(conn, table: str) -> set[tuple]:
    """(keys…, bucket) groups where two rows share the newest measurement time: `last` is then either."""
    source, keys, bucket = TABLES[table]
    mt, _ = SOURCES[source]
    inner = ", ".join([f"{expr} AS {name}" for name, expr in keys] + [f"{mt} AS mt"])
    n = len(keys)
    sql = (f"WITH x AS (SELECT {inner} FROM {source} r JOIN devices d USING (device_id) "
           f"WHERE {WHERE.get(source, 'true')}), "
           f"g AS (SELECT {', '.join(k for k, _ in keys)}, {BUCKET[bucket]} AS bucket, mt FROM x) "
           f"SELECT * FROM g GROUP BY {', '.join(str(i + 1) for i in range(n + 2))} HAVING count(*) > 1")
    return {tuple(r[:n + 1]) for r in conn.execute(sql)}


def assert_rollups_equal_recount(conn, *, expect_rows: bool = True) -> dict[str, int]:
    """Every rollup table equals the plain-SQL recount over the readings; returns rows per table."""
    sizes = {}
    for table in TABLES:
        sql, names = _recount_sql(conn, table)
        want = conn.execute(sql).fetchall()
        got = conn.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY 1, 2"
                           + (", 3" if names[1] != "bucket" else "")).fetchall()
        ties = _ties(conn, table)
        k = names.index("bucket") + 1
        assert [r[:k] for r in got] == [r[:k] for r in want], f"{table}: groups differ"
        for g, w in zip(got, want, strict=True):
            for name, a, b in zip(names[k:], g[k:], w[k:], strict=True):
                if name.endswith(("_last", "_last_t")) and tuple(g[:k]) in ties:
                    continue
                if isinstance(b, float) and a is not None:
                    assert a == pytest.approx(b, rel=1e-9, abs=1e-6), (table, g[:k], name)
                else:
                    assert a == b, (table, g[:k], name, a, b)
        sizes[table] = len(got)
    if expect_rows:
        empty = [t for t, n in sizes.items() if n == 0]
        assert not empty, f"no rows in {empty}"
    return sizes


def _snapshot(conn) -> dict[str, set[tuple]]:
    return {t: set(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


def _province_mix(db_url: str, days: float = 2.0, scale: float = 0.004):
    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    now = wallclock.time()
    base = load_scenario("province-mix").scaled(scale)
    fleets = tuple(replace(f, behaviour=replace(f.behaviour, duplicate=0.03, late=0.03, corrupt=0.01))
                   for f in base.fleets)
    scenario = replace(base, fleets=fleets, start=now - days * 86400 - 600, duration_s=days * 86400)
    sim = Simulation(scenario)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, sim.device_records)
    records = [r for r in sim.records() if r.t <= now]
    return [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
            for r in records]


def test_province_mix_rollups_equal_the_sql_recount_through_duplicates_and_late_uplinks(db_url):
    uplinks = _province_mix(db_url)
    families = {u.device_id for u in uplinks}
    assert len(families) > 50
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    half = len(uplinks) // 2
    pipeline.process(uplinks[:half])
    pipeline.process(uplinks[half:])
    with psycopg.connect(db_url) as conn:
        sizes = assert_rollups_equal_recount(conn)
        before = _snapshot(conn)
    # The last 20 hours again (inside the dedup window): every uplink is a duplicate, no rollup moves.
    again = [u for u in uplinks if u.received_at > wallclock.time() - 20 * 3600]
    seen = pipeline.counters["duplicate"]
    pipeline.process(again)
    assert len(again) > 100 and pipeline.counters["duplicate"] - seen == len(again)
    with psycopg.connect(db_url) as conn:
        assert _snapshot(conn) == before
        assert sizes["rollup_traffic_lane_5m"] > sizes["rollup_traffic_day"]
        # the radio of the carriers' envelopes is rolled up per cell
        assert conn.execute("SELECT sum(count) FROM rollup_radio_cell_day").fetchone()[0] > 0


def test_rollup_series_merges_buckets_as_the_readings_sum(db_url):
    """`rollup_series` of a site's 15-minute parking buckets merged to local hours and days equals the
    readings counted per local hour and day in SQL; a lane's 5-minute buckets merged to 15 minutes too."""
    from analytics.rollups import rollup_series

    # 30 hours: whatever the hour, a local midnight with at least 3 hours on each side (one day of data
    # ending ten minutes before a run just after local midnight had all of a site's events on one day)
    uplinks = _province_mix(db_url, days=1.25, scale=0.003)
    Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))).process(uplinks)
    tz = ZoneInfo(TZ)
    since, until = datetime.now(tz) - timedelta(days=3), datetime.now(tz) + timedelta(hours=1)
    with psycopg.connect(db_url) as conn:
        site = conn.execute("SELECT site_id FROM rollup_parking_site_15m GROUP BY 1 ORDER BY sum(count) DESC LIMIT 1"
                            ).fetchone()[0]
        for width, unit in ((3600, "hour"), (86400, "day")):
            want = conn.execute(f"""
                SELECT date_trunc('{unit}', r.time AT TIME ZONE '{TZ}') AT TIME ZONE '{TZ}' AS b, count(*),
                       count(occupied), coalesce(sum(occupied::int), 0)
                  FROM parking_events r JOIN devices d USING (device_id) WHERE d.site_id = %s
                 GROUP BY 1 ORDER BY 1""", (site,)).fetchall()
            got = [(b.start, b.count, b.values["occupied"]["n"], b.values["occupied"]["sum"])
                   for b in rollup_series(conn, "rollup_parking_site_15m", {"site_id": site}, since, until,
                                          width_s=width)]
            assert got == want and len(got) > 1
        key, lane = conn.execute("SELECT device_key, lane FROM rollup_traffic_lane_5m GROUP BY 1, 2 "
                                 "ORDER BY count(*) DESC LIMIT 1").fetchone()
        quarter = rollup_series(conn, "rollup_traffic_lane_5m", {"device_key": key, "lane": lane}, since, until,
                                width_s=900)
        want = conn.execute(f"""
            SELECT {BUCKET['15m'].replace('mt', 'r.time')}, count(*), max(occupancy_pct)
              FROM traffic_flow r JOIN devices d USING (device_id)
             WHERE d.device_key = %s AND coalesce(channel, 0) = %s GROUP BY 1 ORDER BY 1""", (key, lane)).fetchall()
        assert [(b.start, b.count, b.values["occupancy_pct"]["max"]) for b in quarter] == want
        with pytest.raises(ValueError, match="keyed by device_key, lane"):
            rollup_series(conn, "rollup_traffic_lane_5m", {"device_key": key}, since, until)
        with pytest.raises(ValueError, match="multiple of"):
            rollup_series(conn, "rollup_water_site_15m", {"site_id": site}, since, until, width_s=600)


def _meter(conn, device_id: str = "rollup-meter") -> None:
    register_devices(conn, [DeviceRecord(device_id=device_id, model="cjt188-nb-water-std", network="nbiot",
                                         city="Yingtan", site_kind="residential", site_name="龙岗小区",
                                         installed_at=datetime.now(UTC) - timedelta(days=20))])


def _water(at: datetime, m3: float, address: str = "00000000001234") -> bytes:
    return decoders.encode("cjt188", {"meter_address": address, "flow_m3": m3, "settlement_flow_m3": m3,
                                      "meter_time": at, "status": 0, "serial": 0})


def test_a_late_uplink_changes_only_its_own_buckets_and_days_split_at_local_midnight(db_url):
    tz = ZoneInfo(TZ)
    midnight = datetime.now(tz).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    with psycopg.connect(db_url) as conn:
        _meter(conn)
        _meter(conn, "rollup-meter-2")
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    now = wallclock.time()

    def up(device: str, at: datetime, m3: float) -> Uplink:
        return Uplink(device, _water(at, m3), "mqtt", now)
    pipeline.process([up("rollup-meter", midnight - timedelta(seconds=1), 10.0),      # 23:59:59 the day before
                      up("rollup-meter", midnight, 10.5),                             # 00:00:00
                      up("rollup-meter-2", midnight + timedelta(hours=5), 3.0)])
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("""SELECT bucket, count, flow_m3_last FROM rollup_water_day r
                                 JOIN devices d USING (device_key) WHERE d.device_id = 'rollup-meter'
                                ORDER BY bucket""").fetchall()
        assert rows == [(midnight - timedelta(days=1), 1, 10.0), (midnight, 1, 10.5)]
        before = _snapshot(conn)
    # a late reading of the first meter, measured at 03:00 the same day
    pipeline.process([up("rollup-meter", midnight + timedelta(hours=3), 10.25)])
    with psycopg.connect(db_url) as conn:
        after = _snapshot(conn)
        changed = {t: (before[t] - after[t], after[t] - before[t]) for t in TABLES if before[t] != after[t]}
        assert set(changed) == {"rollup_water_day", "rollup_water_site_15m"}
        old, new = changed["rollup_water_day"]
        assert len(old) == len(new) == 1                   # one device-day row, updated
        (row,) = new
        key = conn.execute("SELECT device_key FROM devices WHERE device_id = 'rollup-meter'").fetchone()[0]
        assert row[0] == key and row[1] == midnight and row[2] == 2
        old, new = changed["rollup_water_site_15m"]
        assert not old and len(new) == 1                   # a quarter hour of its own: 03:00
        assert next(iter(new))[1] == midnight + timedelta(hours=3)
        assert_rollups_equal_recount(conn, expect_rows=False)


def test_a_batch_that_rolls_back_counts_nothing(db_url):
    with psycopg.connect(db_url) as conn:
        _meter(conn)
    writer = Writer(lambda: connect(db_url))
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), writer)
    at = datetime.now(UTC) - timedelta(hours=1)
    ws = pipeline.build([Uplink("rollup-meter", _water(at, 1.0), "mqtt", wallclock.time())])
    with pytest.raises(RuntimeError, match="after the rollups"):
        with writer.transaction() as tx:
            tx.write(ws)
            raise RuntimeError("after the rollups")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM rollup_water_day").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == 0
    writer.write(ws)                                      # the same rows, committed: counted once
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT sum(count) FROM rollup_water_day").fetchone()[0] == 1
        assert_rollups_equal_recount(conn, expect_rows=False)


def test_without_an_aggregator_nothing_is_rolled_up(db_url):
    with psycopg.connect(db_url) as conn:
        _meter(conn)
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url), aggregator=None))
    pipeline.process([Uplink("rollup-meter", _water(datetime.now(UTC), 1.0), "mqtt", wallclock.time())])
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM rollup_water_day").fetchone()[0] == 0
