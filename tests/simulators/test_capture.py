"""Captures and replay: the file format round-trips and survives a cut-off line; replay sends every
record over its own transport — MQTT through a real broker (recorded back from the wire by
`WireRecorder`), CoAP to an aiocoap server, carrier pushes to an HTTP server — byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict

import pytest
from typer.testing import CliRunner

from iotjx.cli import app
from iotjx.devices import DeviceRecord
from iotjx.settings import Settings
from simulators.capture import CaptureWriter, UplinkRecord, WireRecorder, read_capture
from simulators.engine import simulate
from simulators.publish import MqttPublisher
from simulators.replay import send_records
from simulators.scenario import parse_scenario
from simulators.transports import Targets, coap_token
from tests.simulators.servers import RecordingCoapServer, RecordingPushServer

ONENET_TOKEN = "onenet-test-token-42"


def _records(fleets, seed=2, duration="6h", **behaviour):
    doc = {"scenario": {"name": "c", "start": "2026-07-06T06:00:00+08:00", "duration": duration, "seed": seed},
           "behaviour": behaviour, "fleet": fleets}
    return simulate(parse_scenario(doc))


def test_capture_round_trip_gzip_append_and_a_cut_off_last_line(tmp_path):
    device = DeviceRecord("869975030000001", "cjt188-nb-water-std", "nbiot", "360600", "residential", "Yingtan 1")
    ups = [UplinkRecord(1783300000.125, device.device_id, "coap", b"\xfe\xfeh\x00\x16", labels=("late", "leak"),
                        sent_t=1783290000.0, model=device.model, radio={"rsrp_dbm": -101.5, "ecl": 0}),
           UplinkRecord(1783300001.0, "869975030000002", "http", b'{"msg":{}}', route="onenet")]
    for name in ("c.jsonl", "c.jsonl.gz"):
        path = tmp_path / name
        with CaptureWriter(path, {"source": "simulator", "scenario": "x"}) as w:
            w.device(device)
            w.write(ups[0])
        with CaptureWriter(path, append=True) as w:             # appending adds records, not a header
            w.write(ups[1])
        cap = read_capture(path)
        assert cap.header["scenario"] == "x" and cap.devices == [device]
        assert list(cap.uplinks()) == ups
    path = tmp_path / "c.jsonl"
    text = path.read_text()
    line = json.loads(text.splitlines()[2])
    assert base64.b64decode(line["payload"]) == ups[0].payload and line["labels"] == ["late", "leak"]
    path.write_text(text + '{"type":"uplink","t":17833')     # a recorder killed mid-line
    cap = read_capture(path)
    assert list(cap.uplinks()) == ups and cap.skipped == 1
    (tmp_path / "bad.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not (an iotjx capture|a capture record)"):
        read_capture(tmp_path / "bad.jsonl")


@pytest.fixture
def mqtt_settings(broker):
    login = broker.tester_login                 # the tester account: publishes and reads uplinks
    return Settings(mqtt_url=broker.url, mqtt_protocol=broker.protocol, mqtt_username=login.get("username"),
                    mqtt_password=login.get("password"),
                    mqtt_topic_prefix=f"t{uuid.uuid4().hex[:6]}", mqtt_client_id=f"c{uuid.uuid4().hex[:6]}")


def test_mqtt_replay_as_recorded_from_the_wire(mqtt_settings, tmp_path, no_thread_leaks):
    _, records = _records([{"model": "gb26875-uitd", "count": 5}, {"model": "gbt43229-detector", "count": 3,
                                                                     "interval_s": 300},
                           {"model": "cjt188-nb-water-std", "count": 50, "transport": "mqtt", "interval_s": 3600}],
                          duplicate=0.05, corrupt=0.05)
    assert {r.transport for r in records} == {"mqtt"} and len(records) > 400
    recorder = WireRecorder(mqtt_settings, tmp_path / "wire.jsonl").start()
    assert recorder.wait_connected(10)
    summary = send_records(records, Targets.from_settings(mqtt_settings), speed=None, max_inflight=50)
    assert summary.total == {"sent": len(records), "acknowledged": len(records), "refused": 0, "failed": 0}
    deadline = time.monotonic() + 30
    while recorder.count < len(records) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.stop() == len(records)
    wire = read_capture(tmp_path / "wire.jsonl")
    assert wire.header["source"] == "wire"
    got = list(wire.uplinks())
    assert Counter((r.device_id, r.payload) for r in got) == Counter((r.device_id, r.payload) for r in records)
    per_device = defaultdict(list)
    for r in got:
        per_device[r.device_id].append(r.payload)
    for r in records:                                        # one publisher, QoS 1: each device's order kept
        assert per_device[r.device_id].pop(0) == r.payload
    assert all(r.transport == "mqtt" and r.t > 1.7e9 for r in got)


def test_coap_and_push_replay_reach_their_servers_byte_for_byte(tmp_path, no_thread_leaks):
    _, records = _records([{"model": "cjt188-nb-water-std", "count": 60, "interval_s": 3600},
                           {"model": "nb-parking-sensor", "count": 20},
                           {"model": "ctwing-cjt188-water", "count": 20, "interval_s": 3600},
                           {"model": "onenet-cjt188-water", "count": 20, "interval_s": 3600},
                           {"model": "ctwing-lian-smoke", "count": 5, "interval_s": 3600}],
                          duplicate=0.05)
    coap_ids = sorted({r.device_id for r in records if r.transport == "coap"})
    refused = set(coap_ids[:3])
    coap = RecordingCoapServer(refuse=refused).start()
    push = RecordingPushServer().start()
    try:
        targets = Targets(coap_url=f"coap://127.0.0.1:{coap.port}",
                          push_url=f"http://127.0.0.1:{push.port}/push/{{carrier}}",
                          push_headers=(("X-Push-Token", "ctw-secret-1234"),), coap_endpoints=8)
        summary = send_records(records, targets, speed=None, max_inflight=64)
    finally:
        coap.stop()
        push.stop()
    by_transport = Counter(r.transport for r in records)
    refused_n = sum(r.device_id in refused for r in records if r.transport == "coap")
    assert refused_n > 0
    assert summary.sent == by_transport
    assert summary.refused == Counter({"coap": refused_n})
    assert summary.acknowledged == Counter({"coap": by_transport["coap"] - refused_n, "http": by_transport["http"]})
    assert sum(summary.failed.values()) == 0
    # CoAP: POST /up/{device_id}?t=<token>, confirmable, content-format 42, the exact bytes.
    expected = Counter((f"/up/{r.device_id}", (f"t={coap_token(r.device_id)}",), 42, r.payload, True)
                       for r in records if r.transport == "coap")
    assert Counter((x.path, x.query, x.content_format, x.payload, x.confirmable) for x in coap.received) == expected
    # Pushes: the carrier's path, the envelope exactly, the CTWing token header on each.
    expected = Counter((f"/push/{r.route}", r.payload) for r in records if r.transport == "http")
    assert Counter((x.path, x.payload) for x in push.received) == expected
    assert all(dict(x.headers)["X-Push-Token"] == "ctw-secret-1234" for x in push.received)
    assert {r.route for r in records if r.transport == "http"} == {"ctwing", "onenet"}


def test_onenet_pushes_are_signed_as_the_platform_signs_them():
    doc = {"scenario": {"name": "s", "start": "2026-07-06T06:00:00+08:00", "duration": "3h"},
           "fleet": [{"model": "onenet-cjt188-water", "count": 5, "interval_s": 3600}]}
    from simulators.engine import Simulation
    records = list(Simulation(parse_scenario(doc), onenet_token=ONENET_TOKEN).records())
    assert records
    for r in records:
        body = json.loads(r.payload)
        msg_text = json.dumps(body["msg"], separators=(",", ":"))
        assert msg_text in r.payload.decode()
        digest = hashlib.md5((ONENET_TOKEN + body["nonce"] + msg_text).encode()).digest()
        assert body["msg_signature"] == base64.b64encode(digest).decode()


def test_cli_replay_summary_and_exit_code(mqtt_settings, tmp_path, monkeypatch, no_thread_leaks):
    path = tmp_path / "cap.jsonl.gz"
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "nanchang-traffic", "--scale", "0.02", "--duration", "2h",
                                 "--dry-run", "--capture", str(path)])
    assert result.exit_code == 0, result.output
    mqtt_only = tmp_path / "mqtt.jsonl"
    cap = read_capture(path)
    with CaptureWriter(mqtt_only, cap.header) as w:
        for r in cap.uplinks():
            if r.transport == "mqtt":
                w.write(r)
    n = read_capture(mqtt_only).count()
    assert n > 50
    for key, value in (("IOTJX_MQTT_URL", mqtt_settings.mqtt_url), ("IOTJX_MQTT_PROTOCOL", mqtt_settings.mqtt_protocol),
                       ("IOTJX_MQTT_TOPIC_PREFIX", mqtt_settings.mqtt_topic_prefix),
                       ("IOTJX_MQTT_USERNAME", mqtt_settings.mqtt_username or ""),
                       ("IOTJX_MQTT_PASSWORD", mqtt_settings.mqtt_password or "")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("IOTJX_DATABASE_URL", raising=False)
    from iotjx.settings import get_settings
    get_settings.cache_clear()
    try:
        for speed in (["--max"], ["--speed", "1000000"]):
            result = runner.invoke(app, ["replay", str(mqtt_only), *speed])
            assert result.exit_code == 0, result.output
            assert f"{n}" in result.output and "acknowledged" in result.output
    finally:
        get_settings.cache_clear()


def test_cli_record_writes_what_passes_on_the_broker(mqtt_settings, tmp_path):
    path = tmp_path / "wire.jsonl.gz"
    env = {**os.environ, "IOTJX_MQTT_URL": mqtt_settings.mqtt_url, "IOTJX_MQTT_PROTOCOL": mqtt_settings.mqtt_protocol,
           "IOTJX_MQTT_TOPIC_PREFIX": mqtt_settings.mqtt_topic_prefix, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "IOTJX_MQTT_USERNAME": mqtt_settings.mqtt_username or "", "IOTJX_MQTT_PASSWORD": mqtt_settings.mqtt_password or ""}
    proc = subprocess.Popen([sys.executable, "-m", "iotjx.cli", "record", str(path), "--count", "30",
                             "--duration", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "recording" in proc.stdout.readline()            # printed once subscribed
        host, port = mqtt_settings.mqtt_host_port
        pub = MqttPublisher(host, port, prefix=mqtt_settings.mqtt_topic_prefix, client_id=f"p{uuid.uuid4().hex[:6]}",
                            username=mqtt_settings.mqtt_username, password=mqtt_settings.mqtt_password)
        sent = [(f"8699750300{k % 7:05d}", bytes([k]) * (k + 1)) for k in range(30)]
        for device_id, payload in sent:
            pub.publish(device_id, payload)
        assert pub.flush(10)
        pub.close()
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        proc.kill()
        proc.stdout.close()
    got = [(r.device_id, r.payload) for r in read_capture(path).uplinks()]
    assert got == sent
