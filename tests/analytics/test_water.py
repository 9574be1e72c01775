"""Water analytics through the real pipeline: consumption over a roll-over, a replacement and reverse
flow, local-midnight day buckets, daily sums against a plain-SQL recount on a simulated fleet, planted
leaks found and none in a clean run, reruns and two threads giving the same rows."""

from __future__ import annotations

import threading
import time as wallclock
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta

import psycopg
import pytest

import decoders
from analytics.water import (SHANGHAI, Delta, Reading, alert_episodes, classify, night_slots, update_water)
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink

METER, OTHER = "869000000000001", "869000000000002"
ADDRESS, NEW_ADDRESS = "00000000000001", "00000000000099"
NOW = datetime.now(UTC).replace(microsecond=0)


def _frame(at: datetime, m3: float, *, address: str = ADDRESS, valve: int = 0, battery: bool = False,
           serial: int = 0) -> bytes:
    return decoders.encode("cjt188", {"meter_address": address, "flow_m3": m3, "settlement_flow_m3": m3,
                                      "meter_time": at, "status": valve | int(battery) << 2, "serial": serial})


@pytest.fixture
def meters(db_url):
    """Two NB water meters on one Yingtan site; `store` sends (at, m3, options) readings through the pipeline."""
    installed = NOW - timedelta(days=20)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model="cjt188-nb-water-std", network="nbiot", city="Yingtan",
                                             site_kind="residential", site_name="龙岗小区", installed_at=installed)
                                for d in (METER, OTHER)])
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))

    def store(device: str, readings: list[tuple]) -> None:
        uplinks = [Uplink(device_id=device, payload=_frame(at, m3, serial=k % 256, **opts), transport="mqtt",
                          received_at=at.timestamp() + 5) for k, (at, m3, opts) in enumerate(readings)]
        pipeline.process(uplinks)
    return db_url, store


def _daily(conn, device: str = METER) -> dict:
    return {r[0]: r[1:] for r in conn.execute(
        """SELECT day, round(consumption_m3::numeric, 6)::float8, readings, rollovers, new_series, reverse_flows
           FROM water_daily WHERE device_id = %s ORDER BY day""", (device,))}


def _alerts(conn, device: str = METER) -> list[tuple]:
    return conn.execute("SELECT kind, opened_at, closed_at FROM water_alerts WHERE device_id = %s ORDER BY opened_at, kind",
                        (device,)).fetchall()


