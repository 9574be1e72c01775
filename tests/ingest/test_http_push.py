"""Carrier-platform HTTP push end to end: real CTWing and OneNET push bodies (tests/decoders/cases)
through the gateway's push endpoint into the real PostgreSQL, answered only after the commit."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

import decoders
from ingest.gateway import Gateway
from iotjx.devices import DeviceRecord, register_devices
from simulators.water import make_meters
from tests.helpers import register_fleet

CASES = Path(__file__).parents[1] / "decoders" / "cases"
CTWING_TOKEN = "ctw-9f2c41d07be5a8e3"
ONENET_TOKEN = "onenetPushToken2024"
MAX_BODY = 4096

LIAN_IMEI = "860374051096202"        # ctwing/lian_smoke_servicedata
HUAQIANG_IMEI = "860803030676429"    # ctwing/huaqiang_appdata_lwm2m
AKR_IMEI = "866971031491171"         # onenet/akr_meter_hex
LOGIN_IMEI = "866971030389733"       # onenet/login_online


def _case(carrier: str, name: str) -> bytes:
    return (CASES / carrier / f"{name}.txt").read_bytes().strip()


def _sign(msg_text: str, nonce: str, token: str = ONENET_TOKEN, key: str = "msg_signature") -> bytes:
    """A OneNET body around `msg_text` exactly, signed per OneNET's manual (computed here, not by iotjx)."""
    signature = base64.b64encode(hashlib.md5((token + nonce + msg_text).encode()).digest()).decode()
    return ('{"msg":' + msg_text + ',"' + key + '":' + json.dumps(signature) + ',"nonce":' + json.dumps(nonce)
            + "}").encode()


def _water_row(device_id: str, frame: bytes) -> tuple:
    r = decoders.decode("cjt188", frame)
    return (device_id, r["meter_address"], r["flow_m3"], r["meter_time"], r["status"], r["valve"], "http")


@pytest.fixture
def push(settings, no_thread_leaks):
    cfg = settings.model_copy(update={"http_push_enabled": True, "http_push_bind": "127.0.0.1:0",
                                      "http_push_max_body": MAX_BODY, "ctwing_push_token": CTWING_TOKEN,
                                      "onenet_push_token": ONENET_TOKEN})
    records = [DeviceRecord(device_id=i, model=m, network="nbiot", city="Yingtan", site_kind="residential",
                            site_name="月湖区 龙岗小区")
               for i, m in ((LIAN_IMEI, "ctwing-lian-smoke"), (HUAQIANG_IMEI, "ctwing-cjt188-water"),
                            (AKR_IMEI, "onenet-cjt188-water"), (LOGIN_IMEI, "onenet-cjt188-water"))]
    with psycopg.connect(cfg.database_url) as conn:
        register_devices(conn, records)
    gateway = Gateway(cfg)
    gateway.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=60) as client:
            yield client, cfg
    finally:
        gateway.stop()


def _frames(db_url: str, n: int) -> list[bytes]:
    meter = make_meters(register_fleet(db_url, 1, seed=31), seed=31)[0]
    return [meter.frame(datetime(2026, 11, 7, h, tzinfo=UTC)) for h in range(n)]


