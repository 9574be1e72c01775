"""Scheduled analytics (analytics/schedule.py, `iotjx analytics run`): rounds against a real PostgreSQL with
frames stored through the real pipeline, checked against plain-SQL recounts (the fire and water tests'
own), reruns, two runners at once (threads and processes), a new reading between rounds, the loop in the
API process, the loop through an outage, the thresholds as settings and the CLI's exit codes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from analytics import fire, health, traffic, water
from analytics.schedule import STEPS, AnalyticsLoop, parse_steps, run_round
from analytics.water import RULES, WaterRules, classify
from api.app import create_app
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.settings import Settings
from tests.analytics.test_fire import PANEL, T0, _component, _hand_count, _up
from tests.analytics.test_water import _RECOUNT, _all_rows, _frame
from tests.helpers import wait_until

METER = "869000000000007"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def planted(db_url):
    """A UITD panel with an alarm (raised, restored) and a fault still open; a water meter read hourly for
    30 h with one reverse flow.  `store(uplinks)` sends more through the same pipeline."""
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [
            DeviceRecord(device_id=PANEL, model="gb26875-uitd", network="cat1", city="Nanchang",
                         site_kind="residential", site_name="青山湖小区", installed_at=T0 - timedelta(days=3)),
            DeviceRecord(device_id=METER, model="cjt188-nb-water-std", network="nbiot", city="Yingtan",
                         site_kind="residential", site_name="龙岗小区", installed_at=T0 - timedelta(days=3))])
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    fire_frames = [(T0 + timedelta(minutes=10), dict(fire=True)), (T0 + timedelta(minutes=25), {}),
                   (T0 + timedelta(hours=1), dict(fault=True))]
    uplinks = [_up(PANEL, _component(at, serial=900 + k, **flags), at + timedelta(seconds=2))
               for k, (at, flags) in enumerate(fire_frames)]
    start, m3 = T0 - timedelta(hours=24), 100.0
    for k in range(30):
        m3 += -0.2 if k == 12 else 0.05
        at = start + timedelta(hours=k)
        uplinks.append(_up(METER, _frame(at, round(m3, 2), serial=k), at + timedelta(seconds=5)))
    pipeline.process(uplinks)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM fire_events WHERE device_id = %s", (PANEL,)).fetchone()[0] == 3
        assert conn.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (METER,)).fetchone()[0] == 30
    return db_url, pipeline.process, start + timedelta(hours=29), m3


def _connect(url: str):
    return lambda: connect(url, autocommit=True)


def _fire_rows(conn) -> list[tuple]:
    return conn.execute("""SELECT device_id, component_address, kind, raised_at, restored_at, cleared_by, state
                           FROM fire_alarms ORDER BY 1, 2, 3, 4""").fetchall()


def _tables(conn) -> tuple:
    snapshots = conn.execute("SELECT day, how FROM coverage_snapshot_days ORDER BY day").fetchall()
    return _fire_rows(conn), _all_rows(conn), snapshots


def _check_against_recounts(conn) -> None:
    """fire_alarms as the plain-SQL episodes; water_daily as the plain-SQL recount; each alarm and alert
    once; the planted reverse flow alerted."""
    assert [(d, c, k, at) for d, c, k, at, *_ in _fire_rows(conn)] == [r[:4] for r in _hand_count(conn)]
    assert [r[4] for r in _fire_rows(conn)] == [r[4] for r in _hand_count(conn)]
    stored = {(d, day): (n, float(m3)) for d, day, n, m3 in conn.execute(
        "SELECT device_id, day, readings, consumption_m3 FROM water_daily")}
    recount = {(d, day): (n, float(m3)) for d, day, n, m3 in conn.execute(_RECOUNT)}
    assert stored.keys() == recount.keys() and stored
    for k in stored:
        assert stored[k][0] == recount[k][0] and stored[k][1] == pytest.approx(recount[k][1], abs=1e-6), k
    assert conn.execute("""SELECT count(*) FROM (SELECT 1 FROM fire_alarms GROUP BY device_id, component_address,
                           kind, raised_at HAVING count(*) > 1) x""").fetchone()[0] == 0
    assert conn.execute("""SELECT count(*) FROM (SELECT 1 FROM water_alerts GROUP BY device_id, kind, opened_at
                           HAVING count(*) > 1) x""").fetchone()[0] == 0
    assert [k for (k,) in conn.execute("SELECT kind FROM water_alerts WHERE device_id = %s", (METER,))] == ["reverse_flow"]


# --------------------------------------------------------------------------- rounds

def test_a_round_twice_gives_the_same_tables_as_the_recounts(planted):
    db_url, _, _, _ = planted
    settings = Settings(database_url=db_url)
    first = run_round(_connect(db_url), settings, wait=True)
    assert first.ok and not first.skipped and [s.name for s in first.steps] == list(STEPS)
    fire_step, water_step, coverage_step = first.steps
    assert fire_step.rows == 2 and water_step.rows > 0
    assert coverage_step.rows == 1                  # yesterday's snapshot: the first day ever taken
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)
        after_first = _tables(conn)
    second = run_round(_connect(db_url), settings, wait=True)
    assert second.ok and second.steps[0].rows == 0 and second.steps[2].rows == 0
    with psycopg.connect(db_url) as conn:
        assert _tables(conn) == after_first
    full = run_round(_connect(db_url), settings, wait=True, full=True, steps=("fire", "water"))
    assert full.ok
    with psycopg.connect(db_url) as conn:
        assert _tables(conn) == after_first


def test_a_new_reading_between_rounds_is_picked_up(planted):
    db_url, store, last_at, m3 = planted
    settings = Settings(database_url=db_url)
    assert run_round(_connect(db_url), settings, steps=("fire", "water")).ok
    # the fault is repaired, a new alarm on another detector, the meter reads 0.40 m³ more
    later = T0 + timedelta(hours=2)
    store([_up(PANEL, _component(later, serial=950), later + timedelta(seconds=2)),
           _up(PANEL, _component(later, fire=True, address=18, serial=951), later + timedelta(seconds=2)),
           _up(METER, _frame(last_at + timedelta(hours=1), round(m3 + 0.40, 2), serial=77),
               last_at + timedelta(hours=1, seconds=5))])
    result = run_round(_connect(db_url), settings, steps=("fire", "water"))
    assert result.ok and result.steps[0].rows == 2          # one new alarm, one fault restored
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)
        assert {(c, k, state) for _, c, k, _, _, _, state in _fire_rows(conn)} == {
            (17, "alarm", "cleared_unacked"), (17, "fault", "cleared_unacked"), (18, "alarm", "active_unacked")}


def test_two_runners_at_once_write_each_alarm_and_alert_once(planted):
    db_url, _, _, _ = planted
    settings = Settings(database_url=db_url)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def run(wait: bool) -> None:
        try:
            barrier.wait()
            results.append((wait, run_round(_connect(db_url), settings, wait=wait)))
        except BaseException as exc:       # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(w,)) for w in (False, False, True, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(r.ok for _, r in results)
    assert all(not r.skipped for w, r in results if w)      # a waiting runner always runs
    ran = [r for _, r in results if not r.skipped]
    assert sum(r.steps[0].rows for r in ran) == 2           # the two episodes inserted once between them
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)


def test_two_cli_processes_at_once(planted):
    db_url, _, _, _ = planted
    env = {**os.environ, "IOTJX_DATABASE_URL": db_url, "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "iotjx.cli", "analytics", "run", "--once"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("fire" in o and "water" in o and "coverage" in o and "Traceback" not in o for o in outs)
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)


def test_only_runs_the_steps_named(planted):
    db_url, _, _, _ = planted
    result = run_round(_connect(db_url), Settings(database_url=db_url), steps=parse_steps("water"))
    assert [s.name for s in result.steps] == ["water"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM fire_alarms").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM water_daily").fetchone()[0] > 0
    assert parse_steps(" Water , fire") == ("fire", "water") and parse_steps(None) == STEPS
    with pytest.raises(ValueError, match="unknown analytics step.*'leaks'.*known: fire, water, coverage"):
        parse_steps("fire,leaks")


def test_a_failing_step_is_reported_and_the_others_run(planted, monkeypatch):
    db_url, _, _, _ = planted

    def broken(conn, **kwargs):
        raise RuntimeError("water broke")
    monkeypatch.setattr(water, "update_water", broken)
    result = run_round(_connect(db_url), Settings(database_url=db_url), steps=("water", "fire"))
    assert not result.ok
    assert [(s.name, s.error) for s in result.steps] == [("water", "RuntimeError: water broke"), ("fire", None)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM fire_alarms").fetchone()[0] == 2


# --------------------------------------------------------------------------- the loops

def test_the_loop_survives_an_outage_and_logs_it_once(planted, caplog):
    db_url, _, _, _ = planted
    up = {"db": False}

    @contextmanager
    def flaky():
        with connect(db_url if up["db"] else "postgresql://postgres@127.0.0.1:1/none", autocommit=True) as conn:
            yield conn
    loop = AnalyticsLoop(flaky, Settings(database_url=db_url), steps=("fire", "water"), interval_s=60)
    with caplog.at_level(logging.INFO, logger="analytics.schedule"):
        assert loop.run_once() is None and loop.run_once() is None and loop.run_once() is None
        up["db"] = True
        result = loop.run_once()
    assert result is not None and result.ok and loop.rounds == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("does not answer" in m for m in messages) == 1
    assert sum("rounds run again" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)


def test_the_api_runs_the_loop(planted, settings):
    db_url, _, _, _ = planted
    app = create_app(settings.model_copy(update={"analytics_interval_s": 0.2}))
    with TestClient(app):
        assert wait_until(lambda: app.state.analytics.rounds >= 2, timeout=60)
        assert app.state.analytics.last.ok
    with psycopg.connect(db_url) as conn:
        _check_against_recounts(conn)


def test_the_loop_is_off_at_zero(settings):
    loop = AnalyticsLoop(_connect(settings.database_url), settings.model_copy(update={"analytics_interval_s": 0}))
    loop.start()
    assert loop._thread is None
    loop.stop()


# --------------------------------------------------------------------------- thresholds as settings

def test_the_settings_defaults_are_the_modules_constants():
    s = Settings()
    assert s.water_rules == RULES == WaterRules()
    assert s.water_night_window == water.NIGHT_WINDOW
    assert s.water_rules.context_s == water.CONTEXT_S
    assert s.fire_offline_factor == fire.OFFLINE_FACTOR
    assert (s.traffic_overstay_s, s.traffic_hold_factor) == (traffic.OVERSTAY_S, traffic.HOLD_FACTOR)
    assert s.speed_bands == traffic.GRADE_SPEED_BANDS
    assert s.battery_thresholds == {"smoke_low_mv": health.SMOKE_LOW_MV, "parking_low_mv": health.PARKING_LOW_MV,
                                    "low_pct": health.LOW_PCT}
    assert s.analytics_interval_s == 60


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("IOTJX_WATER_NIGHT_START_H", "1")
    monkeypatch.setenv("IOTJX_WATER_NIGHT_END_H", "5")
    monkeypatch.setenv("IOTJX_WATER_REVERSE_MAX_M3", "2.5")
    monkeypatch.setenv("IOTJX_TRAFFIC_SPEED_BANDS", '{"arterial": [50, 40, 30, 20]}')
    s = Settings()
    assert s.water_night_window == (1, 5)
    assert s.water_rules.reverse_max_m3 == 2.5
    assert s.speed_bands["arterial"] == (50, 40, 30, 20)
    assert s.speed_bands["expressway"] == traffic.GRADE_SPEED_BANDS["expressway"]     # the others kept
    assert traffic.congestion_grade(45.0, "arterial", s.speed_bands) == "basically_smooth"
    assert traffic.congestion_grade(45.0, "arterial") == "smooth"


@pytest.mark.parametrize(("values", "reason"), [
    ({"water_night_start_h": 4, "water_night_end_h": 2}, "water_night_end_h .* must be after water_night_start_h"),
    ({"water_night_end_h": 25}, "less than or equal to 24"),
    ({"water_leakage_percentile": 1.5}, "less than 1"),
    ({"water_stopped_days": 0}, "greater than or equal to 1"),
    ({"water_reverse_max_m3": 0}, "greater than 0"),
    ({"fire_offline_factor": -1}, "greater than 0"),
    ({"analytics_interval_s": -5}, "greater than or equal to 0"),
    ({"traffic_speed_bands": {"arterial": [10, 20, 30, 40]}}, "must be 4 falling positive lower edges"),
    ({"traffic_speed_bands": {"arterial": [40, 30]}}, "traffic_speed_bands"),
    ({"battery_low_pct": 120}, "less than or equal to 100"),
])
def test_a_bad_threshold_is_refused_with_its_reason(values, reason):
    with pytest.raises(ValidationError, match=reason):
        Settings(**values)


def test_the_functions_take_the_thresholds():
    # a 3 m³ drop: a new series by default, reverse flow when the tolerance is 5 m³
    assert classify("a", 100.0, "a", 97.0) == (0.0, "new_series")
    assert classify("a", 100.0, "a", 97.0, rules=WaterRules(reverse_max_m3=5.0)) == (pytest.approx(-3.0), "reverse")
    assert classify("a", 100.0, "b", 12.0, rules=WaterRules(new_meter_max_m3=20.0)) == (12.0, "new_series")
    assert WaterRules(stopped_days=2).context_s == 3 * 86400.0
    with pytest.raises(ValueError, match="leakage_percentile must be in"):
        WaterRules(leakage_percentile=0)


def test_a_bad_setting_stops_the_cli_with_its_reason():
    env = {**os.environ, "IOTJX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "IOTJX_WATER_NIGHT_START_H": "6"}
    out = subprocess.run([sys.executable, "-m", "iotjx.cli", "analytics", "run", "--once"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "invalid settings" in out.stdout and "must be after water_night_start_h" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


# --------------------------------------------------------------------------- the CLI's refusals

def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iotjx.cli", "analytics", "run", *args], cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200", **env}, capture_output=True, text=True, timeout=120)


def test_the_cli_says_when_the_database_is_unreachable():
    out = _cli("--once", IOTJX_DATABASE_URL="postgresql://postgres:pw@127.0.0.1:1/none")
    assert out.returncode == 1
    assert "analytics not run: cannot reach the database at postgresql://postgres:***@127.0.0.1:1/none" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr and "pw@" not in out.stdout


def test_the_cli_refuses_bad_options(db_url):
    assert "unknown analytics step(s) 'leaks'" in _cli("--once", "--only", "leaks", IOTJX_DATABASE_URL=db_url).stdout
    assert _cli("--full", IOTJX_DATABASE_URL=db_url).returncode == 2
    zero = _cli(IOTJX_DATABASE_URL=db_url, IOTJX_ANALYTICS_INTERVAL_S="0")
    assert zero.returncode == 2 and "give --every SECONDS, or --once" in zero.stdout


# --------------------------------------------------------------------------- the shared incremental frame

def test_the_watermark_never_moves_back_and_the_margin_is_behind_it(db_url):
    from datetime import UTC, datetime

    from psycopg.rows import dict_row

    from analytics.incremental import advance, begin
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for seen, want_since, want in ((None, None, None), (t, None, t), (t - timedelta(hours=5), t - timedelta(hours=1), t),
                                       (t + timedelta(minutes=1), t - timedelta(hours=1), t + timedelta(minutes=1))):
            with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                run = begin(cur, lock_id=1, progress_table="water_progress", touched_table="water_touched",
                            margin_s=3600, full=False)
                assert run.since == want_since
                assert advance(cur, run, seen) == want
            assert conn.execute("SELECT max(read_to) FROM water_progress").fetchone()[0] == want
        with pytest.raises(ValueError, match="margin_s must be >= 0"), conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            begin(cur, lock_id=1, progress_table="water_progress", touched_table="water_touched", margin_s=-1, full=False)