def _local(days_ago: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    d = datetime.now(SHANGHAI).date() - timedelta(days=days_ago)
    return datetime.combine(d, time(hour, minute, second), tzinfo=SHANGHAI)


# --------------------------------------------------------------------------- the rules alone

def test_classify_rollover_replacement_reset_reverse():
    assert classify("a", 999999.50, "a", 0.30) == (pytest.approx(0.80), "rollover")
    assert classify("a", 523.10, "b", 0.25) == (0.25, "new_series")          # replacement: from zero
    assert classify("a", 523.10, "b", 700.0) == (0.0, "new_series")          # a used meter: unknown start
    assert classify("a", 523.10, "a", 1.20) == (1.20, "new_series")          # a reset to near zero
    assert classify("a", 100.00, "a", 99.80) == (pytest.approx(-0.20), "reverse")
    assert classify("a", 100.00, "a", 50.00) == (0.0, "new_series")          # a big drop: never negative
    assert classify("a", 100.00, "a", 100.00) == (0.0, "flow")


def test_night_slots_prorate_straddling_deltas_and_skip_daily_meters():
    start = datetime.combine(datetime.now(SHANGHAI).date(), time(1, 30), tzinfo=SHANGHAI).timestamp()
    # 01:30 → 02:30 → 03:30 → 04:30, 0.06 m³ each: 0.06 m³/h in both slots (half of each delta in each)
    ds = [Delta(start + k * 3600, start + (k + 1) * 3600, 0.06, "flow") for k in range(3)]
    [(day, slots)] = night_slots(ds).items()
    assert slots == (pytest.approx(0.06), pytest.approx(0.06))
    assert night_slots([Delta(start - 86400, start, 1.0, "flow")]) == {}      # a daily meter: no night figure
    assert night_slots(ds[:1]) == {}                                          # 02:30-04:00 uncovered


def test_alert_rules_open_and_close():
    t0 = NOW.timestamp()
    hourly = [Reading(t0 + k * 3600, t0 + k * 3600, "a", 10 + 0.01 * k, "open", False) for k in range(30)]
    stop = Reading(t0 + 30 * 3600, 0, "a", 10 + 0.29, "open", False)         # no change for an hour
    eps = alert_episodes([*hourly, stop])
    assert [(e.kind, e.opened_at, e.closed_at) for e in eps] == [("continuous_flow", t0 + 24 * 3600, t0 + 30 * 3600)]
    daily = [Reading(t0 + k * 86400, 0, "a", 10 + k, "open", False) for k in range(10)]
    assert alert_episodes(daily) == []                                        # daily meters never open it


# --------------------------------------------------------------------------- through the pipeline

def test_rollover_replacement_and_reverse_flow(meters):
    db_url, store = meters
    store(METER, [(_local(3, 10), 999999.50, {}), (_local(3, 22), 999999.90, {}),
                  (_local(2, 10), 0.30, {}),                                     # roll-over: 0.40 m³ that day
                  (_local(2, 12), 0.50, {}),
                  (_local(1, 9), 0.12, {"address": NEW_ADDRESS}),                # replaced: new meter from zero
                  (_local(1, 11), 0.40, {"address": NEW_ADDRESS}),
                  (_local(1, 13), 0.25, {"address": NEW_ADDRESS}),               # reverse flow: −0.15
                  (_local(1, 15), 0.35, {"address": NEW_ADDRESS})])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        days = _daily(conn)
        d3, d2, d1 = (_local(k, 0).date() for k in (3, 2, 1))
        assert days[d3] == (0.40, 2, 0, 0, 0)
        assert days[d2] == (0.60, 2, 1, 0, 0)            # 0.40 over the roll-over + 0.20
        assert days[d1] == (0.35, 4, 0, 1, 1)            # 0.12 from zero + 0.28 − 0.15 + 0.10
        assert all(v[0] >= 0 for v in days.values())
        reverse = [a for a in _alerts(conn) if a[0] == "reverse_flow"]
        assert reverse == [("reverse_flow", _local(1, 13), _local(1, 15))]
        assert conn.execute("SELECT reverse_m3 FROM water_daily WHERE device_id = %s AND day = %s",
                            (METER, d1)).fetchone()[0] == pytest.approx(-0.15)
        # the API's reading of it: a meter's days in [since, until)
        from analytics.water import daily_consumption
        got = daily_consumption(conn, METER, d2, d1 + timedelta(days=1))
        assert [(c.day, round(c.consumption_m3, 6), c.readings, c.rollovers, c.new_series, c.reverse_flows)
                for c in got] == [(d2, 0.6, 2, 1, 0, 0), (d1, 0.35, 4, 0, 1, 1)]
        assert got[1].reverse_m3 == pytest.approx(-0.15) and daily_consumption(conn, OTHER, d3, d1) == []


def test_days_split_at_local_midnight(meters):
    db_url, store = meters
    store(METER, [(_local(2, 23, 0), 10.00, {}), (_local(2, 23, 59, 59), 10.30, {}), (_local(1, 0, 0, 0), 10.50, {})])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        days = _daily(conn)
    assert days == {_local(2, 0).date(): (0.30, 2, 0, 0, 0), _local(1, 0).date(): (0.20, 1, 0, 0, 0)}


def test_state_alerts_battery_valve_and_stopped(meters):
    db_url, store = meters
    # 16 daily readings; the register stands still until reading 14
    readings = [(_local(16 - k, 12), 50.0 if k < 14 else 50.0 + k, {}) for k in range(16)]
    readings[3] = (readings[3][0], 50.0, {"battery": True})
    readings[4] = (readings[4][0], 50.0, {"battery": True, "valve": 0b01})
    readings[5] = (readings[5][0], 50.0, {"valve": 0b11})
    store(METER, readings)
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        got = _alerts(conn)
    t = [r[0] for r in readings]
    assert ("battery_low", t[3], t[5]) in got
    assert ("valve_closed", t[4], t[5]) in got
    assert ("valve_abnormal", t[5], t[6]) in got
    # stopped: not before reading 4 (3 days still), the valve shut at 4 and 5; open again from reading 6,
    # so seven days without a rise at reading 13; the register rises at 14
    assert [a for a in got if a[0] == "stopped"] == [("stopped", t[13], t[14])]
    assert len(got) == 4


# --------------------------------------------------------------------------- a simulated fleet

_RECOUNT = """
    WITH r AS (
        SELECT device_id, time, flow_m3, meter_address,
               CASE WHEN meter_time BETWEEN time - interval '7 days' AND time + interval '300 seconds'
                    THEN meter_time ELSE time END AS t
        FROM water_readings WHERE flow_m3 IS NOT NULL),
    l AS (
        SELECT *, lag(flow_m3) OVER w AS p, lag(meter_address) OVER w AS pa
        FROM r WINDOW w AS (PARTITION BY device_id ORDER BY t, time))
    SELECT device_id, (t AT TIME ZONE 'Asia/Shanghai')::date AS day, count(*) AS readings,
           round(sum(CASE
               WHEN p IS NULL THEN 0
               WHEN pa <> meter_address OR (flow_m3 < p AND NOT (p >= 999999.99 - 1000 AND flow_m3 <= 1000)
                                            AND p - flow_m3 > 1.0)
                   THEN CASE WHEN flow_m3 BETWEEN 0 AND 10 THEN flow_m3 ELSE 0 END
               WHEN flow_m3 >= p THEN flow_m3 - p
               WHEN p >= 999999.99 - 1000 AND flow_m3 <= 1000 THEN 999999.99 + 0.01 - p + flow_m3
               ELSE flow_m3 - p END)::numeric, 6)::float8 AS m3
    FROM l GROUP BY 1, 2 ORDER BY 1, 2"""


def _simulate(db_url, *, leak: float, days: int = 3, hourly: bool = True, freeze_hours: int = 0):
    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    now = wallclock.time()
    base = load_scenario("province-mix").scaled(0.01)
    options = {"leak": leak, "rollover": 0.1 if leak else 0.0, "replacement": 0.1 if leak else 0.0,
               "battery_low": 0.05, "valve_closed": 0.02, "freeze_hours": freeze_hours}
    fleets = tuple(replace(f, interval_s=3600 if hourly else f.interval_s, options={**f.options, **options},
                           behaviour=replace(f.behaviour, corrupt=0.0,
                                             midnight_share=0.0 if hourly else f.behaviour.midnight_share))
                   for f in base.fleets if f.family == "water")
    assert len(fleets) == 5
    scenario = replace(base, fleets=fleets, start=now - days * 86400 - 600, duration_s=days * 86400)
    sim = Simulation(scenario)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, sim.device_records)
    records = [r for r in sim.records() if r.t <= now]
    uplinks = [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
               for r in records]
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    return records, uplinks, pipeline