def test_ctwing_pushes_stored_once_and_refusals(push):
    client, cfg = push
    db = cfg.database_url
    frame = _frames(db, 1)[0]
    hdr = {"X-Push-Token": CTWING_TOKEN}
    lian = _case("ctwing", "lian_smoke_servicedata")
    body = json.loads(_case("ctwing", "huaqiang_appdata_lwm2m"))
    body["payload"]["APPdata"] = base64.b64encode(frame).decode()      # a real envelope around a meter frame
    water = json.dumps(body).encode()
    truncated = _case("ctwing", "truncated_body")
    bad_event = _case("ctwing", "bad_event_type")

    answers = {
        "lian": client.post("/push/ctwing", content=lian, headers=hdr),
        "water": client.post("/push/ctwing", content=water, headers=hdr),
        "retry": client.post("/push/ctwing", content=water, headers=hdr),          # the platform pushes again
        "query_token": client.post(f"/push/ctwing?token={CTWING_TOKEN}", content=water, headers={}),
        "truncated": client.post("/push/ctwing", content=truncated, headers=hdr),
        "bad_event": client.post("/push/ctwing", content=bad_event, headers=hdr),
        "wrong_token": client.post("/push/ctwing", content=lian, headers={"X-Push-Token": "nope-" + CTWING_TOKEN}),
        "no_token": client.post("/push/ctwing", content=lian),
        "too_large": client.post("/push/ctwing", content=b"{" + b" " * MAX_BODY + b"}", headers=hdr),
    }
    status = {k: r.status_code for k, r in answers.items()}
    assert status == {"lian": 202, "water": 202, "retry": 202, "query_token": 202, "truncated": 422,
                      "bad_event": 422, "wrong_token": 401, "no_token": 401, "too_large": 413}
    assert answers["water"].json()["status"] == "stored"
    assert answers["retry"].json()["status"] == "duplicate"
    problem = answers["truncated"]
    assert problem.headers["content-type"] == "application/problem+json"
    assert problem.json()["reason"] == "syntax" and problem.json()["detail"]

    expected_radio = decoders.decode("ctwing", lian)["radio"]
    with psycopg.connect(db) as conn:
        rows = conn.execute("""SELECT device_id, meter_address, flow_m3, meter_time, status, valve, transport
                               FROM water_readings""").fetchall()
        radio = conn.execute("""SELECT device_id, source, rsrp_dbm, sinr_db, rsrq_db, ecl, pci, cell_id, transport
                                FROM radio_readings""").fetchall()
        fire = conn.execute("SELECT device_id, extra FROM fire_events").fetchall()
        rejects = Counter((bytes(p), r, t) for p, r, t in conn.execute(
            "SELECT payload, reason, transport FROM rejected_uplinks"))
        raw = Counter(conn.execute("SELECT outcome FROM raw_uplinks").fetchall())
    assert rows == [_water_row(HUAQIANG_IMEI, frame)]                   # stored once though pushed 3 times
    assert radio == [(LIAN_IMEI, "ctwing", expected_radio["rsrp_dbm"], expected_radio["sinr_db"],
                      expected_radio["rsrq_db"], expected_radio["ecl"], expected_radio["pci"],
                      expected_radio["cell_id"], "http")]
    assert expected_radio["rsrp_dbm"] == -114.0                          # the device's magnitude, negated
    assert len(fire) == 1 and fire[0][0] == LIAN_IMEI
    assert rejects == Counter({(truncated, "syntax", "http"): 1, (bad_event, "value", "http"): 1})
    assert raw == Counter({("stored",): 2, ("duplicate",): 2, ("rejected:syntax",): 1, ("rejected:value",): 1})


