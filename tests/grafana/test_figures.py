"""The figures the boards show, recomputed apart from the panels' SQL: from the readings themselves in
plain SQL (traffic volume and speed, parking occupancy, radio by city, battery and valve states, alarm
frames), in Python over the rows (devices online, acknowledgements within budget), and against
analytics.coverage's own pace (the Coverage board's verdicts).  Each panel's SQL is expanded as Grafana
would send it with every variable on "All" over the last 7 days (the three simulated days inside)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from analytics.traffic import congestion_grade
from iotjx.grafana import boards
from iotjx.grafana import panels as P
from iotjx.grafana.coverage_board import coverage_panels
from tests.grafana.conftest import INTERVAL
from tests.grafana.grafana_sql import expand

TZ = P.LOCAL_TZ
PLAUSIBLE = "BETWEEN r.time - interval '7 days' AND r.time + interval '300 seconds'"   # analytics/rollups.py


def _panel(title: str) -> P.Panel:
    (p,) = [p for _, (_, ps) in boards.boards_panels().items() for p in ps if p.title == title]
    return p


def _run(conn, selections, title: str) -> list[dict]:
    t_from, t_to, chosen = selections
    sql = expand(_panel(title).sql, variables=chosen["all"], t_from=t_from, t_to=t_to, interval=INTERVAL,
                 timescaledb=False)
    cur = conn.execute(sql)
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


_VOLUME = ("(coalesce(count_a, 0) + coalesce(count_b, 0) + coalesce(count_c, 0) + "
           "CASE WHEN count_a IS NULL AND count_b IS NULL AND count_c IS NULL "
           "THEN coalesce(round((extra->>'volume')::numeric), 0) ELSE 0 END)")


def test_traffic_volume_speed_and_grade_per_lane(filled, selections):
    with psycopg.connect(filled) as conn:
        got = {(r["device_id"], r["lane"]): r for r in _run(conn, selections, "Congestion grade by intersection and lane")}
        want = {(d, lane): (float(v), s) for d, lane, v, s in conn.execute(f"""
            SELECT r.device_id, coalesce(r.channel, 0), sum({_VOLUME}),
                   sum({_VOLUME}) FILTER (WHERE {_VOLUME} > 0 AND speed_kmh > 0)
                   / nullif(sum({_VOLUME} / speed_kmh) FILTER (WHERE {_VOLUME} > 0 AND speed_kmh > 0), 0)
              FROM traffic_flow r JOIN devices d USING (device_id) JOIN sites s USING (site_id)
             GROUP BY 1, 2""")}
    assert got and set(got) == set(want)
    for key, (vehicles, speed) in want.items():
        row = got[key]
        assert float(row["vehicles"]) == pytest.approx(vehicles)
        if speed is None:
            assert row["speed_kmh"] is None and row["grade"] is None
        else:
            assert float(row["speed_kmh"]) == pytest.approx(float(speed), abs=0.051)
            assert row["grade"] == congestion_grade(round(float(speed), 9)), key


def test_parking_occupancy_per_site_and_quarter_hour(filled, selections):
    with psycopg.connect(filled) as conn:
        got = {(r["metric"], float(r["time"])): r["occupied_pct"]
               for r in _run(conn, selections, "Parking occupancy by lot and scenic spot")}
        want = {(label, float(t)): pct for label, t, pct in conn.execute(f"""
            SELECT s.kind || ' · ' || s.name,
                   extract(epoch FROM date_bin('15 minutes', r.time AT TIME ZONE '{TZ}', timestamp '2000-01-01')
                                      AT TIME ZONE '{TZ}'),
                   100.0 * sum(r.occupied::int) / nullif(count(r.occupied), 0)
              FROM parking_events r JOIN devices d USING (device_id) JOIN sites s USING (site_id)
             GROUP BY 1, 2""")}
    assert got and set(got) == set(want)
    for key, pct in want.items():
        assert got[key] == (None if pct is None else pytest.approx(float(pct))), key


def test_radio_quality_by_city(filled, selections):
    with psycopg.connect(filled) as conn:
        got = {r["city"]: r for r in _run(conn, selections, "Radio quality by city")}
        want = {city: (n, samples, rsrp) for city, n, samples, rsrp in conn.execute("""
            SELECT c.name_en, count(DISTINCT r.device_id), count(*), avg(r.rsrp_dbm)
              FROM radio_readings r JOIN devices d USING (device_id) JOIN sites s USING (site_id)
              JOIN cities c ON c.code = s.city_code GROUP BY 1""")}
    assert got and set(got) == set(want)
    for city, (n, samples, rsrp) in want.items():
        assert (got[city]["devices"], got[city]["samples"]) == (n, samples)
        assert float(got[city]["rsrp_dbm"]) == pytest.approx(rsrp, abs=0.051)


def test_battery_low_and_valves_closed_by_city(filled, selections):
    """Each meter's newest state on its last local day with readings, by measurement time."""
    with psycopg.connect(filled) as conn:
        got = {r["city"]: (r["meters"], r["battery_low"], r["valve_closed"])
               for r in _run(conn, selections, "Battery low and valves closed, by city")}
        want = {city: (m, b, v) for city, m, b, v in conn.execute(f"""
            WITH r AS (SELECT c.name_en AS city, r.device_id, r.battery_low,
                              CASE r.valve WHEN 'closed' THEN 1 WHEN 'open' THEN 0 WHEN 'abnormal' THEN 0 END AS closed,
                              CASE WHEN r.meter_time {PLAUSIBLE} THEN r.meter_time ELSE r.time END AS mt
                         FROM water_readings r JOIN devices d USING (device_id) JOIN sites s USING (site_id)
                         JOIN cities c ON c.code = s.city_code),
                 last AS (SELECT device_id, max((mt AT TIME ZONE '{TZ}')::date) AS day FROM r GROUP BY 1),
                 m AS (SELECT r.city, r.device_id,
                              (array_agg(r.battery_low ORDER BY r.mt DESC) FILTER (WHERE r.battery_low IS NOT NULL))[1] AS low,
                              (array_agg(r.closed ORDER BY r.mt DESC) FILTER (WHERE r.closed IS NOT NULL))[1] AS closed
                         FROM r JOIN last l ON l.device_id = r.device_id AND (r.mt AT TIME ZONE '{TZ}')::date = l.day
                        GROUP BY 1, 2)
            SELECT city, count(*), count(*) FILTER (WHERE low), count(*) FILTER (WHERE closed = 1) FROM m GROUP BY 1""")}
    assert got == want and sum(v[0] for v in want.values()) > 10


