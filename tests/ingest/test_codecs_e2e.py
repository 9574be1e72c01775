"""Every codec end to end through the gateway: frames published over MQTT become the expected rows.

Expected values come from the reference decoders (`decoders.decode`), read field by field here, not
from the gateway's own row builders."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import decoders
from decoders.gb26875_encode import heartbeat, smoke_alarm
from decoders.gbt43229 import random_lane
from ingest.gateway import Gateway
from iotjx.devices import DeviceRecord, register_devices
from simulators.fleet import imei
from simulators.publish import MqttPublisher
from tests.helpers import wait_for_count

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def _device(rng, model: str, kind: str = "building") -> DeviceRecord:
    return DeviceRecord(device_id=imei(rng), model=model, city="360100", site_kind=kind,
                        site_name="e2e site")


def _water_frame(rng, settings=None) -> bytes:
    return decoders.encode("cjt188", {"meter_address": f"{rng.randrange(10**14):014d}",
                                      "flow_m3": rng.randrange(10**7) / 100, "status": rng.randrange(4),
                                      "meter_time": T0 + timedelta(minutes=rng.randrange(600))}, settings or {})


_TESTER: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _tester_login(broker):
    """Publishers log in as the broker's tester account (the broker refuses anonymous clients)."""
    _TESTER.clear()
    _TESTER.update(broker.tester_login)


def _run(settings, devices: list[DeviceRecord], uplinks: list[tuple[str, bytes]], table: str, rows: int) -> None:
    with psycopg.connect(settings.database_url) as conn:
        register_devices(conn, devices)
    gateway = Gateway(settings)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        host, port = settings.mqtt_host_port
        pub = MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id="e2e-" + table, **_TESTER)
        for device_id, payload in uplinks:
            pub.publish(device_id, payload)
        assert pub.flush(30)
        pub.close()
        got = wait_for_count(settings.database_url, f"SELECT count(*) FROM {table}", rows, timeout=60)
        with psycopg.connect(settings.database_url) as conn:
            rejects = conn.execute("SELECT device_id, reason, detail FROM rejected_uplinks").fetchall()
        assert got == rows and not rejects, rejects
    finally:
        gateway.stop()


