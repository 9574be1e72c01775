"""The walking skeleton end to end: paho publishes CJ/T 188 frames to a real broker, the gateway
stores them in the real PostgreSQL, and only then acknowledges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import decoders
from ingest.gateway import Gateway
from simulators.publish import MqttPublisher
from simulators.water import make_meters
from tests.helpers import register_fleet, wait_for_count


def _publisher(settings, broker, name: str) -> MqttPublisher:
    """Many devices' uplinks over one connection: the tester account (the broker refuses anonymous)."""
    host, port = settings.mqtt_host_port
    return MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id=name, **broker.tester_login)


def _stored_rows(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("""SELECT device_id, meter_address, meter_type, flow_m3, settlement_flow_m3, meter_time,
                                      status, valve, battery_low FROM water_readings""").fetchall()
    return Counter(rows)


def _expected_row(device_id: str, payload: bytes) -> tuple:
    r = decoders.decode("cjt188", payload)
    return (device_id, r["meter_address"], r["meter_type"], r["flow_m3"], r["settlement_flow_m3"], r["meter_time"],
            r["status"], r["valve"], r["battery_low"])


def test_every_uplink_becomes_exactly_one_row_equal_to_the_reference(settings, broker, no_thread_leaks):
    fleet = register_fleet(settings.database_url, 40, seed=3)
    meters = make_meters(fleet, seed=3)
    gateway = Gateway(settings)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        pub = _publisher(settings, broker, "test-fleet")
        expected: Counter = Counter()
        t0 = datetime(2026, 11, 1, tzinfo=UTC)
        for k in range(75):                              # 40 meters × 75 = 3,000 uplinks
            now = t0 + timedelta(minutes=15 * k)
            for m in meters:
                m.advance(now, 900)
                frame = m.frame(now)
                expected[_expected_row(m.device_id, frame)] += 1
                pub.publish(m.device_id, frame)
        assert pub.flush(60)
        pub.close()
        total = sum(expected.values())
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM water_readings", total) == total
        time.sleep(0.3)     # anything stored twice would show up now
        assert _stored_rows(settings.database_url) == expected
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM rejected_uplinks").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM raw_uplinks WHERE outcome = 'stored'").fetchone()[0] == total
            assert conn.execute("SELECT sum(uplinks) FROM device_state").fetchone()[0] == total
    finally:
        gateway.stop()


def test_malformed_frames_and_unknown_devices_are_kept_with_reasons(settings, broker, no_thread_leaks):
    fleet = register_fleet(settings.database_url, 2, seed=5)
    meter = make_meters(fleet, seed=5)[0]
    good = meter.frame(datetime(2026, 11, 2, 8, tzinfo=UTC))
    bad_checksum = good[:-2] + bytes([good[-2] ^ 0xFF, 0x16])
    truncated = good[:20]
    body = bytearray(good)
    body[2 + 2] = 0xAB                                   # an address byte that is not BCD
    body[-2] = sum(body[2:-2]) & 0xFF
    cases = [(meter.device_id, bad_checksum, "checksum"), (meter.device_id, truncated, "truncated"),
             (meter.device_id, bytes(body), "bcd"), (meter.device_id, b"", "empty"),
             ("869999999999999", good, "unknown_device")]
    gateway = Gateway(settings)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        pub = _publisher(settings, broker, "test-bad")
        for device_id, payload, _ in cases:
            pub.publish(device_id, payload)
        pub._client.publish(f"{settings.mqtt_topic_prefix}/up/", good, qos=1)   # no device id in the topic
        assert pub.flush(30)
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM rejected_uplinks", len(cases) + 1) == len(cases) + 1
        pub.publish(meter.device_id, good)                # the gateway is still alive and storing
        assert pub.flush(30)
        pub.close()
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM water_readings", 1) == 1
        with psycopg.connect(settings.database_url) as conn:
            rejects = conn.execute("SELECT device_id, payload, reason, detail FROM rejected_uplinks").fetchall()
        got = Counter((d, bytes(p), r) for d, p, r, _ in rejects)
        for device_id, payload, reason in cases:
            assert got[(device_id, payload, reason)] == 1, (device_id, reason, rejects)
        assert any(r == "unknown_device" and d.startswith("?") for d, _, r, _ in rejects)
        assert all(detail for _, _, reason, detail in rejects if reason != "empty")
        assert gateway.pipeline.counters["rejected"] == len(cases) + 1
    finally:
        gateway.stop()


@pytest.mark.skipif(not os.path.exists("/usr/sbin/mosquitto") and not __import__("shutil").which("mosquitto"),
                    reason="needs mosquitto's persistent sessions")
def test_no_ack_before_commit_a_killed_gateway_loses_nothing(settings, broker, tmp_path):
    """While the database is blocked the gateway holds uplinks unacknowledged; SIGKILL it, and a new
    gateway under the same client id gets every one of them again from the broker."""
    fleet = register_fleet(settings.database_url, 20, seed=7)
    meters = make_meters(fleet, seed=7)
    env = {**os.environ, "IOTJX_DATABASE_URL": settings.database_url, "IOTJX_MQTT_URL": settings.mqtt_url,
           "IOTJX_MQTT_PROTOCOL": settings.mqtt_protocol, "IOTJX_MQTT_CLIENT_ID": settings.mqtt_client_id,
           "IOTJX_MQTT_TOPIC_PREFIX": settings.mqtt_topic_prefix, "IOTJX_BATCH_AGE_MS": "50",
           "IOTJX_MQTT_USERNAME": settings.mqtt_username or "", "IOTJX_MQTT_PASSWORD": settings.mqtt_password or ""}
    cmd = [sys.executable, "-m", "iotjx.cli", "gateway"]
    blocker = psycopg.connect(settings.database_url)
    blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")     # COPY will wait on this
    log = open(tmp_path / "gateway-a.log", "wb")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM gateway_status WHERE broker_connected",
                              1, timeout=60) == 1, (tmp_path / "gateway-a.log").read_text()
        pub = _publisher(settings, broker, "test-kill")
        now = datetime(2026, 11, 3, tzinfo=UTC)
        for m in meters * 10:
            pub.publish(m.device_id, m.frame(now))
        assert pub.flush(30)
        pub.close()
        time.sleep(1.5)                                  # the gateway has them all, blocked on the lock
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        blocker.rollback()
        blocker.close()
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == 0
    log = open(tmp_path / "gateway-b.log", "wb")
    second = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM water_readings", 200, 60) == 200, \
            (tmp_path / "gateway-b.log").read_text()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "gateway-b.log").read_text()