def test_alarm_and_fault_frames_per_quarter_hour(filled, selections):
    with psycopg.connect(filled) as conn:
        got = {float(r["time"]): (r["alarm_frames"], r["fault_frames"])
               for r in _run(conn, selections, "Alarm and fault frames")}
        want = {float(t): (a, f) for t, a, f in conn.execute(f"""
            WITH r AS (SELECT CASE WHEN coalesce(r.event_time, r.sent_at) {PLAUSIBLE} THEN coalesce(r.event_time, r.sent_at)
                                   ELSE r.time END AS mt, r.fire_alarm, r.fault
                         FROM fire_events r JOIN devices d USING (device_id) WHERE d.site_id IS NOT NULL)
            SELECT extract(epoch FROM date_bin('15 minutes', mt AT TIME ZONE '{TZ}', timestamp '2000-01-01')
                                      AT TIME ZONE '{TZ}'),
                   coalesce(sum(fire_alarm::int), 0)::float8, coalesce(sum(fault::int), 0)::float8
              FROM r GROUP BY 1""")}
    assert got == want and sum(a for a, _ in want.values()) > 0


def test_devices_online_and_acknowledgements_within_budget(filled, selections):
    t_from, t_to, _ = selections
    with psycopg.connect(filled) as conn:
        online = {(r["pilot"], r["network"]): (r["registered"], r["online"])
                  for r in _run(conn, selections, "Devices online")}
        devices = conn.execute("""
            SELECT d.pilot, d.network, coalesce(d.reporting_interval_s, m.reporting_interval_s), st.last_seen
              FROM devices d JOIN device_models m USING (model) LEFT JOIN device_state st USING (device_id)
             WHERE d.status = 'active'""").fetchall()
        acks = _run(conn, selections, "Acknowledgements within budget")
        alarms = conn.execute("SELECT raised_at, received_at, acked_at FROM fire_alarms WHERE kind = 'alarm'").fetchall()
    want: dict[tuple[str, str], list[int]] = {}
    for pilot, network, interval_s, last_seen in devices:
        w = want.setdefault((pilot, network), [0, 0])
        w[0] += 1
        w[1] += last_seen is not None and last_seen >= t_to - timedelta(seconds=P.LIVE_FACTOR * interval_s)
    assert online == {k: tuple(v) for k, v in want.items()}
    raised = [a for a in alarms if t_from <= a[0] <= t_to]
    acked = [a for a in raised if a[2] is not None]
    assert (acks[0]["alarms"], acks[0]["acked"]) == (len(raised), len(acked)) and acked
    assert acks[0]["acked_within_10s"] == sum(a[2] - a[1] <= timedelta(seconds=10) for a in acked)


