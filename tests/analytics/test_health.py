"""Device health (analytics/health.py) over devices of every family stored through the real pipeline:
online rates, silent and malformed-only devices, battery states and uplink success, each held equal to
a plain-SQL recount written apart (and to the planted story)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

import decoders
from analytics.health import (PARKING_LOW_MV, SMOKE_LOW_MV, batteries, health_report, not_live, online_rates,
                              uplink_success)
from decoders.gb26875_layout import ANALOG_VALUE, COMPONENT_STATE
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink

NOW = datetime.now(UTC).replace(microsecond=0)
INSTALLED = NOW - timedelta(days=3)


@pytest.fixture(autouse=True)
def _now():
    """NOW is each test's own start: the story is told relative to it, and the CLI (which reads the real
    clock) must see it fresh, not as it was when a long run imported this module."""
    global NOW, INSTALLED
    NOW = datetime.now(UTC).replace(microsecond=0)
    INSTALLED = NOW - timedelta(days=3)
FACTOR = 1.5
TZ = ZoneInfo("Asia/Shanghai")
H = timedelta(hours=1)

# Water meters report daily (live within 36 h), parking sensors hourly (90 min), NB smoke detectors daily.
W_LOW, W_OK, W_SILENT, W_NEVER, W_BAD = (f"86900000000010{k}" for k in range(5))
P_MV, P_BIT, P_OK, P_HALF, P_JSON = (f"86900000000020{k}" for k in range(5))
S_LOW, S_OK, S_BAD = (f"86900000000030{k}" for k in range(3))
W_OFF = "869000000000199"                       # inactive: registered, in no denominator, never listed
UITD = "869000000000400"                        # a panel with no battery: unknown


def _meter(device: str, k: int, *, battery_low: bool = False) -> bytes:
    return decoders.encode("cjt188", {"meter_address": device[-14:], "flow_m3": k / 100,
                                      "meter_time": NOW - timedelta(days=10), "status": 4 if battery_low else 0})


def _parking(k: int, *, kind: str = "keep_alive", battery_low: bool = False, mv: int | None = None) -> bytes:
    return decoders.encode("parking", {"frame_kind": kind, "occupied": k % 2 == 1, "battery_low": battery_low,
                                       "frame_counter": k % 256, "battery_mv": mv, "node_hour": k % 24,
                                       "node_minute": k % 60})


def _smoke(k: int, at: datetime, battery_mv: int) -> list[bytes]:
    """One daily wake-up of an NB smoke detector: a short component state, then its vendor analog values."""
    state = {"system_type": 1, "system_address": 0, "component_type": 0x28, "component_address": 4242, "time": at,
             "flags": {"normal_running": True, "fire_alarm": False, "fault": False, "started": False}}
    frame = {"serial": 2 * k, "version": "2.255", "sent_at": at, "source_address": 7, "command": 2,
             "app_type": COMPONENT_STATE, "objects": [state], "with_description": False}
    analog = [{"system_type": 1, "system_address": 0, "component_type": 0x28, "component_address": 4242, "time": at,
               "analog_type": t, "raw": raw} for t, raw in ((0x80, -95), (0x88, battery_mv))]
    return [decoders.encode("gb26875", frame),
            decoders.encode("gb26875", {**frame, "serial": 2 * k + 1, "app_type": ANALOG_VALUE, "objects": analog})]


def _up(device: str, payload: bytes, at: datetime) -> Uplink:
    return Uplink(device_id=device, payload=payload, transport="mqtt", received_at=at.timestamp())


def _process(db_url: str, uplinks: list[Uplink], **options) -> dict[str, int]:
    """Store `uplinks` through the real pipeline; its counters.  Its connections are closed after."""
    registry, writer = DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))
    try:
        pipeline = Pipeline(registry, writer, **options)
        pipeline.process(uplinks)
        return dict(pipeline.counters)
    finally:
        writer.close()
        registry.close()


def _records() -> list[DeviceRecord]:
    def r(device: str, model: str, city: str, **kw) -> DeviceRecord:
        return DeviceRecord(device_id=device, model=model, city=city, site_kind="residential",
                            site_name=f"{city}小区", installed_at=kw.pop("installed_at", INSTALLED), **kw)
    water, park, smoke = "cjt188-nb-water-std", "nb-parking-sensor", "gb26875-nb-smoke"
    return [r(W_LOW, water, "Yingtan"), r(W_OK, water, "Yingtan"), r(W_SILENT, water, "Yingtan"),
            r(W_NEVER, water, "Nanchang"), r(W_BAD, water, "Nanchang"), r(W_OFF, water, "Yingtan", status="inactive"),
            r(P_MV, park, "Nanchang"), r(P_BIT, park, "Nanchang"), r(P_OK, park, "Nanchang"),
            r(P_HALF, park, "Yingtan"), r(P_JSON, "cat1-json-parking", "Yingtan"),
            r(S_LOW, smoke, "Jiujiang"), r(S_OK, smoke, "Jiujiang"), r(S_BAD, smoke, "Jiujiang"),
            r(UITD, "gb26875-uitd", "Jiujiang", installed_at=NOW - 2 * H)]


def _story() -> tuple[list[Uplink], list[Uplink]]:
    """(uplinks that are stored, uplinks that are rejected)."""
    ok, bad = [], []
    for day in range(3):                                    # water: a reading a day at NOW − 2 h − day
        at = NOW - 2 * H - timedelta(days=day)
        ok.append(_up(W_LOW, _meter(W_LOW, day, battery_low=day == 0), at))     # the latest says low
        ok.append(_up(W_OK, _meter(W_OK, 10 + day, battery_low=day == 2), at))  # low long ago, ok since
    ok.append(_up(W_SILENT, _meter(W_SILENT, 20), NOW - timedelta(days=2)))      # silent for 48 h > 36 h
    bad.append(_up(W_SILENT, b"\x68garbage", NOW - timedelta(hours=40)))        # a reject outside its window
    bad += [_up(W_BAD, b"not a frame %d" % k, NOW - timedelta(hours=k)) for k in (1, 5)]
    bad.append(_up(W_BAD, b"\x68\x10", NOW - timedelta(minutes=30)))            # the last reject
    for k in range(24):                                     # parking: hourly for 24 h (P_HALF: every other)
        at = NOW - timedelta(hours=24) + k * H + timedelta(minutes=5)
        ok.append(_up(P_OK, _parking(k, kind="info" if k == 23 else "keep_alive", mv=3500), at))
        ok.append(_up(P_MV, _parking(k, kind="info", mv=3600 if k < 23 else 3200), at))
        ok.append(_up(P_BIT, _parking(k, battery_low=k >= 20), at))
        if k % 2:
            ok.append(_up(P_HALF, _parking(k), at))
    ok.append(_up(P_JSON, json.dumps({"status": 1, "battery": 12, "time": int(NOW.timestamp()) - 600}).encode(),
                  NOW - timedelta(minutes=9)))
    for day in range(2):                                    # smoke: one wake-up a day, the last 1 h ago
        at = NOW - H - timedelta(days=day)
        for dev, mv in ((S_LOW, 2700 if day == 0 else 3000), (S_OK, 3050)):
            ok += [_up(dev, p, at + timedelta(seconds=i)) for i, p in enumerate(_smoke(day, at, mv))]
    ok.append(_up(S_BAD, _smoke(0, NOW - timedelta(days=2), 3000)[0], NOW - timedelta(days=2)))
    bad.append(_up(S_BAD, _smoke(1, NOW - H, 3000)[1][:-3], NOW - H))           # cut frame: rejected
    return ok, bad


@pytest.fixture
def fleet(db_url):
    """The story above stored through the pipeline; an autocommit connection to it."""
    with psycopg.connect(db_url) as conn:
        register_devices(conn, _records())
    ok, bad = _story()
    counters = _process(db_url, ok + bad)
    assert counters["stored"] == len(ok) and counters["rejected"] == len(bad), counters
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


# --------------------------------------------------------------------------- online rate

def test_online_rate_equals_a_plain_sql_count_of_live_over_active(fleet):
    got = {(r.city_code, r.pilot, r.network): (r.active, r.online, r.rate)
           for r in online_rates(fleet, live_factor=FACTOR, tz=TZ, now=NOW)}
    want = {}
    for city, pilot, network, active, live in fleet.execute("""
            SELECT s.city_code, d.pilot, d.network, count(*) FILTER (WHERE d.status = 'active'),
                   count(*) FILTER (WHERE d.status = 'active' AND EXISTS (
                       SELECT 1 FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                         AND r.received_at >= %(t)s - interval '1 second' * %(f)s
                             * coalesce(d.reporting_interval_s, m.reporting_interval_s)))
            FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
            GROUP BY 1, 2, 3""", {"t": NOW, "f": FACTOR}):
        want[(city, pilot, network)] = (active, live, live / active if active else None)
    assert got == want
    # the story: Yingtan water 2 live of 3 active (the inactive meter in no denominator)
    assert got[(360600, "water", "nbiot")] == (3, 2, pytest.approx(2 / 3))
    assert got[(360100, "water", "nbiot")] == (2, 0, 0.0)
    assert got[(360400, "fire", "nbiot")][:2] == (3, 2)


def test_online_rate_for_one_city(fleet):
    rows = online_rates(fleet, live_factor=FACTOR, tz=TZ, now=NOW, city="Nanchang")
    assert {r.city_code for r in rows} == {360100}
    assert {(r.pilot, r.network): (r.active, r.online) for r in rows} == {("water", "nbiot"): (2, 0),
                                                                          ("traffic", "nbiot"): (3, 3)}


# --------------------------------------------------------------------------- silent and malformed

def test_silent_and_malformed_equal_a_plain_sql_recount(fleet):
    silent, malformed = not_live(fleet, NOW, live_factor=FACTOR)
    recount = fleet.execute("""
        SELECT d.device_id, max(r.received_at) AS last_stored, d.installed_at,
               (SELECT count(*) FROM rejected_uplinks x WHERE x.device_id = d.device_id
                  AND x.received_at > %(t)s - interval '1 second' * %(f)s * m.reporting_interval_s
                  AND x.received_at <= %(t)s) AS rejects,
               (SELECT x.reason FROM rejected_uplinks x WHERE x.device_id = d.device_id
                  AND x.received_at <= %(t)s ORDER BY x.received_at DESC LIMIT 1) AS last_reason
        FROM devices d JOIN device_models m USING (model)
        LEFT JOIN raw_uplinks r ON r.device_id = d.device_id AND r.outcome = 'stored'
        WHERE d.status = 'active' AND d.installed_at <= %(t)s
        GROUP BY d.device_id, d.installed_at, m.reporting_interval_s
        HAVING coalesce(max(r.received_at) < %(t)s - interval '1 second' * %(f)s * m.reporting_interval_s, true)
        ORDER BY d.device_id""", {"t": NOW, "f": FACTOR}).fetchall()
    want_silent = {d: (last or inst) for d, last, inst, n, _ in recount if n == 0}
    want_bad = {d: (last or inst, n, reason) for d, last, inst, n, reason in recount if n > 0}
    assert {s.device_id: s.since for s in silent} == want_silent
    assert {s.device_id: (s.since, s.rejects, s.last_reason) for s in malformed} == want_bad
    # the story
    assert set(want_silent) == {W_SILENT, W_NEVER, UITD}
    assert set(want_bad) == {W_BAD, S_BAD}


def test_a_device_sending_only_malformed_frames_is_not_silent(fleet):
    silent, malformed = not_live(fleet, NOW, live_factor=FACTOR)
    assert W_BAD not in {s.device_id for s in silent}
    bad = {s.device_id: s for s in malformed}[W_BAD]
    assert bad.malformed and bad.rejects == 3 and bad.last_seen is None and bad.since == INSTALLED
    assert bad.last_reject_at == NOW - timedelta(minutes=30)
    last = fleet.execute("SELECT reason, detail FROM rejected_uplinks WHERE device_id = %s "
                         "ORDER BY received_at DESC LIMIT 1", (W_BAD,)).fetchone()
    assert (bad.last_reason, bad.last_detail) == last
    smoke = {s.device_id: s for s in malformed}[S_BAD]
    assert smoke.last_seen == NOW - timedelta(days=2) and smoke.rejects == 1
    # a reject older than the device's live window does not make a silent device a malformed sender
    old = {s.device_id: s for s in silent}[W_SILENT]
    assert not old.malformed and old.rejects == 0 and old.since == NOW - timedelta(days=2)
    assert old.silent_s == pytest.approx(2 * 86400)
    never = {s.device_id: s for s in silent}[W_NEVER]
    assert never.last_seen is None and never.since == INSTALLED


# --------------------------------------------------------------------------- battery

def test_battery_equals_a_plain_sql_recount_of_each_shape(fleet):
    got = {b.device_id: (b.state, b.value, b.unit) for b in batteries(fleet, NOW)}
    want = {}
    for dev, low in fleet.execute("""SELECT DISTINCT ON (device_id) device_id, battery_low FROM water_readings
                                     WHERE battery_low IS NOT NULL ORDER BY device_id, time DESC"""):
        want[dev] = ("low" if low else "ok", None, None)
    for dev, low, mv in fleet.execute("""
            SELECT DISTINCT ON (device_id) device_id, battery_low, battery_mv FROM parking_events
            WHERE battery_low IS NOT NULL OR battery_mv IS NOT NULL ORDER BY device_id, time DESC"""):
        is_low = bool(low) or (mv is not None and mv < PARKING_LOW_MV)
        want[dev] = ("low" if is_low else "ok", None if mv is None else float(mv), None if mv is None else "mV")
    for dev, mv in fleet.execute("""SELECT DISTINCT ON (device_id) device_id, analog_value FROM fire_events
                                    WHERE analog_type = 136 ORDER BY device_id, time DESC"""):
        want[dev] = ("low" if mv < SMOKE_LOW_MV else "ok", mv, "mV")
    for dev, pct in fleet.execute("""SELECT device_id, (extra->>'battery_pct')::float8 FROM parking_events
                                     WHERE extra ? 'battery_pct'"""):
        want[dev] = ("low" if pct < 20 else "ok", pct, "%")
    active = [r[0] for r in fleet.execute("SELECT device_id FROM devices WHERE status = 'active'")]
    assert got == {d: want.get(d, ("unknown", None, None)) for d in active}
    # the story: low in each shape, ok where the latest reading says so, unknown without one
    assert {d for d, (s, _, _) in got.items() if s == "low"} == {W_LOW, P_MV, P_BIT, S_LOW, P_JSON}
    assert got[W_OK] == ("ok", None, None)               # low two days ago, ok in its latest reading
    assert got[P_MV] == ("low", 3200.0, "mV")            # the bit says ok, the voltage says low
    assert got[P_BIT][0] == "low"                        # the bit alone
    assert got[S_LOW] == ("low", 2700.0, "mV") and got[S_OK] == ("ok", 3050.0, "mV")
    assert got[P_JSON] == ("low", 12.0, "%")
    assert got[UITD] == got[W_NEVER] == ("unknown", None, None)
    assert W_OFF not in got


# --------------------------------------------------------------------------- uplink success

def test_uplink_success_equals_received_over_expected(fleet):
    since, until = NOW - timedelta(hours=24), NOW
    got = {u.device_id: u for u in uplink_success(fleet, since, until)}
    assert got[P_HALF].expected == 24 and got[P_HALF].received == 12
    assert got[P_HALF].success == pytest.approx(0.5)
    assert got[P_OK].success == 1.0 and got[P_MV].success == 1.0
    assert got[S_LOW].received == 2 and got[S_LOW].expected == 1 and got[S_LOW].success == 1.0   # capped
    assert got[W_NEVER].success == 0.0
    assert got[UITD].counted_from == NOW - 2 * H and got[UITD].expected == 24 and got[UITD].success == 0.0
    for dev, received, expected in fleet.execute("""
            SELECT d.device_id,
                   (SELECT count(*) FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                      AND r.received_at >= greatest(%(s)s, d.installed_at) AND r.received_at < %(u)s),
                   floor(extract(epoch FROM %(u)s - greatest(%(s)s, d.installed_at))
                         / coalesce(d.reporting_interval_s, m.reporting_interval_s))::int
            FROM devices d JOIN device_models m USING (model) WHERE d.status = 'active'""", {"s": since, "u": until}):
        assert (got[dev].received, got[dev].expected) == (received, expected), dev
        assert got[dev].success == (min(1.0, received / expected) if expected else None), dev


@pytest.mark.parametrize("days", [2, 4])
def test_uplink_success_over_days_equals_plain_sql_over_the_raw_log(fleet, days):
    since, until = NOW - timedelta(days=days, hours=5), NOW
    got = {u.device_id: u.received for u in uplink_success(fleet, since, until)}
    plain = {d: n for d, n in fleet.execute("""
        SELECT d.device_id, (SELECT count(*) FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                               AND r.received_at >= greatest(%(s)s, d.installed_at) AND r.received_at < %(u)s)
          FROM devices d WHERE d.status = 'active'""", {"s": since, "u": until})}
    assert got == plain and sum(got.values()) > 10


def test_uplink_success_with_nothing_expected_yet_has_no_figure(fleet):
    got = {u.device_id: u for u in uplink_success(fleet, NOW - timedelta(hours=1), NOW)}
    assert got[W_LOW].expected == 0 and got[W_LOW].success is None
    with pytest.raises(ValueError, match="must be after"):
        uplink_success(fleet, NOW, NOW)


# --------------------------------------------------------------------------- the report

def test_the_report_puts_each_device_in_one_list(fleet):
    report = health_report(fleet, live_factor=FACTOR, tz=TZ, now=NOW, city="Jiujiang")
    assert [s.device_id for s in report.malformed] == [S_BAD]
    assert [s.device_id for s in report.silent] == [UITD]     # installed 2 h ago, never heard (window 450 s)
    assert {b.device_id for b in report.batteries} == {S_LOW, S_OK, S_BAD, UITD}
    assert report.suppressed_rejects == 0
    with pytest.raises(ValueError, match="unknown city"):
        health_report(fleet, live_factor=FACTOR, tz=TZ, now=NOW, city="Atlantis")


def test_report_health_prints_tables_and_csv(fleet, monkeypatch):
    from typer.testing import CliRunner

    from iotjx.cli import app
    from iotjx.settings import get_settings

    db_url = fleet.info.dsn
    monkeypatch.setenv("IOTJX_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(app, ["report", "health", "--city", "Nanchang"], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "Devices sending only malformed frames (rejected within their live window): 1" in shown.output
        assert W_BAD in shown.output and "Battery low: 2" in shown.output       # P_MV, P_BIT
        silent = runner.invoke(app, ["report", "health", "--csv", "--section", "silent"]).output.splitlines()
        assert silent[0].startswith("device_id,model,city") and {s.split(",")[0] for s in silent[1:]} == \
            {W_SILENT, W_NEVER, UITD}
        low = runner.invoke(app, ["report", "health", "--csv", "--section", "battery"]).output.splitlines()
        assert {s.split(",")[0] for s in low[1:]} == {W_LOW, P_MV, P_BIT, S_LOW, P_JSON}
        every = runner.invoke(app, ["report", "health", "--csv"]).output
        assert [line for line in every.splitlines() if line.startswith("# ")] == \
            ["# online", "# silent", "# malformed", "# battery", "# success"]
        short = runner.invoke(app, ["report", "health", "--csv", "--section", "success", "--days", "1"])
        rows = {line.split(",")[0]: line.split(",")[-1] for line in short.output.splitlines()[1:]}
        assert rows[P_HALF] == "0.500" and P_OK not in rows and W_LOW not in rows and rows[W_NEVER] == "0.000"
        assert runner.invoke(app, ["report", "health", "--city", "Atlantis"]).exit_code == 2
        assert runner.invoke(app, ["report", "health", "--section", "radio"]).exit_code == 2
    finally:
        get_settings.cache_clear()


def test_rejects_only_tallied_have_no_device_and_are_counted_apart(db_url):
    """Past a source's reject rate the writer keeps no row, only reject_tally's count (no device id): the
    device behind such rejects cannot be told from a silent one, and the report says how many there were."""
    first, second = "869000000000501", "869000000000502"
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model="cjt188-nb-water-std", city="Yingtan",
                                             site_kind="residential", site_name="Yingtan小区", installed_at=INSTALLED)
                                for d in (first, second)])
    minute = NOW.replace(second=0) - 10 * timedelta(minutes=1)
    counters = _process(db_url, [_up(first, b"\x68\x10", minute + timedelta(seconds=1)),
                                 _up(second, b"\x68\x11", minute + timedelta(seconds=2))],   # same source, reason,
                        reject_rows_per_min=1)                                                  # minute
    assert counters["rejects_suppressed"] == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        silent, malformed = not_live(conn, NOW, live_factor=FACTOR)
        assert [d.device_id for d in malformed] == [first] and [d.device_id for d in silent] == [second]
        report = health_report(conn, live_factor=FACTOR, tz=TZ, now=NOW)
        assert report.suppressed_rejects == 1 == conn.execute("SELECT sum(suppressed) FROM reject_tally").fetchone()[0]