def _select(db_url: str, sql: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchall()


def test_cjt188_vendor_variants(settings):
    rng = random.Random(1)
    std, swapped, msb = (_device(rng, m, "residential") for m in
                         ("cjt188-nb-water-std", "cjt188-nb-water-90-1f", "cjt188-nb-water-msb-status"))
    uplinks, expected = [], set()
    for dev, vendor in ((std, {}), (swapped, {"di_order": "high_first"}), (msb, {"valve_shift": 6, "battery_bit": 5})):
        for _ in range(20):
            frame = _water_frame(rng, {"di_order": vendor.get("di_order", "low_first")})
            uplinks.append((dev.device_id, frame))
            r = decoders.decode("cjt188", frame, vendor)
            expected.add((dev.device_id, r["flow_m3"], r["meter_time"], r["valve"], r["battery_low"]))
    _run(settings, [std, swapped, msb], uplinks, "water_readings", len(uplinks))
    got = set(_select(settings.database_url, "SELECT device_id, flow_m3, meter_time, valve, battery_low FROM water_readings"))
    assert got == expected


def test_gb26875_fire_frames(settings):
    rng = random.Random(2)
    uitd, smoke = _device(rng, "gb26875-uitd"), _device(rng, "gb26875-nb-smoke")
    frames = []
    for k in range(10):
        when = T0 + timedelta(minutes=k)
        frames.append((uitd.device_id, decoders.encode("gb26875", heartbeat(1001, when, serial=k))))
        frames.append((smoke.device_id, decoders.encode("gb26875", smoke_alarm(2002, 40 + k, when, None, serial=k,
                                                                              fire=k % 3 == 0))))
    expected = []
    for device_id, frame in frames:
        r = decoders.decode("gb26875", frame)
        for o in r["objects"]:
            expected.append((device_id, r["app_type"], o.get("flags", {}).get("fire_alarm"), o["time"]))
    _run(settings, [uitd, smoke], frames, "fire_events", len(expected))
    got = _select(settings.database_url, "SELECT device_id, app_type, fire_alarm, event_time FROM fire_events")
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    alarms = _select(settings.database_url, "SELECT count(*) FROM fire_events WHERE fire_alarm")[0][0]
    assert alarms == 4                                       # k = 0, 3, 6, 9


def test_gbt43229_traffic_frames(settings):
    rng = random.Random(3)
    detector = _device(rng, "gbt43229-detector", "road")
    model_settings = {"byte_order": "little", "crc": "modbus"}
    frames = [(detector.device_id, decoders.encode("gbt43229", {
        "division_code": 360100, "device_type": 2, "device_number": 7,
        "lanes": [random_lane(rng, lane) for lane in range(1, rng.randrange(1, 5) + 1)]}, model_settings))
        for _ in range(15)]
    expected = []
    for device_id, frame in frames:
        r = decoders.decode("gbt43229", frame, model_settings)
        expected += [(device_id, r["division_code"], lane["channel"], lane["count_a"], lane["speed_kmh"],
                      lane["occupancy_pct"]) for lane in r["lanes"]]
    _run(settings, [detector], frames, "traffic_flow", len(expected))
    got = _select(settings.database_url,
                  "SELECT device_id, division_code, channel, count_a, speed_kmh, occupancy_pct FROM traffic_flow")
    assert sorted(got, key=repr) == sorted(expected, key=repr)


def test_parking_frames(settings):
    rng = random.Random(4)
    sensor = _device(rng, "nb-parking-sensor", "scenic_spot")
    frames = [(sensor.device_id, decoders.encode("parking", {
        "frame_type": 0, "occupied": k % 2 == 0, "frame_counter": k, "temperature_c": 15 + k,
        "battery_mv": 3300, "mag_x": k, "mag_y": 2 * k, "mag_z": 3 * k})) for k in range(12)]
    expected = {(sensor.device_id, r["occupied"], r["frame_counter"], r["mag_y"])
                for r in (decoders.decode("parking", f) for _, f in frames)}
    _run(settings, [sensor], frames, "parking_events", len(frames))
    got = set(_select(settings.database_url, "SELECT device_id, occupied, frame_counter, mag_y FROM parking_events"))
    assert got == expected


@pytest.mark.parametrize("carrier", ["ctwing", "onenet"])
def test_carrier_envelopes_over_mqtt(settings, carrier):
    rng = random.Random(5)
    meter = _device(rng, f"{carrier}-cjt188-water", "residential")
    inner = [_water_frame(rng) for _ in range(8)]
    envelopes = []
    for k, frame in enumerate(inner):
        fields = {"imei": meter.device_id, "device_id": "12345", "received_at": T0 + timedelta(minutes=k),
                  "sequence": k, "inner_payload": frame}
        envelopes.append((meter.device_id, decoders.encode(carrier, fields,
                                                            {"value_encoding": "hex"} if carrier == "onenet" else {})))
    reports = []
    if carrier == "ctwing":         # the platform's signal report: a flat object-model push, radio only
        reports = [(meter.device_id, decoders.encode("ctwing", {
            "imei": meter.device_id, "received_at": T0 + timedelta(minutes=k), "sequence": 100 + k,
            "service_data": {"rsrp": 95 + k, "sinr": 7, "pci": 101, "ecl": 1, "cell_id": 12345}}))
            for k in range(8)]          # this module's firmware drops RSRP's sign
    _run(settings, [meter], envelopes + reports, "water_readings", len(inner))
    got = sorted(_select(settings.database_url, "SELECT flow_m3, meter_time FROM water_readings"))
    assert got == sorted((decoders.decode("cjt188", f)["flow_m3"], decoders.decode("cjt188", f)["meter_time"])
                         for f in inner)
    if carrier == "ctwing":
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM radio_readings", 8) == 8
        radio = _select(settings.database_url, "SELECT rsrp_dbm, sinr_db, pci, ecl, source FROM radio_readings")
        assert sorted(radio) == sorted((-95.0 - k, 7.0, 101, 1, "ctwing") for k in range(8))
        assert _select(settings.database_url, "SELECT count(*) FROM water_readings")[0][0] == len(inner)


@pytest.mark.parametrize("codec", ["senml-json", "senml-cbor"])
def test_senml_water_meter(settings, codec):
    rng = random.Random(6)
    meter = _device(rng, f"lwm2m-3424-water-{codec}", "residential")
    packs = []
    for k in range(6):
        records = [{"name": "/3424/0/1", "unit": "m3", "value": 10.5 + k, "time": T0 + timedelta(hours=k)},
                   {"name": "/3424/0/10", "bool_value": k == 4, "time": T0 + timedelta(hours=k)}]
        packs.append((meter.device_id, decoders.encode(codec, {"records": records})))
    _run(settings, [meter], packs, "water_readings", len(packs))
    got = sorted(_select(settings.database_url,
                         "SELECT flow_m3, meter_time, extra->>'leak_detected' FROM water_readings"))
    assert got == [(10.5 + k, T0 + timedelta(hours=k), "true" if k == 4 else "false") for k in range(6)]


def test_json_traffic_counter(settings):
    rng = random.Random(7)
    counter = _device(rng, "cat1-json-traffic-counter", "road")
    bodies = [(counter.device_id, decoders.encode("json", {
        "ts": int((T0 + timedelta(minutes=5 * k)).timestamp()), "lane": 1 + k % 3, "flow.total": 30 + k,
        "flow.large": k, "flow.medium": 5, "flow.small": 25, "occupancy": 12.5, "speed": 48.0 + k})) for k in range(9)]
    _run(settings, [counter], bodies, "traffic_flow", len(bodies))
    got = sorted(_select(settings.database_url,
                         "SELECT channel, count_a, count_c, speed_kmh, (extra->>'volume')::float FROM traffic_flow"))
    assert got == sorted((1 + k % 3, k, 25, 48.0 + k, 30.0 + k) for k in range(9))


def test_a_quiet_lane_repeating_itself_is_stored_but_a_quick_retransmission_is_not(settings):
    """GB/T 43229 frames carry neither time nor counter: identical frames minutes apart are readings;
    the same bytes again within the model's dedup window (20 s) are one uplink sent twice."""
    import time

    from ingest.batch import BatchBuilder
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer
    from iotjx.db import connect
    from iotjx.model import Uplink

    rng = random.Random(8)
    detector = _device(rng, "gbt43229-detector", "road")
    with psycopg.connect(settings.database_url) as conn:
        register_devices(conn, [detector])
    quiet = decoders.encode("gbt43229", {"division_code": 360100, "device_type": 2, "device_number": 9,
                                         "lanes": [random_lane(rng, 1)]}, {"byte_order": "little", "crc": "modbus"})
    url = settings.database_url
    pipeline = Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url)))
    now = time.time()
    arrivals = [now - 180, now - 120, now - 60, now - 55, now]     # a retransmission 5 s after the third
    for t in arrivals:
        pipeline.process([Uplink(device_id=detector.device_id, payload=quiet, transport="mqtt", received_at=t)])
    assert pipeline.counters["stored"] == 4 and pipeline.counters["duplicate"] == 1
    assert _select(url, "SELECT count(*) FROM traffic_flow")[0][0] == 4
    assert BatchBuilder(DeviceRegistry(lambda: connect(url))).dedup_windows(
        [Uplink(detector.device_id, quiet, "mqtt", now)], 86400.0) == [20.0]
