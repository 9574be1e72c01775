"""The simulators against the real gateway (MQTT, CoAP and carrier HTTP push; real broker, real
PostgreSQL): a live run and the replay of its capture into a fresh system give the same readings;
every planted behaviour is in the capture at its configured rate and the gateway counts it."""

from __future__ import annotations

from dataclasses import replace

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from decoders.models import get_model
from ingest.coap import set_device_token
from ingest.gateway import Gateway
from iotjx.devices import register_devices
from simulators.capture import CaptureWriter, read_capture
from simulators.engine import Simulation
from simulators.replay import send_records
from simulators.scenario import load_scenario
from simulators.transports import Targets, coap_token
from tests.helpers import wait_for_count
from tests.ingest.test_rollups_written import assert_rollups_equal_recount
from tests.simulators.reference import (binomial_ok, decode, expected_rows, first_arrivals, poisson_ok, repeats)

PLANTED = Path(__file__).with_name("scenarios") / "planted.toml"
CTWING_TOKEN = "ctw-sim-3c1f9a7d"
ONENET_TOKEN = "onenetSimToken7"
TABLES = ("water_readings", "fire_events", "traffic_flow", "parking_events", "radio_readings")


_TESTER: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _tester_login(broker):
    """`simulate`, `replay` and the channels log in as the broker's tester account."""
    _TESTER.clear()
    _TESTER.update(broker.tester_login)


def _gateway_settings(settings, db_url: str):
    tag = uuid.uuid4().hex[:6]
    return settings.model_copy(update={
        "database_url": db_url, "mqtt_client_id": f"iotjx-sim-gw-{tag}", "mqtt_topic_prefix": f"s{tag}",
        "coap_enabled": True, "coap_bind": "127.0.0.1:0", "http_push_enabled": True,
        "http_push_bind": "127.0.0.1:0", "ctwing_push_token": CTWING_TOKEN, "onenet_push_token": ONENET_TOKEN,
        "onenet_push_max_age_s": 0,      # a capture replays pushes of simulated times and their planted retries
        # Every reject a row: the planted rejects, sent faster than real time, pass 60 a minute.
        "reject_rows_per_min": 0})


def _register(db_url: str, devices, coap_devices) -> None:
    with psycopg.connect(db_url) as conn:
        register_devices(conn, list(devices))
        for device_id in sorted(coap_devices):
            set_device_token(conn, device_id, coap_token(device_id))


def _send(gw_settings, records, total: int):
    """Send through a gateway of its own; returns once every uplink has its raw-log row."""
    gateway = Gateway(gw_settings)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        targets = Targets.from_settings(gw_settings, coap_url=f"coap://127.0.0.1:{gateway.coap.port}",
                                        push_url=f"http://127.0.0.1:{gateway.http.port}/push/{{carrier}}")
        targets = replace(targets, mqtt_username=_TESTER.get("username"), mqtt_password=_TESTER.get("password"))
        summary = send_records(records, targets, speed=None, max_inflight=128)
        assert wait_for_count(gw_settings.database_url, "SELECT count(*) FROM raw_uplinks", total) == total
    finally:
        gateway.stop()
    return summary


def _rows(db_url: str) -> dict[str, Counter]:
    """Every readings row without the gateway's arrival time (the one thing a replay changes)."""
    out = {}
    with psycopg.connect(db_url) as conn:
        for table in TABLES:
            out[table] = Counter(r[0] for r in conn.execute(f"SELECT (to_jsonb(t) - 'time')::text FROM {table} t"))
        out["raw_uplinks"] = Counter(conn.execute(
            "SELECT device_id, transport, payload, outcome FROM raw_uplinks").fetchall())
        out["rejected_uplinks"] = Counter(conn.execute(
            "SELECT device_id, transport, codec, payload, reason FROM rejected_uplinks").fetchall())
    return out