def _all_rows(conn) -> tuple[list, list, list]:
    daily = conn.execute("""SELECT device_id, day, round(consumption_m3::numeric, 6), readings, night_m3h::text,
                                   rollovers, new_series FROM water_daily ORDER BY 1, 2""").fetchall()
    night = conn.execute("SELECT site_id, day, round(mnf_m3h::numeric, 6), meters, round(leakage_m3h::numeric, 6), "
                         "nights FROM water_night ORDER BY 1, 2").fetchall()
    alerts = conn.execute("SELECT device_id, kind, opened_at, closed_at FROM water_alerts ORDER BY 1, 2, 3").fetchall()
    return daily, night, alerts


def test_a_simulated_fleet_daily_sums_leaks_and_reruns(db_url):
    records, uplinks, pipeline = _simulate(db_url, leak=0.15)
    labels = {label for r in records for label in r.labels}
    assert {"leak", "rollover", "replacement"} <= labels, labels
    half = len(uplinks) // 2
    pipeline.process(uplinks[:half])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        pipeline.process(uplinks[half:])
        update_water(conn)                                   # incremental
        incremental = _all_rows(conn)
        update_water(conn)                                   # nothing new: the same rows
        assert _all_rows(conn) == incremental
        update_water(conn, full=True)
        assert _all_rows(conn) == incremental
        # daily sums equal an independent recount with lag() over the readings
        recount = {(d, day): (n, m3) for d, day, n, m3 in conn.execute(_RECOUNT)}
        stored = {(d, day): (n, float(m3)) for d, day, m3, n, *_ in incremental[0]}
        assert stored.keys() == recount.keys()
        for k in stored:
            assert stored[k][0] == recount[k][0] and stored[k][1] == pytest.approx(recount[k][1], abs=1e-6), k
        assert all(m3 >= 0 for _, _, m3, *_ in incremental[0])     # no reverse flow planted: never negative
        assert any(r[5] for r in incremental[0]) and any(r[6] for r in incremental[0])   # roll-overs, replacements
        leaking = {r.device_id for r in records if "leak" in r.labels}
        flagged = {d for d, kind, *_ in incremental[2] if kind == "continuous_flow"}
        assert leaking and flagged == leaking
        assert incremental[1], "no site night figure"
        battery = {r.device_id for r in records if "battery_low" in r.labels}
        assert battery == {d for d, kind, *_ in incremental[2] if kind == "battery_low"}
        closed = {r.device_id for r in records if "valve_closed" in r.labels}
        assert closed == {d for d, kind, *_ in incremental[2] if kind == "valve_closed"}
    # two threads on a fresh recomputation give the same rows
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE water_daily, water_night, water_alerts, water_progress")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                update_water(c)
        except BaseException as exc:       # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(db_url) as conn:
        assert _all_rows(conn) == incremental


