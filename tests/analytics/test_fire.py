"""Fire alarm lifecycles, offline devices and the centre's KPIs (analytics/fire.py), from GB/T 26875.3
frames stored through the real pipeline, checked against hand-written expectations and plain SQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import decoders
from analytics.fire import (AlarmNotFound, InvalidTransition, acknowledge, clear, fire_kpis, get_alarm,
                            offline_devices, open_alarms, update_alarms)
from decoders.gb26875_encode import heartbeat
from decoders.gb26875_layout import COMPONENT_STATE
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=6)               # the planted story starts here (frame labels)
PANEL, PANEL2, SMOKE, SILENT = "860000000000001", "860000000000002", "860000000000003", "860000000000004"
DETECTOR = 17                               # the panel's detector the alarm and fault are planted on


def _component(at: datetime, *, fire: bool = False, fault: bool = False, address: int = DETECTOR,
               serial: int = 0, short: bool = False) -> bytes:
    obj = {"system_type": 1, "system_address": 1, "component_type": 0x28, "component_address": address,
           "description": None if short else f"{address}号烟感", "time": at,
           "flags": {"normal_running": True, "fire_alarm": fire, "fault": fault, "started": fire}}
    return decoders.encode("gb26875", {"serial": serial, "version": "1.1", "sent_at": at, "source_address": 99,
                                       "command": 2, "app_type": COMPONENT_STATE, "objects": [obj],
                                       "with_description": not short})


def _beat(at: datetime, serial: int = 0) -> bytes:
    return decoders.encode("gb26875", heartbeat(99, at, serial=serial))


def _up(device: str, payload: bytes, received: datetime) -> Uplink:
    return Uplink(device_id=device, payload=payload, transport="mqtt", received_at=received.timestamp())


@pytest.fixture
def fleet(db_url):
    """Two UITD panels in Nanchang (two sites), an NB smoke detector in Jiujiang, a silent panel."""
    records = [DeviceRecord(device_id=PANEL, model="gb26875-uitd", network="cat1", city="Nanchang",
                            site_kind="residential", site_name="青山湖小区", installed_at=T0 - timedelta(days=1)),
               DeviceRecord(device_id=PANEL2, model="gb26875-uitd", network="cat1", city="Nanchang",
                            site_kind="campus", site_name="南昌大学", installed_at=T0 - timedelta(days=1)),
               DeviceRecord(device_id=SMOKE, model="gb26875-nb-smoke", network="nbiot", city="Jiujiang",
                            site_kind="residential", site_name="浔阳小区", installed_at=T0 - timedelta(days=1)),
               DeviceRecord(device_id=SILENT, model="gb26875-uitd", network="cat1", city="Jiujiang",
                            site_kind="residential", site_name="浔阳小区", installed_at=T0 - timedelta(days=1))]
    with psycopg.connect(db_url) as conn:
        register_devices(conn, records)
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))

    def store(uplinks: list[Uplink]) -> dict:
        before = dict(pipeline.counters)
        pipeline.process(uplinks)
        return {k: pipeline.counters[k] - before.get(k, 0) for k in pipeline.counters}
    return db_url, store


def _heartbeats(device: str, start: datetime, end: datetime, every_s: int = 300) -> list[Uplink]:
    out, t, k = [], start, 0
    while t < end:
        out.append(_up(device, _beat(t, serial=k), t + timedelta(seconds=1)))
        t, k = t + timedelta(seconds=every_s), k + 1
    return out


def _rows(conn) -> list[tuple]:
    return conn.execute("""
        SELECT device_id, component_address, kind, raised_at, received_at, restored_at, cleared_at, cleared_by,
               state, acked_at, acked_by, false_alarm
        FROM fire_alarms ORDER BY device_id, component_address, kind, raised_at""").fetchall()


def _planted(store) -> dict[str, datetime]:
    """Panel: alarm on detector 17 at T0+10 min restored at T0+25 min; a fault on it at T0+1 h repaired
    at T0+3 h; each frame received 2 s after its label.  Heartbeats every 5 min throughout."""
    t = {"alarm": T0 + timedelta(minutes=10), "restore": T0 + timedelta(minutes=25),
         "fault": T0 + timedelta(hours=1), "fault_restore": T0 + timedelta(hours=3)}
    frames = [_up(PANEL, _component(t["alarm"], fire=True, serial=1001), t["alarm"] + timedelta(seconds=2)),
              _up(PANEL, _component(t["restore"], serial=1002), t["restore"] + timedelta(seconds=2)),
              _up(PANEL, _component(t["fault"], fault=True, serial=1003), t["fault"] + timedelta(seconds=2)),
              _up(PANEL, _component(t["fault_restore"], serial=1004), t["fault_restore"] + timedelta(seconds=2))]
    counts = store(_heartbeats(PANEL, T0, NOW) + frames)
    assert counts["stored"] == len(frames) + len(_heartbeats(PANEL, T0, NOW))
    return t


def _hand_count(conn) -> list[tuple]:
    """The episodes by plain SQL (gaps and islands over the component-state rows, by time label)."""
    return conn.execute("""
        WITH s AS (
            SELECT device_id, component_address, k.kind, coalesce(event_time, sent_at, time) AS at, time, k.flag
            FROM fire_events CROSS JOIN LATERAL (VALUES ('alarm', fire_alarm), ('fault', fault)) k(kind, flag)
            WHERE app_type = 2 AND k.flag IS NOT NULL),
        m AS (SELECT *, lag(flag) OVER w AS prev FROM s
              WINDOW w AS (PARTITION BY device_id, component_address, kind ORDER BY at, time))
        SELECT device_id, component_address, kind, at,
               (SELECT min(s2.at) FROM s s2 WHERE (s2.device_id, s2.component_address, s2.kind)
                    = (m.device_id, m.component_address, m.kind) AND s2.at > m.at AND NOT s2.flag)
        FROM m WHERE flag AND (prev IS NULL OR NOT prev)
        ORDER BY 1, 2, 3, 4""").fetchall()


def test_planted_alarm_and_fault_found_with_their_times(fleet):
    db_url, store = fleet
    t = _planted(store)
    with psycopg.connect(db_url, autocommit=True) as conn:
        result = update_alarms(conn)
        assert result.inserted == 2
        rows = _rows(conn)
        assert [(r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows] == [
            (DETECTOR, "alarm", t["alarm"], t["alarm"] + timedelta(seconds=2), t["restore"], t["restore"], "device",
             "cleared_unacked"),
            (DETECTOR, "fault", t["fault"], t["fault"] + timedelta(seconds=2), t["fault_restore"],
             t["fault_restore"], "device", "cleared_unacked")]
        assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == _hand_count(conn)
        # Still open: restored by the device but nobody acknowledged them.
        assert [a.kind for a in open_alarms(conn)] == ["alarm", "fault"]
        assert [a.kind for a in open_alarms(conn, city="Jiujiang")] == []


def test_a_clean_run_has_no_alarm(fleet):
    db_url, store = fleet
    store(_heartbeats(PANEL, T0, NOW) + [_up(PANEL, _component(T0 + timedelta(minutes=m), address=a), T0 +
                                               timedelta(minutes=m, seconds=1)) for m, a in ((3, 5), (40, 6))]
          + [_up(SMOKE, _component(T0, short=True), T0 + timedelta(seconds=3))])
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert update_alarms(conn).inserted == 0
        assert _rows(conn) == [] and _hand_count(conn) == []


def test_a_raise_stored_after_its_restore_makes_one_alarm(fleet):
    db_url, store = fleet
    raised, restored = T0 + timedelta(minutes=10), T0 + timedelta(minutes=12)
    # The NB detector's alarm frame is delayed three hours (coverage); its restore arrives at once.
    store([_up(SMOKE, _component(restored, short=True), restored + timedelta(seconds=4))])
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert update_alarms(conn).inserted == 0
        store([_up(SMOKE, _component(raised, fire=True, short=True), raised + timedelta(hours=3))])
        assert update_alarms(conn).inserted == 1
        (row,) = _rows(conn)
        assert row[1:8] == (DETECTOR, "alarm", raised, raised + timedelta(hours=3), restored, restored, "device")
        assert [(r[0], r[1], r[2], r[3], r[5]) for r in _rows(conn)] == _hand_count(conn)


def test_a_late_raise_moves_raised_at_and_a_late_restore_splits(fleet):
    db_url, store = fleet
    at = [T0 + timedelta(minutes=m) for m in (0, 5, 10, 20)]
    # Seen first: the alarm repeated at +5 and +20 (heartbeat-like), nothing else yet.
    store([_up(SMOKE, _component(at[1], fire=True, short=True), at[1] + timedelta(seconds=1)),
           _up(SMOKE, _component(at[3], fire=True, short=True, serial=3), at[3] + timedelta(seconds=1))])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_alarms(conn)
        (first,) = conn.execute("SELECT alarm_id FROM fire_alarms").fetchall()
        acknowledge(conn, first[0], "op:li", at=at[1] + timedelta(seconds=30))
        # The raise at +0 arrives late: same alarm, raised earlier, its acknowledgement kept.
        store([_up(SMOKE, _component(at[0], fire=True, short=True, serial=1), NOW - timedelta(minutes=1))])
        update_alarms(conn)
        assert conn.execute("SELECT alarm_id, raised_at, acked_by FROM fire_alarms").fetchall() == \
            [(first[0], at[0], "op:li")]
        # A restore at +10 arrives late: two episodes, the second still active.
        store([_up(SMOKE, _component(at[2], short=True, serial=2), NOW)])
        update_alarms(conn)
        rows = _rows(conn)
        assert [(r[3], r[5], r[8]) for r in rows] == [(at[0], at[2], "cleared"), (at[3], None, "active_unacked")]
        assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == _hand_count(conn)


def test_duplicates_reruns_and_two_threads_give_the_same_rows(fleet):
    db_url, store = fleet
    t = _planted(store)
    again = store([_up(PANEL, _component(t["alarm"], fire=True, serial=1001), t["alarm"] + timedelta(seconds=2))])
    assert again["stored"] == 0 and again["duplicate"] == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_alarms(conn)
        once = _rows(conn)
        assert update_alarms(conn).inserted == 0 and _rows(conn) == once
        assert update_alarms(conn, full=True).updated == 0 and _rows(conn) == once
        conn.execute("TRUNCATE fire_alarms, fire_alarm_progress")
    barrier, results = threading.Barrier(2), []

    def run() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            results.append(update_alarms(c))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(r.inserted for r in results) == [0, 2]
    with psycopg.connect(db_url) as conn:
        assert [r[1:] for r in _rows(conn)] == [r[1:] for r in once]


def test_acknowledge_and_clear_transitions(fleet):
    db_url, store = fleet
    a1, a2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    store([_up(PANEL, _component(a1, fire=True, address=1), a1 + timedelta(seconds=1)),
           _up(PANEL, _component(a2, fire=True, address=2), a2 + timedelta(seconds=1))])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_alarms(conn)
        one, two = (r[0] for r in conn.execute("SELECT alarm_id FROM fire_alarms ORDER BY component_address"))
        assert get_alarm(conn, one).state == "active_unacked"
        with pytest.raises(InvalidTransition, match="centre received it"):
            acknowledge(conn, one, "op:wang", at=a1)
        acked = acknowledge(conn, one, "op:wang", at=a1 + timedelta(seconds=5))
        assert (acked.state, acked.acked_by) == ("active_acked", "op:wang")
        with pytest.raises(InvalidTransition, match="acknowledged by op:wang"):
            acknowledge(conn, one, "op:zhao")
        done = clear(conn, one, "op:zhao", false_alarm=True, note="厨房油烟")
        assert (done.state, done.cleared_by, done.false_alarm, done.acked_by) == ("cleared", "op:zhao", True, "op:wang")
        with pytest.raises(InvalidTransition, match="already cleared by op:zhao"):
            clear(conn, one, "op:wang", false_alarm=False)
        # Cleared while unacknowledged: clearing acknowledges too.
        two_done = clear(conn, two, "op:li", false_alarm=False)
        assert (two_done.state, two_done.acked_by) == ("cleared", "op:li")
        with pytest.raises(AlarmNotFound):
            acknowledge(conn, 999_999, "op:li")
        with pytest.raises(ValueError, match="operator must be named"):
            acknowledge(conn, two, "device")
        # The device restores the operator-cleared alarm: the operator's clear stands, restored_at recorded.
        r = a1 + timedelta(minutes=9)
        store([_up(PANEL, _component(r, address=1), r + timedelta(seconds=1))])
        update_alarms(conn)
        after = get_alarm(conn, one)
        assert (after.state, after.cleared_by, after.restored_at) == ("cleared", "op:zhao", r)
        # A device-restored alarm (cleared_unacked) is acknowledged into cleared, then takes a verdict.
        a3 = T0 + timedelta(minutes=30)
        store([_up(PANEL, _component(a3, fire=True, address=3), a3 + timedelta(seconds=1)),
               _up(PANEL, _component(a3 + timedelta(minutes=1), address=3), a3 + timedelta(minutes=1, seconds=1))])
        update_alarms(conn)
        three = conn.execute("SELECT alarm_id FROM fire_alarms WHERE component_address = 3").fetchone()[0]
        assert get_alarm(conn, three).state == "cleared_unacked"
        assert acknowledge(conn, three, "op:li").state == "cleared"
        v = clear(conn, three, "op:li", false_alarm=True)
        assert (v.cleared_by, v.false_alarm) == ("device", True)


def test_kpis_equal_a_plain_sql_recount(fleet):
    db_url, store = fleet
    plan = [  # (device, address, ack after receive (s) or None, verdict)
        (PANEL, 1, 4.0, True), (PANEL, 2, 9.5, False), (PANEL, 3, 31.0, True), (PANEL2, 4, 12.0, None),
        (PANEL2, 5, None, None), (SMOKE, 6, 2.0, True), (SMOKE, 7, 61.0, True), (PANEL, 8, 10.0, None)]
    uplinks = []
    for k, (device, address, _, _) in enumerate(plan):
        at = T0 + timedelta(minutes=k)
        uplinks.append(_up(device, _component(at, fire=True, address=address, short=device == SMOKE),
                           at + timedelta(seconds=3)))
    fault_at = T0 + timedelta(minutes=30)               # a fault: never in the alarm KPIs
    uplinks.append(_up(PANEL, _component(fault_at, fault=True, address=9), fault_at + timedelta(seconds=1)))
    store(uplinks)
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_alarms(conn)
        ids = dict(conn.execute("SELECT component_address, alarm_id FROM fire_alarms WHERE kind = 'alarm'").fetchall())
        for k, (device, address, ack_s, verdict) in enumerate(plan):
            received = T0 + timedelta(minutes=k, seconds=3)
            if ack_s is not None:
                acknowledge(conn, ids[address], "op:k", at=received + timedelta(seconds=ack_s))
            if verdict is not None:
                clear(conn, ids[address], "op:k", false_alarm=verdict)
        fault_id = conn.execute("SELECT alarm_id FROM fire_alarms WHERE kind = 'fault'").fetchone()[0]
        acknowledge(conn, fault_id, "op:k", at=fault_at + timedelta(seconds=500))
        kpis = fire_kpis(conn, T0 - timedelta(hours=1), NOW)
        expect = conn.execute("""
            SELECT s.city_code, count(*), count(a.acked_at),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.acked_at - a.received_at)),
                   percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM a.acked_at - a.received_at)),
                   count(*) FILTER (WHERE a.acked_at - a.received_at <= interval '10 seconds')
            FROM fire_alarms a JOIN devices d USING (device_id) JOIN sites s USING (site_id)
            WHERE a.kind = 'alarm' GROUP BY 1 ORDER BY 1""").fetchall()
        got = [(c.city_code, c.alarms, c.acked, c.ack_p50_s, c.ack_p90_s, c.within_budget) for c in kpis.cities]
        assert [g[:3] + (g[5],) for g in got] == [(e[0], e[1], e[2], e[5]) for e in expect]
        for g, e in zip(got, expect):
            assert g[3] == pytest.approx(float(e[3])) and g[4] == pytest.approx(float(e[4]))
        nanchang = next(c for c in kpis.cities if c.city == "Nanchang")
        # Two panels: six alarms, five acknowledged (4, 9.5, 31, 12, 10 s), three of them within 10 s.
        assert (nanchang.alarms, nanchang.acked, nanchang.within_budget) == (6, 5, 3)
        assert nanchang.share_within_budget == pytest.approx(3 / 6)
        assert nanchang.ack_p50_s == pytest.approx(10.0)
        expect_sites = conn.execute("""
            SELECT d.site_id, count(*), count(a.false_alarm), count(*) FILTER (WHERE a.false_alarm)
            FROM fire_alarms a JOIN devices d USING (device_id)
            WHERE a.kind = 'alarm' GROUP BY 1 ORDER BY 1""").fetchall()
        assert sorted((s.site_id, s.alarms, s.with_verdict, s.false_alarms) for s in kpis.sites) == expect_sites
        panel_site = next(s for s in kpis.sites if s.site_name == "青山湖小区")
        assert panel_site.false_share == pytest.approx(2 / 3)
        assert [c.city for c in fire_kpis(conn, T0 - timedelta(hours=1), NOW, city="九江").cities] == ["Jiujiang"]
        assert fire_kpis(conn, NOW, NOW + timedelta(hours=1)).cities == ()


def test_offline_after_twice_the_heartbeat_interval(fleet):
    db_url, store = fleet
    last = NOW - timedelta(minutes=30)
    store([_up(PANEL, _beat(last), last)])
    with psycopg.connect(db_url, autocommit=True) as conn:
        def offline(now: datetime) -> list[str]:
            return [d.device_id for d in offline_devices(conn, now)]
        # The UITD's interval is 300 s: online up to 600 s after its last frame, offline after.
        assert PANEL not in offline(last + timedelta(seconds=600))
        assert PANEL in offline(last + timedelta(seconds=601))
        # Never heard: counted from installation; the NB detector's interval is a day.
        installed = T0 - timedelta(days=1)
        assert SILENT in offline(installed + timedelta(seconds=601)) and SMOKE not in offline(installed +
                                                                                               timedelta(days=2))
        assert SMOKE in offline(installed + timedelta(days=2, seconds=1))
        # At NOW the detector (installed 30 h ago, interval a day) is still expected within 2 days.
        assert [d.device_id for d in offline_devices(conn, NOW, city="Jiujiang")] == [SILENT]
        conn.execute("UPDATE devices SET status = 'inactive' WHERE device_id = %s", (SILENT,))
        assert SILENT not in offline(NOW)


def test_report_fire_prints_tables_and_csv(fleet, monkeypatch):
    from typer.testing import CliRunner

    from iotjx.cli import app
    from iotjx.settings import get_settings

    db_url, store = fleet
    at = NOW - timedelta(minutes=20)
    store([_up(PANEL, _component(at, fire=True, address=4), at + timedelta(seconds=1))])
    monkeypatch.setenv("IOTJX_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(app, ["report", "fire", "--city", "Nanchang"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "Open fire alarms and faults: 1" in shown.output and "4号烟感" in shown.output
        plain = runner.invoke(app, ["report", "fire", "--csv", "--section", "alarms"])
        assert plain.exit_code == 0, plain.output
        lines = plain.output.strip().splitlines()
        assert lines[0].startswith("alarm_id,state,kind,city") and len(lines) == 2 and ",active_unacked,alarm," in lines[1]
        offline = runner.invoke(app, ["report", "fire", "--csv", "--section", "offline"]).output.splitlines()
        # The panel last spoke 20 min ago (> 2 × 300 s); the NB detector is expected once a day.
        assert {line.split(",")[0] for line in offline[1:]} == {PANEL, PANEL2, SILENT}
        every = runner.invoke(app, ["report", "fire", "--csv"]).output
        assert [line for line in every.splitlines() if line.startswith("# ")] == \
            ["# alarms", "# offline", "# cities", "# sites"]
        bad = runner.invoke(app, ["report", "fire", "--city", "Atlantis"])
        assert bad.exit_code == 2 and "unknown city" in bad.output
    finally:
        get_settings.cache_clear()


def test_the_simulators_planted_alarms_and_faults_are_found(db_url):
    """A day of fire panels and NB smoke detectors from the simulator (duplicates, late and out-of-order
    uplinks, device clock errors) through the pipeline: every planted raise and restore is an alarm
    or fault with the time label of the frame the simulator labelled, and nothing else is."""
    import time
    from dataclasses import replace

    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    now = time.time()
    base = load_scenario("province-mix")
    fleets = []
    for f in base.fleets:
        if f.model.name == "gb26875-uitd" and f.options.get("kind") is None:
            fleets.append(replace(f, count=12, options={**f.options, "alarm_per_day": 3.0, "fault_per_day": 2.0}))
        elif f.model.name == "gb26875-nb-smoke":
            fleets.append(replace(f, count=40, options={**f.options, "alarm_per_day": 0.5, "fault_per_day": 0.3}))
    assert len(fleets) == 2
    behaviour = replace(fleets[0].behaviour, corrupt=0.0, duplicate=0.05, late=0.05)
    fleets = [replace(f, behaviour=behaviour) for f in fleets]
    scenario = replace(base, fleets=tuple(fleets), start=now - 86400 - 600, duration_s=86400)
    sim = Simulation(scenario)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, sim.device_records)
    records = [r for r in sim.records() if r.t <= now]
    expected: dict[tuple, datetime] = {}          # (device, component, kind, raised_at) -> restored_at or None
    open_: dict[tuple, tuple] = {}
    for r in sorted(records, key=lambda r: r.sent_t if r.sent_t is not None else r.t):
        obj = decoders.decode("gb26875", r.payload)["objects"]
        if not obj or "component_address" not in obj[0] or "state" not in obj[0]:
            continue
        comp = (r.device_id, obj[0]["component_address"])
        for label, kind, start in (("alarm", "alarm", True), ("restore", "alarm", False),
                                   ("fault", "fault", True), ("fault_restore", "fault", False)):
            if label not in r.labels or (r.device_id, comp, kind) in open_ and start:
                continue
            if start:
                key = (*comp, kind, obj[0]["time"])
                expected[key] = None
                open_[(r.device_id, comp, kind)] = key
            elif (r.device_id, comp, kind) in open_:
                expected[open_.pop((r.device_id, comp, kind))] = obj[0]["time"]
    assert sum(1 for k in expected if k[2] == "alarm") > 10 and sum(1 for k in expected if k[2] == "fault") > 10
    uplinks = [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t) for r in records]
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    half = len(uplinks) // 2                      # two runs: the second one incremental
    pipeline.process(uplinks[:half])
    with psycopg.connect(db_url, autocommit=True) as conn:
        update_alarms(conn)
        pipeline.process(uplinks[half:])
        update_alarms(conn)
        got = {(d, c, k, r): s for d, c, k, r, s in conn.execute(
            "SELECT device_id, component_address, kind, raised_at, restored_at FROM fire_alarms")}
    assert pipeline.counters["duplicate"] > 0
    # Some raises and restores arrived over ten minutes after they were sent (out of order).
    assert any(r.sent_t is not None and r.t - r.sent_t > 600 and {"alarm", "restore", "fault", "fault_restore"}
               & set(r.labels) for r in records)
    assert got == expected


def test_a_row_committed_later_than_the_margin_is_found_by_a_full_run(fleet):
    db_url, store = fleet
    store([_up(PANEL, _component(NOW - timedelta(minutes=1), address=5), NOW)])   # a component reports normal
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert update_alarms(conn, margin_s=600).read_to == NOW                    # the watermark follows the data
        # An alarm received three hours ago, committed only now (a long outage replayed from the spool).
        at = NOW - timedelta(hours=3)
        store([_up(PANEL, _component(at, fire=True), at + timedelta(seconds=1))])
        assert update_alarms(conn, margin_s=600).inserted == 0          # behind the watermark's margin
        assert update_alarms(conn).inserted == 0                        # the default margin (1 h) neither
        assert update_alarms(conn, full=True).inserted == 1
        assert update_alarms(conn, full=True).inserted == 0
