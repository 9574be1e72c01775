"""Daily snapshots are taken once (twice in a row, or from two processes at once, gives one row per
target), a missed day is filled from the stored uplinks with the figures a same-day snapshot would have
had, and pace / verdicts follow their definitions."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

import decoders
from analytics.coverage import days_to_take, fill_snapshots, pace, take_snapshot
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from iotjx.settings import Settings
from iotjx.targets import CoverageTarget, DeviceCriteria, load_catalogue


def _meter(k: int) -> bytes:
    return decoders.encode("cjt188", {"meter_address": f"{k:014d}", "flow_m3": k / 100,
                                      "meter_time": datetime(2026, 11, 1, tzinfo=UTC)})


@pytest.fixture
def history(db_url):
    """Forty water meters in Yingtan installed ten days ago; meter k reports once a day until day k % 8
    before today, so the live count falls day after day."""
    now = time.time()
    installed = datetime.fromtimestamp(now - 10 * 86400, UTC)
    records = [DeviceRecord(device_id=f"8690000000{k:05d}", model="cjt188-nb-water-std", network="nbiot", city="Yingtan",
                            site_kind="residential", site_name="龙岗小区", installed_at=installed) for k in range(40)]
    with psycopg.connect(db_url) as conn:
        register_devices(conn, records)
    uplinks = []
    for k, r in enumerate(records):
        for day in range(9, k % 8, -1):
            uplinks.append(Uplink(device_id=r.device_id, payload=_meter(k * 100 + day), transport="mqtt",
                                  received_at=now - day * 86400))
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    pipeline.process(uplinks)
    assert pipeline.counters["stored"] == len(uplinks)
    return Settings(database_url=db_url, coverage_snapshot_delay_s=0)


def _rows(conn, day):
    return dict(conn.execute("SELECT target_id, value FROM coverage_snapshots WHERE day = %s", (day,)).fetchall())


def test_a_snapshot_is_taken_once(history):
    catalogue = load_catalogue()
    with psycopg.connect(history.database_url, autocommit=True) as conn:
        yesterday = datetime.now(history.tz).date() - timedelta(days=1)
        assert take_snapshot(conn, yesterday, catalogue, history) is True
        assert take_snapshot(conn, yesterday, catalogue, history) is False
        assert conn.execute("SELECT count(*) FROM coverage_snapshots WHERE day = %s", (yesterday,)).fetchone()[0] \
            == len(catalogue)
        with pytest.raises(ValueError, match="has not ended"):
            take_snapshot(conn, yesterday + timedelta(days=1), catalogue, history)


def test_two_processes_taking_the_same_day_at_once_write_it_once(history):
    catalogue = load_catalogue()
    day = datetime.now(history.tz).date() - timedelta(days=2)
    results, barrier = [], threading.Barrier(4)

    def take() -> None:
        with psycopg.connect(history.database_url, autocommit=True) as conn:
            barrier.wait()
            results.append(take_snapshot(conn, day, catalogue, history))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    with psycopg.connect(history.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM coverage_snapshots WHERE day = %s", (day,)).fetchone()[0] == len(catalogue)
        assert conn.execute("SELECT count(*) FROM coverage_snapshot_days WHERE day = %s", (day,)).fetchone()[0] == 1


def test_a_missed_day_is_filled_with_the_figures_it_would_have_had(history):
    catalogue = load_catalogue()
    today = datetime.now(history.tz).date()
    days = [today - timedelta(days=k) for k in (6, 5, 4, 3, 2, 1)]
    with psycopg.connect(history.database_url, autocommit=True) as conn:
        for d in days:
            take_snapshot(conn, d, catalogue, history)
        before = {d: _rows(conn, d) for d in days}
        conn.execute("DELETE FROM coverage_snapshot_days WHERE day IN (%s, %s)", (days[1], days[3]))
        assert days_to_take(conn, history) == [days[1], days[3]]
    # Two fillers at once: the lock lets one fill, the other finds nothing to do.
    out: list[list[date]] = []
    threads = [threading.Thread(target=lambda: out.append(fill_snapshots(lambda: psycopg.connect(history.database_url),
                                                                         catalogue, history))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d for taken in out for d in taken) == [days[1], days[3]]
    with psycopg.connect(history.database_url) as conn:
        assert {d: _rows(conn, d) for d in days} == before
        assert days_to_take(conn, history) == []
        # the live count fell day by day as meters went quiet: the history is not flat
        series = [before[d]["yingtan-water-nbiot"] for d in days]
        assert series == sorted(series, reverse=True) and series[0] > series[-1]
        # and it equals an independent count: meters whose last uplink before the day's end lies within 36 h
        for d in days:
            end = datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=history.tz)
            live = conn.execute("""
                SELECT count(*) FROM (SELECT device_id, max(time) AS t FROM water_readings WHERE time <= %s
                                      GROUP BY device_id) r WHERE r.t >= %s""",
                                (end, end - timedelta(seconds=1.5 * 86400))).fetchone()[0]
            assert before[d]["yingtan-water-nbiot"] == live, d


def test_a_retake_replaces_the_day_after_late_data(history):
    catalogue = load_catalogue()
    day = datetime.now(history.tz).date() - timedelta(days=1)
    with psycopg.connect(history.database_url, autocommit=True) as conn:
        take_snapshot(conn, day, catalogue, history)
        first = _rows(conn, day)["yingtan-water-nbiot"]
        conn.execute("UPDATE device_state SET last_seen = last_seen")      # nothing changed: same figures
        assert take_snapshot(conn, day, catalogue, history, retake=True) is True
        assert _rows(conn, day)["yingtan-water-nbiot"] == first
        assert conn.execute("SELECT how FROM coverage_snapshot_days WHERE day = %s", (day,)).fetchone()[0] == "retaken"


def _target(value: float, deadline: date) -> CoverageTarget:
    return CoverageTarget(target_id="t", source="programme", value=value, unit="devices", deadline=deadline,
                          measure="live_devices", devices=DeviceCriteria(families=("water",)))


def test_pace_needed_observed_projected_and_at_risk():
    day = date(2026, 12, 6)
    hist = {day - timedelta(days=k): 400 - 10 * k for k in range(1, 31)}       # +10 a day; 100 thirty days ago
    late = pace(_target(1000, day + timedelta(days=50)), day, 400, hist)
    assert late.pace_observed == pytest.approx(10) and late.observed_days == 30
    assert late.pace_needed == pytest.approx(600 / 50)
    assert late.projected_date == day + timedelta(days=60) and late.at_risk is True and late.status == "at_risk"
    fine = pace(_target(1000, day + timedelta(days=100)), day, 400, hist)
    assert fine.at_risk is False and fine.status == "on_track" and fine.projected_date == day + timedelta(days=60)
    falling = pace(_target(1000, day + timedelta(days=100)), day, 90, hist)     # fewer live than 30 days ago
    assert falling.projected_date is None and falling.at_risk is True
    met = pace(_target(300, day + timedelta(days=10)), day, 400, hist)
    assert met.status == "met" and met.at_risk is False
    assert pace(_target(1000, day + timedelta(days=10)), day, 400, {}).status == "unknown"
    # after the deadline: the value of the deadline day decides, whatever happened since
    passed = pace(_target(350, day - timedelta(days=5)), day, 400, hist)
    assert passed.met_at_deadline is True and passed.value_at_deadline == 350 and passed.status == "met"
    missed = pace(_target(380, day - timedelta(days=5)), day, 400, hist)
    assert missed.status == "missed" and missed.met_at_deadline is False
    assert pace(_target(380, day - timedelta(days=60)), day, 400, hist).status == "unknown"     # no figure that day


def test_coverage_answers_from_the_report_it_refreshes(history):
    from analytics.coverage import CoverageService
    from tests.helpers import wait_until

    catalogue = load_catalogue()

    def yingtan(report) -> float:
        return next(t for t in report.targets if t["target_id"] == "yingtan-water-nbiot")["value"]

    held = CoverageService(lambda: psycopg.connect(history.database_url),
                           catalogue, history.model_copy(update={"coverage_refresh_s": 3600}))
    first = held.report()
    with psycopg.connect(history.database_url) as conn:
        register_devices(conn, [DeviceRecord(device_id="869000000099999", model="cjt188-nb-water-std", network="nbiot",
                                             city="Yingtan", site_kind="residential", site_name="龙岗小区")])
    pipeline = Pipeline(DeviceRegistry(lambda: connect(history.database_url)),
                        Writer(lambda: connect(history.database_url)))
    pipeline.process([Uplink(device_id="869000000099999", payload=_meter(99999), transport="mqtt",
                             received_at=time.time())])
    assert held.report() is first                      # within its period: the same report, no new pass
    refreshing = CoverageService(lambda: psycopg.connect(history.database_url),
                                 catalogue, history.model_copy(update={"coverage_refresh_s": 0.2}))
    refreshing.start()
    try:
        assert wait_until(lambda: yingtan(refreshing.report()) == yingtan(first) + 1, timeout=20)
    finally:
        refreshing.stop()


def test_two_cli_processes_taking_the_same_day_write_it_once(history):
    import os
    import subprocess
    import sys

    day = datetime.now(history.tz).date() - timedelta(days=3)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IOTJX_")},
           "IOTJX_DATABASE_URL": history.database_url}
    procs = [subprocess.Popen([sys.executable, "-m", "iotjx.cli", "coverage", "snapshot", "--day", str(day)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(f"{day}: taken" in o for o in outs) == [False, True], outs
    with psycopg.connect(history.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM coverage_snapshots WHERE day = %s", (day,)).fetchone()[0] \
            == len(load_catalogue())


def test_a_live_report_gives_as_many_days_of_history_as_asked(history):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.helpers import bearer, insert_key

    catalogue = load_catalogue()
    today = datetime.now(history.tz).date()
    old, recent = today - timedelta(days=40), today - timedelta(days=2)
    with psycopg.connect(history.database_url, autocommit=True) as conn:
        for day in (old, recent):
            take_snapshot(conn, day, catalogue, history)
    # (the API does not fill the days between by itself here: its snapshot delay is longer than the test)
    settings = history.model_copy(update={"coverage_snapshot_delay_s": 100 * 86400})
    with TestClient(create_app(settings), headers=bearer(insert_key(history.database_url, "viewer"))) as client:
        def days(**params) -> list[str]:
            body = client.get("/coverage", params=params).json()
            return [h["day"] for h in {t["target_id"]: t for t in body["targets"]}["yingtan-water-nbiot"]["history"]]

        assert days() == [str(recent)]                          # the default 30 days
        assert days(history_days=60) == [str(old), str(recent)]