def test_daily_meters_sum_like_the_recount_and_give_no_night_figure(db_url):
    """The province-mix meters as they are (once a day, many in the midnight burst) over six days."""
    records, uplinks, pipeline = _simulate(db_url, leak=0.15, days=6, hourly=False)
    assert any("leak" in r.labels for r in records)
    pipeline.process(uplinks)
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        stored = {(d, day): (n, m3) for d, day, n, m3 in conn.execute(
            "SELECT device_id, day, readings, consumption_m3 FROM water_daily")}
        recount = {(d, day): (n, m3) for d, day, n, m3 in conn.execute(_RECOUNT)}
        assert stored.keys() == recount.keys() and len(stored) > 100
        for k in stored:
            assert stored[k][0] == recount[k][0] and stored[k][1] == pytest.approx(recount[k][1], abs=1e-6), k
        assert conn.execute("SELECT count(*) FROM water_daily WHERE night_m3h IS NOT NULL").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM water_night").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM water_alerts WHERE kind = 'continuous_flow'").fetchone()[0] == 0


def test_daily_meters_with_hourly_freeze_records_give_night_flow_and_find_the_leaks(db_url):
    """Meters that wake once a day and send their last 24 hourly freeze records (CJ/T 188-2018 D3xx) with
    the current reading: each freeze record is a reading at its freeze time, so the meters' nights are
    covered (night flow, MNF and leakage per site) and every planted leak opens a continuous-flow alert;
    daily sums still equal the recount."""
    records, uplinks, pipeline = _simulate(db_url, leak=0.15, days=4, hourly=False, freeze_hours=24)
    assert sum("freeze" in r.labels for r in records) > 15 * sum("freeze" not in r.labels for r in records)
    pipeline.process(uplinks)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # a freeze record is stored at its freeze time: on the hour, by the meter's (drifting) clock
        off = conn.execute("""SELECT count(*), count(meter_time),
                                     min(abs(extract(epoch FROM meter_time)::bigint % 3600 - 1800))
                                FROM water_readings WHERE extra->>'record_kind' = 'freeze'""").fetchone()
        assert off[0] > 1000 and off[1] == off[0] and off[2] >= 1800 - 300, off
        update_water(conn)
        stored = {(d, day): (n, m3) for d, day, n, m3 in conn.execute(
            "SELECT device_id, day, readings, consumption_m3 FROM water_daily")}
        recount = {(d, day): (n, m3) for d, day, n, m3 in conn.execute(_RECOUNT)}
        assert stored.keys() == recount.keys() and len(stored) > 100
        for k in stored:
            assert stored[k][0] == recount[k][0] and stored[k][1] == pytest.approx(recount[k][1], abs=1e-6), k
        assert conn.execute("SELECT count(*) FROM water_night").fetchone()[0] > 0
        flagged = {d for d, in conn.execute("SELECT device_id FROM water_alerts WHERE kind = 'continuous_flow'")}
    leaking = {r.device_id for r in records if "leak" in r.labels}
    assert leaking and flagged == leaking


