"""Telemetry series (analytics/telemetry.py): the rollup path and the readings path give the same series,
and both equal plain SQL written here over the readings; the planner picks a rollup only where it serves."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

from analytics.telemetry import TelemetryError, plan, rows
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from tests.ingest.test_rollups_written import _province_mix

TZ = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def mix(pg_admin_url, template_db):
    """Two days of the province mix through the write path, in a database of this module's own."""
    from tests.conftest import fresh_database
    gen = fresh_database(pg_admin_url, template_db)
    url = next(gen)
    try:
        uplinks = _province_mix(url, days=2.0, scale=0.004)
        Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url))).process(uplinks)
        yield url
    finally:
        gen.close()


def _window() -> tuple[datetime, datetime]:
    midnight = datetime.now(TZ).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=4), midnight + timedelta(days=1)


def _series(conn, target, key, families, fields, interval, agg, source="auto", tz=TZ):
    s = plan(target=target, key=key, families=families, fields=fields, interval=interval, agg=agg, tz=tz,
             rollup_tz=TZ, source=source)
    since, until = _window()
    return s, list(rows(conn, s, since, until, tz))


def _busiest(conn, sql: str):
    return conn.execute(sql).fetchone()


def _same(a: list, b: list) -> None:
    assert [t for t, _ in a] == [t for t, _ in b] and a
    for (t, va), (_, vb) in zip(a, b, strict=True):
        assert va.keys() == vb.keys()
        for k in va:
            assert (va[k] is None) == (vb[k] is None), (t, k)
            if va[k] is not None:
                assert va[k] == pytest.approx(vb[k], rel=1e-9, abs=1e-9), (t, k)


@pytest.mark.parametrize("agg", ["sum", "avg", "min", "max", "count", "last"])
@pytest.mark.parametrize("interval", ["1d", "1w", "1mo"])
def test_a_meters_days_from_the_rollup_equal_the_readings(mix, agg, interval):
    with psycopg.connect(mix, autocommit=True) as conn:
        key, device = _busiest(conn, """SELECT d.device_key, d.device_id FROM water_readings r JOIN devices d
                                        USING (device_id) GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1""")
        s, got = _series(conn, "device", key, ["water"], ["flow_m3"], interval, agg)
        assert s.sources["flow_m3"] == "rollup:rollup_water_day"
        _, want = _series(conn, "device", key, ["water"], ["flow_m3"], interval, agg, source="readings")
        _same(got, want)
        if interval == "1d" and agg in ("sum", "max", "count"):
            fn = {"sum": "sum", "max": "max", "count": "count"}[agg]
            sql = f"""SELECT date_trunc('day', CASE WHEN meter_time BETWEEN time - interval '7 days'
                                                    AND time + interval '300 s' THEN meter_time ELSE time END
                                         AT TIME ZONE 'Asia/Shanghai'), {fn}(flow_m3)
                        FROM water_readings WHERE device_id = %s GROUP BY 1 ORDER BY 1"""
            plain = [(d, float(v)) for d, v in conn.execute(sql, (device,))]
            assert [t.replace(tzinfo=None) for t, _ in got] == [d for d, _ in plain]
            assert [v["flow_m3"] for _, v in got] == pytest.approx([v for _, v in plain])


def test_min_of_a_battery_flag_is_not_kept_so_the_readings_serve(mix):
    with psycopg.connect(mix, autocommit=True) as conn:
        key, = _busiest(conn, "SELECT device_key FROM rollup_water_day ORDER BY count DESC LIMIT 1")
        s, _ = _series(conn, "device", key, ["water"], ["battery_low"], "1d", "min")
        assert s.sources == {"battery_low": "readings:water_readings"}
        s, _ = _series(conn, "device", key, ["water"], ["battery_low"], "1d", "last")
        assert s.sources == {"battery_low": "rollup:rollup_water_day"}
        # another zone than the writer's: its days are not the rollup's
        s, _ = _series(conn, "device", key, ["water"], ["flow_m3"], "1d", "sum", tz=ZoneInfo("Europe/Paris"))
        assert s.sources == {"flow_m3": "readings:water_readings"}