def _cli(gw_settings, gateway, *args: str) -> str:
    """Run an `iotjx` command in its own process (as a tester does) against this gateway."""
    env = {**os.environ, "IOTJX_DATABASE_URL": gw_settings.database_url, "IOTJX_MQTT_URL": gw_settings.mqtt_url,
           "IOTJX_MQTT_PROTOCOL": gw_settings.mqtt_protocol, "IOTJX_MQTT_TOPIC_PREFIX": gw_settings.mqtt_topic_prefix,
           "IOTJX_COAP_BIND": f"127.0.0.1:{gateway.coap.port}",
           "IOTJX_HTTP_PUSH_BIND": f"127.0.0.1:{gateway.http.port}",
           "IOTJX_CTWING_PUSH_TOKEN": CTWING_TOKEN, "IOTJX_ONENET_PUSH_TOKEN": ONENET_TOKEN,
           "COLUMNS": "160", "IOTJX_MQTT_USERNAME": _TESTER.get("username", ""),
           "IOTJX_MQTT_PASSWORD": _TESTER.get("password", "")}
    done = subprocess.run([sys.executable, "-m", "iotjx.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _through_gateway(gw_settings, total_from, *args: str) -> str:
    """A gateway of its own; the command's uplinks all logged (one raw row each) before it stops."""
    gateway = Gateway(gw_settings)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        out = _cli(gw_settings, gateway, *args)
        total = total_from()
        assert wait_for_count(gw_settings.database_url, "SELECT count(*) FROM raw_uplinks", total) == total
    finally:
        gateway.stop()
    return out


def test_replay_into_a_fresh_system_gives_exactly_the_readings_of_the_live_run(
        settings, second_db_url, tmp_path, no_thread_leaks):
    live, dry = tmp_path / "live.jsonl.gz", tmp_path / "dry.jsonl.gz"
    first = _gateway_settings(settings, settings.database_url)
    # Run 1: `iotjx simulate` live into a gateway (registering the fleet, CoAP tokens included).
    out = _through_gateway(first, lambda: read_capture(live).count(),
                           "simulate", str(PLANTED), "--max", "--capture", str(live))
    assert "acknowledged" in out
    # What was sent is what the simulation is: a dry run writes the same bytes.
    sim = Simulation(load_scenario(PLANTED), onenet_token=ONENET_TOKEN)
    with CaptureWriter(dry, sim.header()) as writer:
        for device in sim.device_records:
            writer.device(device)
        for r in sim.records():
            writer.write(r)
    assert live.read_bytes() == dry.read_bytes()
    records = list(read_capture(live).uplinks())
    assert {r.transport for r in records} == {"mqtt", "coap", "http"}
    # Run 2: a fresh database; `iotjx replay` registers the capture's devices and sends it again.
    second = _gateway_settings(settings, second_db_url)
    _through_gateway(second, lambda: len(records), "replay", str(live), "--max")

    one, two = _rows(first.database_url), _rows(second.database_url)
    for table in (*TABLES, "raw_uplinks", "rejected_uplinks"):
        assert one[table] == two[table], table
    for table, n in expected_rows(records).items():          # and what they hold is what the frames say
        assert sum(one[table].values()) == n, table
    assert sum(one["radio_readings"].values()) > 0            # radio figures from the CTWing profile pushes
    assert sum(one["rejected_uplinks"].values()) > 0 and any(o == "duplicate" for *_, o in one["raw_uplinks"])


def test_planted_behaviours_are_counted_by_the_gateway(settings, tmp_path, no_thread_leaks):
    sim = Simulation(load_scenario(PLANTED), onenet_token=ONENET_TOKEN)
    records = list(sim.records())
    gw = _gateway_settings(settings, settings.database_url)
    _register(gw.database_url, sim.device_records, {p.record.device_id for p in sim.planned if p.transport == "coap"})
    summary = _send(gw, iter(records), len(records))
    firsts = first_arrivals(records)
    decoded = [decode(r) for r in firsts]
    rejected = [d for d in decoded if d.reason is not None]
    with psycopg.connect(gw.database_url) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM raw_uplinks GROUP BY 1").fetchall())
        reasons = Counter(dict(conn.execute("SELECT reason, count(*) FROM rejected_uplinks GROUP BY 1").fetchall()))
        rejects_by_device = Counter(r[0] for r in conn.execute("SELECT device_id FROM rejected_uplinks"))
        alarm_rows = conn.execute("SELECT count(*) FROM fire_events WHERE fire_alarm").fetchone()[0]
        water = Counter(conn.execute("SELECT device_id, meter_address, flow_m3, meter_time FROM water_readings")
                        .fetchall())
        stored_raw = Counter(conn.execute("SELECT device_id, payload FROM raw_uplinks WHERE outcome = 'stored'")
                             .fetchall())
    # Duplicates: every uplink whose bytes the device (or the platform) had already sent.
    assert outcomes.get("duplicate", 0) == repeats(records)
    assert repeats(records) >= sim.labels["duplicate"]     # + quiet lanes' identical frames (see docs)
    # Corrupt frames: kept as rejects with the decoder's reason, exactly those the reference refuses.
    assert all("corrupt" in d.record.labels for d in rejected)
    assert len(rejected) == sum("corrupt" in r.labels for r in firsts)
    assert reasons == Counter(d.reason for d in rejected)
    assert set(reasons) <= {"checksum", "length", "truncated"}
    assert rejects_by_device == Counter(d.record.device_id for d in rejected)
    coap_http_rejects = sum(d.record.transport in ("coap", "http") for d in rejected)
    assert sum(summary.refused.values()) == coap_http_rejects           # 4.00 / 422, not 2.04 / 202
    # Stored: every first arrival that decodes, once.
    assert outcomes.get("stored", 0) == len(firsts) - len(rejected)
    # Alarms: one fire_alarm row per object the reference decoder reads as a fire alarm.
    expected_alarms = sum(sum(bool(o.get("flags", {}).get("fire_alarm")) for o in d.fields["objects"])
                          for d in decoded if d.fields is not None and get_model(d.record.model).family == "fire")
    assert alarm_rows == expected_alarms
    assert alarm_rows >= sum("alarm" in d.record.labels and d.fields is not None for d in decoded)
    # Leaking meters' readings and late (store-and-forward) uplinks are stored like any other.
    for d in decoded:
        if d.fields is None or d.reason is not None:
            continue
        r = d.record
        if "leak" in r.labels:
            assert water[(r.device_id, d.fields["meter_address"], d.fields["flow_m3"], d.fields["meter_time"])] >= 1
        if "late" in r.labels:
            payload = d.envelope["inner_payload"] if d.envelope else r.payload
            assert stored_raw[(r.device_id, payload)] >= 1
    # Every family through the real gateway (MQTT, CoAP, pushes; duplicates, late uplinks, rejects): each
    # rollup table kept by the writer equals the plain-SQL recount over the readings.
    with psycopg.connect(gw.database_url) as conn:
        assert_rollups_equal_recount(conn)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_planted_behaviours_appear_at_their_configured_rates(seed):
    scenario = load_scenario(PLANTED)
    sim = Simulation(scenario, seed)
    records = list(sim.records())
    b = scenario.fleets[0].behaviour
    frames = [r for r in records if "duplicate" not in r.labels]
    assert sim.frames == len(frames)
    with_bytes = [r for r in frames if get_model(r.model).codec != "ctwing" or get_model(r.model).inner_codec]
    assert binomial_ok(sum("duplicate" in r.labels for r in records), len(frames), b.duplicate)
    assert binomial_ok(sum("late" in r.labels for r in frames), len(frames), b.late)
    assert binomial_ok(sum("corrupt" in r.labels for r in with_bytes), len(with_bytes), b.corrupt)
    # Leaks: the share of meters whose reports carry the leak (a leak begun before the run shows on every
    # report; one that starts within it shows from then on).
    planned = {p.record.device_id: p for p in sim.planned}
    checked = 0
    for k, spec in enumerate(scenario.fleets):
        if spec.family != "water":
            continue
        reporting = {r.device_id for r in frames if planned[r.device_id].fleet == k}
        leaking = {r.device_id for r in frames if planned[r.device_id].fleet == k and "leak" in r.labels}
        p, onset = spec.options["leak"], spec.options["leak_onset"]
        if onset == 0:
            assert binomial_ok(len(leaking), len(reporting), p), (spec.name, len(leaking), len(reporting))
            checked += p > 0
        else:
            low, high = p * len(reporting), (p + (1 - p) * onset) * len(reporting)
            sd = (len(reporting) * 0.25) ** 0.5
            assert low - 4.5 * sd <= len(leaking) <= high + 4.5 * sd, (spec.name, len(leaking))
    assert checked >= 2
    # Alarms: a Poisson process per device-day at the fleet's rate.
    days = scenario.duration_s / 86400
    for k, spec in enumerate(scenario.fleets):
        if spec.family == "fire" and spec.options["alarm_per_day"]:
            n = sum("alarm" in r.labels for r in frames if planned[r.device_id].fleet == k)
            assert poisson_ok(n, spec.count * days * spec.options["alarm_per_day"]), (spec.name, n)