def test_a_clean_fleet_has_no_leak(db_url):
    records, uplinks, pipeline = _simulate(db_url, leak=0.0)
    assert not any("leak" in r.labels for r in records)
    pipeline.process(uplinks)
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        kinds = [k for k, in conn.execute("SELECT kind FROM water_alerts")]
    assert "continuous_flow" not in kinds and "reverse_flow" not in kinds


def test_report_water_prints_tables_and_csv(meters, monkeypatch):
    from typer.testing import CliRunner

    from iotjx.cli import app
    from iotjx.settings import get_settings

    db_url, store = meters
    store(METER, [(_local(1, 1, 30) + timedelta(hours=k), 20 + 0.05 * k, {"battery": k > 2}) for k in range(4)])
    monkeypatch.setenv("IOTJX_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(app, ["report", "water", "--city", "Yingtan"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "Open water meter alerts: 1" in shown.output and "龙岗小区" in shown.output
        plain = runner.invoke(app, ["report", "water", "--csv", "--section", "consumption"])
        assert plain.exit_code == 0, plain.output
        lines = plain.output.strip().splitlines()
        assert lines[0] == "day,city_code,city,meters,consumption_m3,reverse_m3"
        assert lines[1:] == [f"{_local(1, 0).date().isoformat()},360600,Yingtan,1,0.15,0.00"]
        districts = runner.invoke(app, ["report", "water", "--csv", "--section", "districts"]).output.splitlines()
        assert districts == ["day,city_code,district_code,district,meters,consumption_m3,reverse_m3",
                             f"{_local(1, 0).date().isoformat()},360600,,(unknown district),1,0.15,0.00"]
        sites = runner.invoke(app, ["report", "water", "--csv", "--section", "sites"]).output.splitlines()
        assert len(sites) == 2 and sites[1].split(",")[4] == "0.050"     # 0.05 m³/h in both night slots
        every = runner.invoke(app, ["report", "water", "--csv"]).output
        assert [line for line in every.splitlines() if line.startswith("# ")] == ["# consumption", "# districts", "# sites", "# alerts"]
        bad = runner.invoke(app, ["report", "water", "--city", "Atlantis"])
        assert bad.exit_code == 2 and "unknown city" in bad.output
    finally:
        get_settings.cache_clear()


def test_a_late_uplink_changes_only_its_own_meter_from_its_own_day(meters):
    db_url, store = meters
    for device in (METER, OTHER):
        store(device, [(_local(5 - k, 12), 10.0 + k, {}) for k in range(5)])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_water(conn)
        before = conn.execute("SELECT device_id, day, consumption_m3, updated_at FROM water_daily ORDER BY 1, 2").fetchall()
        # a reading measured three days ago at 18:00 arrives now (held by the meter)
        late_at = _local(3, 18)
        Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))).process(
            [Uplink(device_id=METER, payload=_frame(late_at, 12.5, serial=99), transport="mqtt",
                    received_at=wallclock.time())])
        update_water(conn)
        after = conn.execute("SELECT device_id, day, consumption_m3, updated_at FROM water_daily ORDER BY 1, 2").fetchall()
    # Rows are rewritten from the late reading's day for its meter (and, within the one-hour margin, the
    # rows last written): only its own day and the next one change.
    assert [r[:3] for r in before if r[0] == OTHER] == [r[:3] for r in after if r[0] == OTHER]
    assert {r[1]: r[3] for r in before if r[0] == METER and r[1] < late_at.date()} == \
        {r[1]: r[3] for r in after if r[0] == METER and r[1] < late_at.date()}          # not even rewritten
    changed = {(r[0], r[1]) for r in {r[:3] for r in after} ^ {r[:3] for r in before}}
    assert changed == {(METER, _local(3, 0).date()), (METER, _local(2, 0).date())}
    days = {r[1]: r[2] for r in after if r[0] == METER}
    assert days[_local(3, 0).date()] == pytest.approx(1.5) and days[_local(2, 0).date()] == pytest.approx(0.5)
    assert sum(days.values()) == pytest.approx(4.0)


