"""Downlinks for sleeping devices: queued through the API, handed over on the device's next uplink
(in the CoAP response; as an MQTT publish on its down topic), acknowledged, or expired by time —
each status transition read back from the database."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from datetime import UTC, datetime, timedelta

import aiocoap
import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiocoap.numbers import codes
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from api.app import create_app
from ingest.coap import set_device_token
from ingest.downlink import build_payload, parse_ack_ids
from ingest.gateway import Gateway
from iotjx.mqtt_accounts import set_device_password
from simulators.water import make_meters
from tests.helpers import bearer, insert_key, register_fleet, wait_until as _wait


def _valve_frame(close: bool, di_low_first: bool = True) -> bytes:
    """CJ/T 188 write-data frame, DI A017, broadcast address, computed here byte by byte."""
    di = [0x17, 0xA0] if di_low_first else [0xA0, 0x17]
    body = [0x68, 0x10] + [0xAA] * 7 + [0x04, 0x04] + di + [0x00, 0x99 if close else 0x55]
    return bytes([0xFE, 0xFE] + body + [sum(body) % 256, 0x16])


def _status(db_url: str, downlink_id: int) -> tuple:
    with psycopg.connect(db_url) as conn:
        return conn.execute("""SELECT status, transport, attempts, sent_at IS NOT NULL, acked_at IS NOT NULL
                               FROM downlinks WHERE id = %s""", (downlink_id,)).fetchone()




@pytest.fixture
def stack(settings, no_thread_leaks):
    cfg = settings.model_copy(update={"coap_enabled": True, "coap_bind": "127.0.0.1:0", "downlink_poll_s": 0.2})
    gateway = Gateway(cfg)
    gateway.start()
    app = create_app(cfg)
    try:
        with TestClient(app, headers=bearer(insert_key(cfg.database_url, "admin"))) as api:
            yield gateway, api, cfg
    finally:
        gateway.stop()


def test_api_builds_and_refuses_commands(stack):
    gateway, api, cfg = stack
    device = register_fleet(cfg.database_url, 1, seed=40)[0].record.device_id
    made = api.post(f"/devices/{device}/downlinks", json={"kind": "valve_close"})
    assert made.status_code == 201, made.text
    assert made.json()["payload_hex"] == _valve_frame(True).hex() and made.json()["status"] == "queued"
    assert api.post(f"/devices/{device}/downlinks", json={"kind": "set_interval", "params": {"interval_s": 3600}}
                    ).status_code == 422                     # no CJ/T 188 encoder for it: bytes needed
    assert api.post(f"/devices/{device}/downlinks", json={"kind": "raw", "payload_hex": "zz"}).status_code == 422
    assert api.post("/devices/869999999999999/downlinks", json={"kind": "valve_open"}).status_code == 404
    assert api.put("/devices/869999999999999/coap-token", json={}).status_code == 404
    assert api.put(f"/devices/{device}/coap-token", json={"token": "short"}).status_code == 422
    assert parse_ack_ids(" 12, 13 ") == [12, 13] and parse_ack_ids("") is None
    # Structured codecs: the command in the device's own format.
    assert (build_payload("json", {}, "set_interval", {"interval_s": 900})
            == b'{"command":"set_interval","interval_s":900}')
    assert build_payload("senml-json", {}, "valve_open", {}) == b'[{"n":"valve","vs":"open"}]'
    assert build_payload("cjt188", {"di_order": "high_first"}, "valve_open", {}) == _valve_frame(False, False)


def test_coap_device_gets_commands_on_its_next_uplinks_and_acks_them(stack):
    gateway, api, cfg = stack
    db = cfg.database_url
    meter = make_meters(register_fleet(db, 1, seed=41), seed=41)[0]
    device = meter.device_id
    token = api.put(f"/devices/{device}/coap-token", json={}).json()["token"]   # the API's token works over CoAP
    first = api.post(f"/devices/{device}/downlinks", json={"kind": "valve_close"}).json()
    second = api.post(f"/devices/{device}/downlinks", json={"kind": "raw", "payload_hex": "a5010203"}).json()
    assert _status(db, first["id"]) == ("queued", None, 0, False, False)
    assert _wait(lambda: gateway.downlinks.has_pending(device))
    url = f"coap://127.0.0.1:{gateway.coap.port}/up/{device}?t={token}"
    now = datetime(2026, 11, 8, 2, tzinfo=UTC)

    async def uplink(ctx, k: int, ack: int | None = None) -> aiocoap.Message:
        meter.advance(now + timedelta(hours=k), 3600)
        request = aiocoap.Message(code=aiocoap.POST, uri=url + (f"&ack={ack}" if ack else ""),
                                  payload=meter.frame(now + timedelta(hours=k)), content_format=42)
        return await asyncio.wait_for(ctx.request(request).response, 30)

    async def sleeping_device():
        ctx = await aiocoap.Context.create_client_context()
        try:
            wake1 = await uplink(ctx, 1)
            state1 = (_status(db, first["id"]), _status(db, second["id"]))
            wake2 = await uplink(ctx, 2, ack=first["id"])
            state2 = (_status(db, first["id"]), _status(db, second["id"]))
            wake3 = await uplink(ctx, 3, ack=second["id"])
            return wake1, state1, wake2, state2, wake3
        finally:
            await ctx.shutdown()

    wake1, state1, wake2, state2, wake3 = asyncio.run(sleeping_device())
    assert wake1.code == codes.CHANGED and wake1.payload == _valve_frame(True)
    assert list(wake1.opt.location_query) == [f"dl={first['id']}"]
    assert state1 == (("sent", "coap", 1, True, False), ("queued", None, 0, False, False))
    assert wake2.code == codes.CHANGED and wake2.payload == bytes.fromhex("a5010203")
    assert list(wake2.opt.location_query) == [f"dl={second['id']}"]
    assert state2 == (("acknowledged", "coap", 1, True, True), ("sent", "coap", 1, True, False))
    assert wake3.code == codes.CHANGED and wake3.payload == b"" and not wake3.opt.location_query
    assert _status(db, second["id"]) == ("acknowledged", "coap", 1, True, True)
    with psycopg.connect(db) as conn:          # the uplinks themselves were stored as usual
        assert conn.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (device,)).fetchone()[0] == 3
    listed = api.get(f"/devices/{device}/downlinks").json()["items"]
    assert [(d["id"], d["status"]) for d in listed] == [(second["id"], "acknowledged"), (first["id"], "acknowledged")]
    assert api.get(f"/downlinks/{first['id']}").json()["acked_at"] is not None
    assert api.get("/downlinks/987654321").status_code == 404


def test_commands_expire_by_time(stack):
    gateway, api, cfg = stack
    db = cfg.database_url
    meter = make_meters(register_fleet(db, 1, seed=42), seed=42)[0]
    with psycopg.connect(db) as conn:
        token = set_device_token(conn, meter.device_id)
    queued = api.post(f"/devices/{meter.device_id}/downlinks", json={"kind": "valve_open", "ttl_s": 60}).json()
    with psycopg.connect(db) as conn:      # let its time pass
        conn.execute("UPDATE downlinks SET expires_at = now() - interval '1 second' WHERE id = %s", (queued["id"],))
    assert _wait(lambda: _status(db, queued["id"])[0] == "expired")
    assert not gateway.downlinks.has_pending(meter.device_id)

    async def wake():
        ctx = await aiocoap.Context.create_client_context()
        try:
            request = aiocoap.Message(code=aiocoap.POST, payload=meter.frame(datetime(2026, 11, 9, tzinfo=UTC)),
                                      uri=f"coap://127.0.0.1:{gateway.coap.port}/up/{meter.device_id}?t={token}")
            return await asyncio.wait_for(ctx.request(request).response, 30)
        finally:
            await ctx.shutdown()

    answer = asyncio.run(wake())
    assert answer.code == codes.CHANGED and answer.payload == b""       # nothing expired is handed over
    assert _status(db, queued["id"]) == ("expired", None, 0, False, False)


def test_mqtt_device_gets_command_on_its_down_topic_after_its_next_uplink(stack, broker):
    gateway, api, cfg = stack
    db = cfg.database_url
    assert gateway.mqtt.wait_connected(10) and gateway.downlinks.mqtt.connected.wait(10)
    meter = make_meters(register_fleet(db, 1, seed=43), seed=43)[0]
    device = meter.device_id
    prefix = cfg.mqtt_topic_prefix
    v5 = broker.protocol == "5"
    received: queue.Queue = queue.Queue()
    host, port = "127.0.0.1", broker.device_port
    with psycopg.connect(db) as conn:                   # the device's own account, on the device listener
        password = set_device_password(conn, device)
    broker.sync(db)

    def device_client() -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device}-{uuid.uuid4().hex[:4]}",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        client.username_pw_set(device, password)
        client.on_message = lambda c, u, msg: received.put(msg)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/down/{device}", qos=1)
        client.connect(host, port)
        client.loop_start()
        assert subscribed.wait(10)
        return client

    queued = api.post(f"/devices/{device}/downlinks", json={"kind": "valve_close"}).json()
    assert _wait(lambda: gateway.downlinks.has_pending(device))
    assert _status(db, queued["id"])[0] == "queued"
    client = device_client()                             # the device wakes up
    try:
        assert received.empty()                          # nothing before it sends
        frame = meter.frame(datetime(2026, 11, 10, 6, tzinfo=UTC))
        client.publish(f"{prefix}/up/{device}", frame, qos=1).wait_for_publish(10)
        msg = received.get(timeout=20)
        assert msg.topic == f"{prefix}/down/{device}" and msg.payload == _valve_frame(True) and msg.qos == 1
        if v5:
            assert ("downlink_id", str(queued["id"])) in msg.properties.UserProperty
        assert _status(db, queued["id"]) == ("sent", "mqtt", 1, True, False)
        client.publish(f"{prefix}/ack/{device}", str(queued["id"]).encode(), qos=1).wait_for_publish(10)
        assert _wait(lambda: _status(db, queued["id"])[0] == "acknowledged")
        assert _status(db, queued["id"]) == ("acknowledged", "mqtt", 1, True, True)
    finally:
        client.disconnect()
        client.loop_stop()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (device,)).fetchone()[0] == 1