@pytest.mark.parametrize("interval", ["15m", "1h", "1d"])
def test_a_sites_parking_from_the_site_rollup_equal_the_readings(mix, interval):
    with psycopg.connect(mix, autocommit=True) as conn:
        site, = _busiest(conn, "SELECT site_id FROM rollup_parking_site_15m GROUP BY 1 ORDER BY sum(count) DESC LIMIT 1")
        for agg in ("sum", "avg", "count"):
            s, got = _series(conn, "site", site, ["parking"], ["occupied", "occupancy_changed"], interval, agg)
            assert set(s.sources.values()) == {"rollup:rollup_parking_site_15m"}
            _, want = _series(conn, "site", site, ["parking"], ["occupied", "occupancy_changed"], interval, agg,
                              source="readings")
            _same(got, want)
        s, got = _series(conn, "site", site, ["parking"], ["occupied"], "1h", "sum")
        plain = conn.execute("""SELECT date_trunc('hour', r.time AT TIME ZONE 'Asia/Shanghai'), sum(occupied::int)
                                  FROM parking_events r JOIN devices d USING (device_id) WHERE d.site_id = %s
                                 GROUP BY 1 ORDER BY 1""", (site,)).fetchall()
        assert [(t.replace(tzinfo=None), v["occupied"]) for t, v in got] == [(t, float(n)) for t, n in plain]


@pytest.mark.parametrize("interval", ["5m", "15m", "1h"])
def test_a_detectors_volume_from_its_lanes_rollup_equals_the_readings(mix, interval):
    with psycopg.connect(mix, autocommit=True) as conn:
        key, = _busiest(conn, "SELECT device_key FROM rollup_traffic_lane_5m GROUP BY 1 ORDER BY sum(count) DESC LIMIT 1")
        fields = ["count_a", "count_b", "count_c", "occupancy_pct"]
        s, got = _series(conn, "device", key, ["traffic"], fields, interval, "sum")
        assert set(s.sources.values()) == {"rollup:rollup_traffic_lane_5m"}
        _, want = _series(conn, "device", key, ["traffic"], fields, interval, "sum", source="readings")
        _same(got, want)
        s, got = _series(conn, "device", key, ["traffic"], ["occupancy_pct"], interval, "max")
        assert s.sources == {"occupancy_pct": "rollup:rollup_traffic_lane_5m"}
        _same(got, _series(conn, "device", key, ["traffic"], ["occupancy_pct"], interval, "max", source="readings")[1])


def test_fields_of_two_tables_merge_on_the_interval(mix):
    with psycopg.connect(mix, autocommit=True) as conn:
        key, = _busiest(conn, """SELECT d.device_key FROM radio_readings r JOIN devices d USING (device_id)
                                  WHERE d.pilot = 'fire' GROUP BY 1 ORDER BY count(*) DESC LIMIT 1""")
        s, got = _series(conn, "device", key, ["fire"], ["fault", "rsrp_dbm"], "1h", "max")
        assert s.sources == {"fault": "readings:fire_events", "rsrp_dbm": "readings:radio_readings"}
        _, flow = _series(conn, "device", key, ["fire"], ["fault"], "1h", "max")
        _, rsrp = _series(conn, "device", key, ["fire"], ["rsrp_dbm"], "1h", "max")
        assert flow and rsrp
        want = {t: {"fault": None, "rsrp_dbm": None} for t, _ in flow + rsrp}
        for t, v in flow + rsrp:
            want[t].update(v)
        assert got == sorted(want.items())


def test_questions_it_cannot_answer_are_refused_with_a_reason():
    with pytest.raises(TelemetryError, match="unknown field.*'speed_kmh'.*flow_m3"):
        plan(target="device", key=1, families=["water"], fields=["speed_kmh"], interval="1h", agg="sum", tz=TZ,
             rollup_tz=TZ)
    with pytest.raises(TelemetryError, match="interval must be one of"):
        plan(target="device", key=1, families=["water"], fields=["flow_m3"], interval="2h", agg="sum", tz=TZ,
             rollup_tz=TZ)
    with pytest.raises(TelemetryError, match="agg must be one of"):
        plan(target="device", key=1, families=["water"], fields=["flow_m3"], interval="1h", agg="median", tz=TZ,
             rollup_tz=TZ)