def test_coverage_verdicts_equal_analytics_pace(filled, selections, catalogue_file):
    """The Coverage board's verdict, needed and observed pace per target equal the report of the same
    snapshot day (analytics.coverage.report_as_of, written in Python), for the bundled targets and a few
    added ones that are met, on track, at risk, missed and without a figure."""
    from analytics.coverage import report_as_of
    from iotjx.targets import load_catalogue

    catalogue = load_catalogue(catalogue_file)
    (panel,) = [p for p in coverage_panels(boards.catalogue_targets(catalogue_file))
                if p.title.startswith("Targets")]
    t_from, t_to, chosen = selections
    with psycopg.connect(filled) as conn:
        cur = conn.execute(expand(panel.sql, variables=chosen["all"], t_from=t_from, t_to=t_to, interval=INTERVAL,
                                  timescaledb=False))
        rows = [dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()]
        day = rows[0]["day"]
        report = {t["target_id"]: t for t in report_as_of(conn, catalogue, day).targets}
    assert len(rows) == len(report)
    verdicts = {r["target_id"]: r["verdict"] for r in rows}
    assert {k: v for k, v in verdicts.items() if k.startswith("grafana-")} == {
        "grafana-met": "met", "grafana-on-track": "on_track", "grafana-at-risk": "at_risk",
        "grafana-missed": "missed", "grafana-unknown": "unknown"}
    for r in rows:
        t = report[r["target_id"]]
        assert r["verdict"] == t["status"], r["target_id"]
        assert r["value"] == (None if t["value"] is None else pytest.approx(t["value"])), r["target_id"]
        for mine, theirs in ((r["needed_per_day"], t["pace_needed"]), (r["observed_per_day"], t["pace_observed"])):
            if theirs is None or t["status"] == "met":
                continue
            assert mine == pytest.approx(theirs), r["target_id"]


def test_water_consumption_by_district(filled, selections):
    """In a transaction rolled back after: every other site gets a district of its city; the panel's rows
    equal a plain-SQL sum of water_daily over the range's local days per city and district, the other
    sites' meters under '(unknown district)' of their city."""
    t_from, t_to, _ = selections
    days = ((t_from + timedelta(hours=8)).date(), (t_to + timedelta(hours=8)).date())     # Asia/Shanghai
    with psycopg.connect(filled) as conn:
        conn.execute("UPDATE sites s SET district_code = (SELECT min(code) FROM districts di "
                     "WHERE di.city_code = s.city_code) WHERE s.site_id % 2 = 0")
        got = {(r["city"], r["district_code"]): (r["district"], r["meters"], float(r["consumption_m3"]))
               for r in _run(conn, selections, "Consumption by district")}
        want = {(city, code): (name or "(unknown district)", n, m3) for city, code, name, n, m3 in conn.execute("""
            SELECT c.name_en, s.district_code, di.name_zh || ' ' || di.name_en, count(DISTINCT w.device_id),
                   sum(w.consumption_m3)
              FROM water_daily w JOIN devices d USING (device_id) JOIN sites s ON s.site_id = d.site_id
              JOIN cities c ON c.code = s.city_code LEFT JOIN districts di ON di.code = s.district_code
             WHERE w.day BETWEEN %s AND %s GROUP BY 1, 2, 3""", days)}
        conn.rollback()
    assert got and set(got) == set(want)
    assert any(code is None for _, code in want) and any(code is not None for _, code in want)
    for key, (name, n, m3) in want.items():
        assert got[key][:2] == (name, n) and got[key][2] == pytest.approx(m3, abs=0.0006), key
