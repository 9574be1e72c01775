"""`iotjx replay --original-times` against the real gateway, broker and PostgreSQL: a capture replayed
paced (as a live run would send it, compressed) and as fast as the gateway takes it, days after it
was made, gives the same readings with the same times, the same dedup outcomes and the same fire,
water and traffic figures — and those are what the capture's own times say (a reference computed here
from the records, not from the gateway's output)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from analytics import fire, traffic, water
from analytics.rollups import LEVELS
from iotjx import mqtt_accounts
from decoders.models import get_model
from ingest.gateway import Gateway
from simulators.capture import CaptureWriter, read_capture
from simulators.engine import Simulation
from simulators.scenario import load_scenario
from tests.helpers import wait_for_count
from tests.ingest.test_rollups_written import assert_rollups_equal_recount

SCENARIO = Path(__file__).with_name("scenarios") / "quiet-lanes.toml"
ONENET_TOKEN = "onenetSimToken7"
CTWING_TOKEN = "ctw-sim-3c1f9a7d"
TESTER, TESTER_PASSWORD = "replay-tester", "replay-tester-password-1"
READINGS = ("water_readings", "fire_events", "traffic_flow", "radio_readings")
FIGURES = ("fire_alarms", "water_daily", "water_night", "water_alerts")
NOT_COMPARED = ("alarm_id", "alert_id", "id", "updated_at", "created_at")    # serials and the wall clock


def _capture(path: Path) -> list:
    """The scenario moved to 3 days before today (a quiet night, China time), written as a capture."""
    spec = load_scenario(SCENARIO)
    day = (time.time() // 86400 - 3) * 86400
    spec = replace(spec, start=day + 12 * 3600)                 # 20:00 at UTC+8
    sim = Simulation(spec, onenet_token=ONENET_TOKEN)
    with CaptureWriter(path, sim.header()) as writer:
        for device in sim.device_records:
            writer.device(device)
        for record in sim.records():
            writer.write(record)
    return list(read_capture(path).uplinks())


def _replay(settings, broker, db_url: str, capture: Path, records, *args: str) -> None:
    """`iotjx replay CAPTURE --original-times ARGS` (its own process, a tester account of the registry,
    which the broker's files then hold too) into a gateway of its own with replays enabled; returns
    once every uplink has its raw-log row."""
    gw = settings.model_copy(update={
        "database_url": db_url, "mqtt_client_id": f"iotjx-rp-{uuid.uuid4().hex[:6]}", "replay_enabled": True,
        "http_push_enabled": True, "http_push_bind": "127.0.0.1:0", "ctwing_push_token": CTWING_TOKEN,
        # No OneNET nonce window: a planted retry sent while its first copy is being stored is answered
        # 503 at the door, and whether that happens depends on the pace (the dedup then judges it).
        # Freshness against the original time: tests/ingest/test_http_push.py.
        "onenet_push_token": ONENET_TOKEN, "onenet_push_max_age_s": 0,
        # One writer: batches commit in the order they came (two writers may commit a later batch
        # first, and an identical frame then meets its successor's claim: docs/simulators.md).
        "db_writers": 1})
    with psycopg.connect(db_url) as conn:
        mqtt_accounts.set_service_account(conn, TESTER, "tester", TESTER_PASSWORD)
    broker.sync(db_url)
    gateway = Gateway(gw)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        env = {**os.environ, "IOTJX_DATABASE_URL": db_url, "IOTJX_MQTT_URL": gw.mqtt_url,
               "IOTJX_MQTT_PROTOCOL": gw.mqtt_protocol, "IOTJX_MQTT_TOPIC_PREFIX": gw.mqtt_topic_prefix,
               "IOTJX_MQTT_USERNAME": TESTER, "IOTJX_MQTT_PASSWORD": TESTER_PASSWORD,
               "IOTJX_HTTP_PUSH_BIND": f"127.0.0.1:{gateway.http.port}", "IOTJX_CTWING_PUSH_TOKEN": CTWING_TOKEN,
               "COLUMNS": "160"}
        done = subprocess.run([sys.executable, "-m", "iotjx.cli", "replay", str(capture), "--original-times", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        total = len(records)
        assert wait_for_count(db_url, "SELECT count(*) FROM raw_uplinks", total) == total, \
            (dict(gateway.http.counters), dict(gateway.mqtt.counters), done.stdout[-1500:])
        by_mqtt = sum(r.transport != "http" for r in records)
        assert gateway.mqtt.counters["replayed"] == by_mqtt and gateway.mqtt.counters["replay_refused"] == 0
        assert gateway.http.counters["refused.401"] == 0
    finally:
        gateway.stop()


def _table(conn, table: str) -> Counter:
    return Counter(r[0] for r in conn.execute(
        f"SELECT (to_jsonb(t) - %s::text[])::text FROM {table} t", (list(NOT_COMPARED),)))


def _state(db_url: str, since: datetime, until: datetime) -> dict[str, object]:
    """Every readings row (time included), the raw log, and the figures the analytics make of them."""
    out: dict[str, object] = {}
    with psycopg.connect(db_url) as conn:
        fire.update_alarms(conn, margin_s=0, full=True)
        water.update_water(conn, margin_s=0, full=True)
        conn.commit()
        for table in (*READINGS, *FIGURES):
            out[table] = _table(conn, table)
        out["raw_uplinks"] = Counter(conn.execute(
            "SELECT device_id, transport, payload, received_at, outcome FROM raw_uplinks").fetchall())
        out["flow_buckets"] = [dataclasses.asdict(b) for b in traffic.flow_buckets(conn, since, until)]
        out["fire_kpis"] = dataclasses.asdict(fire.fire_kpis(conn, since, until))
        out["consumption"] = [dataclasses.asdict(d) for d in
                              water.consumption_by_city(conn, since.date() - timedelta(days=1), until.date())]
        # every rollup the writer kept, named by device id / site name (keys are each database's own)
        for level in LEVELS:
            name = {"device": "d.device_id", "lane": "d.device_id", "site": "s.city_code || '/' || s.name",
                    "cell": "''"}[level.key]
            join = ("JOIN devices d USING (device_key)" if level.key in ("device", "lane")
                    else "JOIN sites s USING (site_id)" if level.key == "site" else "")
            # sums are float: batches merged in another order round the last bit differently
            out[level.table] = Counter(tuple(round(v, 6) if isinstance(v, float) else v for v in r)
                                       for r in conn.execute(
                                           f"SELECT {name}, {', '.join('t.' + c for c in level.columns if c not in ('device_key', 'site_id'))} "
                                           f"FROM {level.table} t {join}"))
        assert_rollups_equal_recount(conn, expect_rows=False)
        conn.row_factory = dict_row
        out["traffic_times"] = Counter((r["device_id"], round(r["t"], 3)) for r in conn.execute(
            "SELECT DISTINCT device_id, extract(epoch FROM time)::float8 AS t FROM traffic_flow"))
    return out


def _reference(records, default_window_s: float) -> tuple[Counter, Counter]:
    """From the records alone: each device frame (MQTT, CoAP) is stored unless a copy of it was stored
    within its model's dedup window before it, by the capture's times.  (outcomes per transport, the
    (device, time) of every stored GB/T 43229 frame)."""
    last: dict[tuple[str, bytes], float] = {}
    outcomes: Counter = Counter()
    traffic_times: Counter = Counter()
    for r in sorted((r for r in records if r.transport != "http"), key=lambda r: r.t):
        window = get_model(r.model).dedup_window_s
        window = default_window_s if window is None else window
        key = (r.device_id, r.payload)
        if key in last and last[key] >= r.t - window:
            outcomes[(r.transport, "duplicate")] += 1
            continue
        last[key] = r.t
        outcomes[(r.transport, "stored")] += 1
        if r.model.startswith("gbt43229"):
            traffic_times[(r.device_id, round(r.t, 3))] += 1
    return outcomes, traffic_times


def test_a_capture_replayed_paced_and_at_full_speed_days_later_gives_the_live_runs_rows_and_figures(
        settings, broker, second_db_url, tmp_path, no_thread_leaks):
    if not broker.secured:
        pytest.skip("replays with original times need a broker with our ACL (Mosquitto)")
    capture = tmp_path / "quiet.jsonl.gz"
    records = _capture(capture)
    span = records[-1].t - records[0].t
    since = datetime.fromtimestamp(records[0].t, UTC) - timedelta(hours=1)
    until = datetime.fromtimestamp(records[-1].t, UTC) + timedelta(hours=1)

    # The capture holds what the issue is about: identical frames of a quiet lane 15 minutes apart
    # (a 20 s dedup window: both are stored when they keep their times) and planted retransmissions.
    times = defaultdict(list)
    for r in records:
        if r.model.startswith("gbt43229"):
            times[(r.device_id, r.payload)].append(r.t)
    gaps = [b - a for ts in times.values() for a, b in zip(sorted(ts), sorted(ts)[1:])]
    assert sum(800 <= g <= 1000 for g in gaps) >= 20
    assert any(g <= 20 for g in gaps)

    # Run 1: paced, the capture's 10 hours in ~6 s (what a live run sends, compressed).
    _replay(settings, broker, settings.database_url, capture, records, "--speed", f"{span / 6:.0f}")
    # Run 2: a fresh system, as fast as the gateway takes it.
    _replay(settings, broker, second_db_url, capture, records, "--max")

    one, two = _state(settings.database_url, since, until), _state(second_db_url, since, until)
    for what in one:
        assert one[what] == two[what], what

    # …and both are what the capture's times say.
    outcomes, traffic_times = _reference(records, settings.dedup_window_s)
    with psycopg.connect(settings.database_url) as conn:
        got = Counter({(t, o): n for t, o, n in conn.execute(
            "SELECT transport, outcome, count(*) FROM raw_uplinks WHERE transport <> 'http' GROUP BY 1, 2")})
        raw_times = Counter((d, bytes(p), round(t, 3)) for d, p, t in conn.execute(
            "SELECT device_id, payload, extract(epoch FROM received_at)::float8 FROM raw_uplinks "
            "WHERE transport <> 'http'"))
    assert got == outcomes
    assert outcomes[("mqtt", "duplicate")] > 0
    assert one["traffic_times"] == traffic_times
    assert raw_times == Counter((r.device_id, r.payload, round(r.t, 3)) for r in records if r.transport != "http")
    assert sum(one["fire_alarms"].values()) > 0 and one["flow_buckets"] and one["consumption"]
    assert sum(one["rollup_traffic_lane_5m"].values()) > 0 and sum(one["rollup_water_day"].values()) > 0