def test_onenet_pushes_signatures_verification_and_refusals(push):
    client, cfg = push
    db = cfg.database_url
    frames = _frames(db, 2)
    msg = json.loads(_case("onenet", "akr_meter_hex"))["msg"]
    msg["value"] = frames[0].hex().upper()              # the real envelope around a CJ/T 188 frame
    compact = _sign(json.dumps(msg, separators=(",", ":")), "I$TLyP&f")
    msg["value"] = frames[1].hex().upper()
    spaced = _sign(json.dumps(msg), "a1B2c3D4")         # signed over the text as sent, spaces and all
    login_text = json.dumps(json.loads(_case("onenet", "login_online"))["msg"], separators=(",", ":"))
    login = _sign(login_text, "Zx9!Qw2e")
    variant_msg = json.dumps(json.loads(_case("onenet", "text_value_signature_variant"))["msg"],
                             separators=(",", ":"))
    variant = _sign(variant_msg, "h9(2&z&z", key="signature")      # the `signature` spelling; IMEI unknown
    unknown_type = _sign(json.dumps(json.loads(_case("onenet", "unknown_type"))["msg"]), "nonce123")
    real_signature = _case("onenet", "akr_meter_hex")                # signed with a token we do not have

    answers = {
        "compact": client.post("/push/onenet", content=compact),
        "spaced": client.post("/push/onenet", content=spaced),
        "retry": client.post("/push/onenet", content=compact),
        "login": client.post("/push/onenet", content=login),
        "variant": client.post("/push/onenet", content=variant),
        "unknown_type": client.post("/push/onenet", content=unknown_type),
        "foreign_token": client.post("/push/onenet", content=real_signature),
        "unsigned": client.post("/push/onenet", content=_case("onenet", "login_online")),
        "tampered": client.post("/push/onenet", content=compact.replace(b'"type":1', b'"type":2')),
        "too_large": client.post("/push/onenet", content=compact + b" " * MAX_BODY),
    }
    status = {k: r.status_code for k, r in answers.items()}
    assert status == {"compact": 200, "spaced": 200, "retry": 200, "login": 200, "variant": 404,
                      "unknown_type": 422, "foreign_token": 401, "unsigned": 401, "tampered": 401,
                      "too_large": 413}
    assert answers["retry"].json()["status"] == "duplicate"
    assert answers["unknown_type"].json()["reason"] == "unsupported"

    # OneNET's URL verification: GET with msg, nonce, signature; echo msg when the signature holds.
    signature = base64.b64encode(hashlib.md5((ONENET_TOKEN + "n0nce" + "hello123").encode()).digest()).decode()
    ok = client.get("/push/onenet", params={"msg": "hello123", "nonce": "n0nce", "signature": signature})
    assert (ok.status_code, ok.text) == (200, "hello123")
    assert client.get("/push/onenet", params={"msg": "hello123", "nonce": "other", "signature": signature}
                      ).status_code == 401

    with psycopg.connect(db) as conn:
        rows = conn.execute("""SELECT device_id, meter_address, flow_m3, meter_time, status, valve, transport
                               FROM water_readings""").fetchall()
        raw = Counter(conn.execute("SELECT device_id, outcome FROM raw_uplinks").fetchall())
        rejects = Counter(conn.execute("SELECT reason FROM rejected_uplinks").fetchall())
    assert Counter(rows) == Counter([_water_row(AKR_IMEI, frames[0]), _water_row(AKR_IMEI, frames[1])])
    assert raw[(LOGIN_IMEI, "event:online")] == 1
    assert raw[(AKR_IMEI, "stored")] == 2
    assert rejects == Counter({("unknown_device",): 1, ("unsupported",): 1})


def test_no_answer_before_the_commit(push):
    client, cfg = push
    frame = _frames(cfg.database_url, 1)[0]
    body = json.loads(_case("ctwing", "huaqiang_appdata_lwm2m"))
    body["payload"]["APPdata"] = base64.b64encode(frame).decode()
    blocker = psycopg.connect(cfg.database_url)
    blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")
    answers: list = []
    sender = threading.Thread(target=lambda: answers.append(client.post(
        "/push/ctwing", content=json.dumps(body).encode(), headers={"X-Push-Token": CTWING_TOKEN})))
    try:
        sender.start()
        sender.join(1.5)
        assert sender.is_alive() and not answers           # still waiting on the commit
    finally:
        blocker.rollback()
        blocker.close()
    sender.join(30)
    assert answers[0].status_code == 202 and answers[0].json()["status"] == "stored"
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == 1


def test_unconfigured_carrier_is_refused(settings, no_thread_leaks):
    cfg = settings.model_copy(update={"http_push_enabled": True, "http_push_bind": "127.0.0.1:0"})
    gateway = Gateway(cfg)
    gateway.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}") as client:
            body = _case("ctwing", "lian_smoke_servicedata")
            assert client.post("/push/ctwing", content=body).status_code == 503
            assert client.post("/push/onenet", content=_case("onenet", "akr_meter_hex")).status_code == 503
    finally:
        gateway.stop()
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM raw_uplinks").fetchone()[0] == 0