def test_consumption_by_district_splits_each_city_row_and_keeps_the_unknown(db_url):
    """Known daily figures: two districts of Yingtan (catalogue sites), an unverified Yingtan site (unknown
    district of Yingtan), a meter without a site (city 0); each district row is the sum of its meters, and
    a city's districts add up to its consumption_by_city row."""
    from analytics.water import consumption_by_city, consumption_by_district
    from iotjx.sites import SiteRecord, import_sites
    day = date(2026, 3, 1)
    with psycopg.connect(db_url) as conn:
        import_sites(conn, [SiteRecord("JX-WD-1", "Yingtan", "residential", "月湖一区", district="360602"),
                            SiteRecord("JX-WD-2", "Yingtan", "residential", "贵溪一区", district="贵溪市")])
        meters = {"869000000000011": ("JX-WD-1", 1.25), "869000000000012": ("JX-WD-1", 2.5),
                  "869000000000013": ("JX-WD-2", 4.0), "869000000000014": ("龙岗小区", 8.0),
                  "869000000000015": (None, 16.0)}
        register_devices(conn, [DeviceRecord(device_id=d, model="cjt188-nb-water-std", network="nbiot",
                                             **({"site_id": s} if s and s.startswith("JX-") else
                                                {"city": "Yingtan", "site_kind": "residential",
                                                 "site_name": s or "龙岗小区"}))
                                for d, (s, _) in meters.items()])
        conn.execute("UPDATE devices SET site_id = NULL WHERE device_id = '869000000000015'")   # no site (SQL only)
        for d, (_, m3) in meters.items():
            conn.execute("INSERT INTO water_daily (device_id, day, consumption_m3, reverse_m3, readings, first_at, "
                         "last_at) VALUES (%s, %s, %s, %s, 24, now(), now())", (d, day, m3, -m3 / 100))
        got = [(r.city_code, r.district_code, r.district_zh, r.meters, r.consumption_m3, r.reverse_m3)
               for r in consumption_by_district(conn, day, day)]
        assert got == [(0, None, None, 1, 16.0, -0.16),
                       (360600, 360602, "月湖区", 2, 3.75, pytest.approx(-0.0375)),
                       (360600, 360681, "贵溪市", 1, 4.0, -0.04),
                       (360600, None, None, 1, 8.0, -0.08)]
        assert [r.district_code for r in consumption_by_district(conn, day, day, "Yingtan")] == [360602, 360681, None]
        cities = {c.city_code: c.consumption_m3 for c in consumption_by_city(conn, day, day)}
        assert cities == {0: 16.0, 360600: 15.75}
        assert consumption_by_district(conn, day + timedelta(days=1), day + timedelta(days=1)) == []
