"""Carrier-platform HTTP push end to end: real CTWing and OneNET push bodies (tests/decoders/cases)
through the gateway's push endpoint into the real PostgreSQL, answered only after the commit."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter
from contextlib import contextmanager
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


def _fresh(msg: dict, age_s: float = 0.0) -> dict:
    """A OneNET msg from a case file with its platform time `age_s` before now (the cases are from 2019)."""
    return {**msg, "at": int((time.time() - age_s) * 1000)}


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
    msg = _fresh(json.loads(_case("onenet", "akr_meter_hex"))["msg"])
    msg["value"] = frames[0].hex().upper()              # the real envelope around a CJ/T 188 frame
    compact = _sign(json.dumps(msg, separators=(",", ":")), "I$TLyP&f")
    msg["value"] = frames[1].hex().upper()
    spaced = _sign(json.dumps(msg), "a1B2c3D4")         # signed over the text as sent, spaces and all
    login_text = json.dumps(_fresh(json.loads(_case("onenet", "login_online"))["msg"]), separators=(",", ":"))
    login = _sign(login_text, "Zx9!Qw2e")
    variant_msg = json.dumps(_fresh(json.loads(_case("onenet", "text_value_signature_variant"))["msg"]),
                             separators=(",", ":"))
    variant = _sign(variant_msg, "h9(2&z&z", key="signature")      # the `signature` spelling; IMEI unknown
    unknown_type = _sign(json.dumps(_fresh(json.loads(_case("onenet", "unknown_type"))["msg"])), "nonce123")
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
    assert answers["retry"].json() == {"status": "duplicate"}            # the same nonce: answered at the door
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


# ------------------------------------------------------------------------- replays and re-serialised retries

def _ctwing(frame: bytes, sn: int, at_ms: int) -> dict:
    """The real CTWing envelope around a meter frame, with a packet number and a platform time."""
    body = json.loads(_case("ctwing", "huaqiang_appdata_lwm2m"))
    body.update(upPacketSN=sn, timestamp=at_ms)
    body["payload"]["APPdata"] = base64.b64encode(frame).decode()
    return body


def _outcomes(answers: dict) -> dict:
    return {k: (r.status_code, r.json().get("status") or r.json().get("reason")) for k, r in answers.items()}


def test_a_push_re_serialised_is_one_uplink_and_different_messages_are_not(push):
    """The dedup key is the message the envelope names, not the body's bytes: the same push with
    other whitespace, key order, an added member (OneNET: signed again with another nonce) is stored
    once, by this gateway and by another one (a second writer) alike; two messages of one device that
    differ in packet number, time or payload are both stored."""
    client, cfg = push
    db = cfg.database_url
    frames = _frames(db, 2)
    hdr = {"X-Push-Token": CTWING_TOKEN}
    now_ms = int(time.time() * 1000)
    body = _ctwing(frames[0], 7, now_ms)
    post = lambda content: client.post("/push/ctwing", content=content, headers=hdr)   # noqa: E731
    answers = {
        "first": post(json.dumps(body, separators=(",", ":")).encode()),
        "spaced": post(json.dumps(body, indent=2).encode()),
        "reordered": post(json.dumps(dict(reversed(list(body.items())))).encode()),
        "added_member": post(json.dumps({**body, "assocAssetId": "x", "gatewayHint": {"hop": 2}}).encode()),
        "next_packet": post(json.dumps(_ctwing(frames[0], 8, now_ms)).encode()),        # same bytes, next SN
        "later": post(json.dumps(_ctwing(frames[0], 7, now_ms + 60_000)).encode()),     # same SN, later time
        "other_frame": post(json.dumps(_ctwing(frames[1], 7, now_ms)).encode()),
    }
    assert _outcomes(answers) == {"first": (202, "stored"), "spaced": (202, "duplicate"),
                                  "reordered": (202, "duplicate"), "added_member": (202, "duplicate"),
                                  "next_packet": (202, "stored"), "later": (202, "stored"),
                                  "other_frame": (202, "stored")}

    msg = _fresh(json.loads(_case("onenet", "akr_meter_hex"))["msg"])
    msg["value"] = frames[1].hex().upper()
    onenet = {
        "first": client.post("/push/onenet", content=_sign(json.dumps(msg, separators=(",", ":")), "n1-Aa9")),
        # the platform's retry: signed again with a new nonce, its JSON written another way
        "resigned": client.post("/push/onenet", content=_sign(json.dumps(dict(reversed(list(msg.items())))),
                                                              "n2-Bb8")),
        "added_member": client.post("/push/onenet", content=_sign(json.dumps({**msg, "login_type": 10}),
                                                                  "n3-Cc7")),
        "next_reading": client.post("/push/onenet", content=_sign(json.dumps({**msg, "at": msg["at"] + 1000}),
                                                                  "n4-Dd6")),
    }
    assert _outcomes(onenet) == {"first": (200, "stored"), "resigned": (200, "duplicate"),
                                 "added_member": (200, "duplicate"), "next_reading": (200, "stored")}

    # Another gateway (its own writer and connection) given a re-serialised copy: the claim is shared.
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer
    from iotjx.db import connect
    from iotjx.model import Uplink
    registry, writer = DeviceRegistry(lambda: connect(db)), Writer(lambda: connect(db))
    try:
        ws = Pipeline(registry, writer).process([Uplink(
            device_id="", payload=json.dumps(body, indent=4, sort_keys=True).encode(), transport="http",
            received_at=time.time(), meta={"envelope": "ctwing", "peer": "127.0.0.2"})])
    finally:
        writer.close()
        registry.close()
    assert ws.duplicates == 1 and ws.stored == 0

    with psycopg.connect(db) as conn:
        rows = Counter(conn.execute("""SELECT device_id, meter_address, flow_m3, meter_time, status, valve, transport
                                       FROM water_readings""").fetchall())
        raw = Counter(conn.execute("SELECT device_id, outcome FROM raw_uplinks").fetchall())
    assert rows == Counter({_water_row(HUAQIANG_IMEI, frames[0]): 3, _water_row(HUAQIANG_IMEI, frames[1]): 1,
                            _water_row(AKR_IMEI, frames[1]): 2})
    assert raw == Counter({(HUAQIANG_IMEI, "stored"): 4, (AKR_IMEI, "stored"): 2,
                           ("", "duplicate"): 6})           # a duplicate's envelope is not opened


def test_onenet_pushes_outside_the_freshness_window_or_replayed_are_refused(push):
    """msg.at further than IOTJX_ONENET_PUSH_MAX_AGE_S from now (either way), or missing, is refused;
    so is a nonce already accepted, also inside a body written another way; each with a problem
    document naming why.  Nothing of them is stored or logged."""
    client, cfg = push
    db = cfg.database_url
    window = cfg.onenet_push_max_age_s
    frames = _frames(db, 1)
    msg = _fresh(json.loads(_case("onenet", "akr_meter_hex"))["msg"])
    msg["value"] = frames[0].hex().upper()
    text = json.dumps(msg, separators=(",", ":"))
    accepted = _sign(text, "fresh-01")
    no_time = {k: v for k, v in msg.items() if k != "at"}
    answers = {
        "accepted": client.post("/push/onenet", content=accepted),
        "replayed": client.post("/push/onenet", content=accepted),
        "replayed_respaced": client.post("/push/onenet", content=b"  " + accepted.replace(b',"nonce"', b', "nonce"')),
        "stale": client.post("/push/onenet", content=_sign(json.dumps({**msg, "at": msg["at"] - int(window + 120) * 1000}),
                                                           "stale-01")),
        "future": client.post("/push/onenet", content=_sign(json.dumps({**msg, "at": msg["at"] + int(window + 120) * 1000}),
                                                            "future-1")),
        "no_time": client.post("/push/onenet", content=_sign(json.dumps(no_time), "notime-1")),
    }
    assert {k: r.status_code for k, r in answers.items()} == {
        "accepted": 200, "replayed": 200, "replayed_respaced": 200, "stale": 401, "future": 401, "no_time": 401}
    # A replay of a push already taken is answered as the duplicate it is, without reaching the
    # pipeline (a genuine OneNET retry after a lost 200 must not be refused, or it retries for ever).
    assert answers["replayed"].json() == answers["replayed_respaced"].json() == {"status": "duplicate"}
    for name, reason in (("stale", "stale"), ("future", "stale"), ("no_time", "stale")):
        answer = answers[name]
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["reason"] == reason and answer.json()["detail"], name
    assert "IOTJX_ONENET_PUSH_MAX_AGE_S" in answers["stale"].json()["detail"]

    # A second replica has not seen the nonce: the replay passes its door and the shared dedup claim
    # answers it as what it is, a duplicate.
    with _push_endpoint(cfg) as (other, _):
        across = other.post("/push/onenet", content=accepted)
    assert (across.status_code, across.json()["status"]) == (200, "duplicate")
    with psycopg.connect(db) as conn:
        raw = Counter(conn.execute("SELECT device_id, outcome FROM raw_uplinks").fetchall())
    assert raw == Counter({(AKR_IMEI, "stored"): 1, ("", "duplicate"): 1})


@contextmanager
def _push_endpoint(cfg, *, start_pipeline: bool = True, queue_max: int = 50_000):
    """A push endpoint on a pipeline of its own (a replica, or one that takes nothing until started)."""
    from ingest.http import HttpPushIngest
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer
    from iotjx.db import connect
    db = cfg.database_url
    registry, writer = DeviceRegistry(lambda: connect(db)), Writer(lambda: connect(db))
    pipeline = Pipeline(registry, writer, batch_age_s=0.05, queue_max=queue_max)
    if start_pipeline:
        pipeline.start()
    endpoint = HttpPushIngest(cfg, getattr(pipeline, "try_submit", pipeline.submit))   # (main had no try_submit)
    endpoint.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{endpoint.port}", timeout=30) as client:
            yield client, pipeline
    finally:
        endpoint.stop()
        pipeline.stop()
        writer.close()
        registry.close()


def test_backpressure_is_answered_at_once_with_503_and_nothing_is_lost(settings, no_thread_leaks):
    """A pipeline that takes nothing (not started, a queue of 2): pushes past the queue get 503 +
    Retry-After at once, a wrong token its 401, while the two queued ones wait; those not committed
    within IOTJX_HTTP_PUSH_ANSWER_S get 503 too.  Once the pipeline runs, every push sent again is
    stored exactly once (the ones that were queued answer as duplicates), the 503'd OneNET nonce
    included (a push not taken is not a replay)."""
    cfg = settings.model_copy(update={"http_push_enabled": True, "http_push_bind": "127.0.0.1:0",
                                      "ctwing_push_token": CTWING_TOKEN, "onenet_push_token": ONENET_TOKEN,
                                      "http_push_answer_s": 3.0})
    db = cfg.database_url
    meters = make_meters(register_fleet(db, 6, seed=41), seed=41)
    with psycopg.connect(db) as conn:
        register_devices(conn, [DeviceRecord(device_id=m.device_id + "9", model="ctwing-cjt188-water",
                                             network="nbiot", city="Yingtan", site_kind="residential",
                                             site_name="月湖区 龙岗小区") for m in meters]
                         + [DeviceRecord(device_id=AKR_IMEI, model="onenet-cjt188-water", network="nbiot",
                                         city="Yingtan", site_kind="residential", site_name="月湖区 龙岗小区")])
    now_ms = int(time.time() * 1000)
    bodies = {}
    for k, m in enumerate(meters):
        body = _ctwing(m.frame(datetime(2026, 11, 7, 9, tzinfo=UTC)), k, now_ms)
        body["IMEI"] = m.device_id + "9"
        bodies[f"ctwing{k}"] = ("/push/ctwing", json.dumps(body).encode(), {"X-Push-Token": CTWING_TOKEN})
    msg = _fresh(json.loads(_case("onenet", "akr_meter_hex"))["msg"])
    msg["value"] = meters[0].frame(datetime(2026, 11, 7, 10, tzinfo=UTC)).hex().upper()
    bodies["onenet"] = ("/push/onenet", _sign(json.dumps(msg), "bp-nonce"), {})

    with _push_endpoint(cfg, start_pipeline=False, queue_max=2) as (client, pipeline):
        first: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            path, content, headers = bodies[name]
            first[name] = client.post(path, content=content, headers=headers)

        senders = [threading.Thread(target=send, args=(name,)) for name in bodies]
        for t in senders:
            t.start()
        wrong = client.post("/push/ctwing", content=bodies["ctwing0"][1], headers={"X-Push-Token": "wrong-token"})
        for t in senders:
            t.join(60)
        assert wrong.status_code == 401
        assert len(first) == len(bodies)
        statuses = Counter(r.status_code for r in first.values())
        assert statuses == Counter({503: len(bodies)})        # 2 queued (not committed in time), 5 refused
        for answer in first.values():
            assert answer.headers["content-type"] == "application/problem+json"
            assert int(answer.headers["Retry-After"]) > 0 and answer.json()["reason"] == "busy"
        pipeline.start()
        deadline = time.monotonic() + 30
        while pipeline.queue_depth and time.monotonic() < deadline:      # the two queued ones taken
            time.sleep(0.05)
        again = {}
        for name, (path, content, headers) in bodies.items():
            again[name] = client.post(path, content=content, headers=headers)
    assert all(r.status_code in (200, 202) for r in again.values()), {k: r.text[:300] for k, r in again.items() if r.status_code >= 300}
    outcomes = Counter(r.json()["status"] for r in again.values())
    assert outcomes == Counter({"stored": len(bodies) - 2, "duplicate": 2})
    with psycopg.connect(db) as conn:
        stored = Counter(conn.execute("SELECT device_id FROM raw_uplinks WHERE outcome = 'stored'").fetchall())
    assert stored == Counter({(m.device_id + "9",): 1 for m in meters} | {(AKR_IMEI,): 1})


def test_an_uplink_past_its_models_size_limit_is_answered_413(settings, no_thread_leaks):
    """The pipeline's `too_large` reject (a device model's size limit, checked after the envelope is
    opened) is answered 413 with the reason, like the body limit.  The pipeline is stood in for by
    one that acknowledges that outcome from another thread, after a moment, as the writer does."""
    from ingest.http import HttpPushIngest
    from iotjx.model import Outcome

    cfg = settings.model_copy(update={"http_push_enabled": True, "http_push_bind": "127.0.0.1:0",
                                      "ctwing_push_token": CTWING_TOKEN})

    def try_submit(uplink) -> bool:
        threading.Timer(0.05, uplink.ack, [Outcome("rejected", "too_large", "2,048 bytes; the model allows 512")]).start()
        return True

    endpoint = HttpPushIngest(cfg, try_submit)
    endpoint.start()
    try:
        answer = httpx.post(f"http://127.0.0.1:{endpoint.port}/push/ctwing", content=_case("ctwing", "huaqiang_appdata_lwm2m"),
                            headers={"X-Push-Token": CTWING_TOKEN}, timeout=30)
    finally:
        endpoint.stop()
    assert answer.status_code == 413 and answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["reason"] == "too_large" and "512" in answer.json()["detail"]


def test_a_onenet_nonce_is_in_flight_then_taken_or_released_and_forgotten_after_the_window():
    """What the door answers the same signed push again: wait (503) while the first waits for its
    commit, a duplicate once it was taken, the pipeline again once it was not; nothing after the window."""
    from ingest.http import NonceWindow, SignedPush

    window = NonceWindow(60.0, max_entries=3)
    push, other = SignedPush("n1", "s1", (1.0,)), SignedPush("n2", "s2", (1.0,))
    assert window.reserve(push, now=0.0) == NonceWindow.NEW
    assert window.reserve(push, now=1.0) == NonceWindow.IN_FLIGHT
    window.taken(push)
    assert window.reserve(push, now=2.0) == NonceWindow.TAKEN
    assert window.reserve(other, now=2.0) == NonceWindow.NEW
    window.release(other)                                   # not taken: its retry is new again
    assert window.reserve(other, now=3.0) == NonceWindow.NEW
    assert window.reserve(push, now=61.0) == NonceWindow.NEW     # past the window: forgotten
    for i in range(5):                                      # the bound: the oldest go first
        window.reserve(SignedPush(f"x{i}", "s", (1.0,)), now=62.0)
    assert window.reserve(other, now=62.0) == NonceWindow.NEW


def test_a_testers_push_keeps_its_original_receive_time_and_nobody_elses_does(push):
    from iotjx import mqtt_accounts

    client, cfg = push
    db = cfg.database_url
    with psycopg.connect(db) as conn:
        tester_pw = mqtt_accounts.set_service_account(conn, "tester-h", "tester")
        gateway_pw = mqtt_accounts.set_service_account(conn, "gateway-h", "gateway")

    def basic(name: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()

    def water(frame: bytes) -> bytes:
        body = json.loads(_case("ctwing", "huaqiang_appdata_lwm2m"))
        body["payload"]["APPdata"] = base64.b64encode(frame).decode()
        return json.dumps(body).encode()

    inner = _frames(db, 6)
    frames = [water(f) for f in inner[:4]]
    t0 = time.time() - 5 * 86400 + 0.5

    def onenet(frame: bytes, nonce: str) -> bytes:      # signed, its platform time `at` the original time
        msg = {**json.loads(_case("onenet", "akr_meter_hex"))["msg"], "at": int(t0 * 1000)}
        msg["value"] = frame.hex().upper()
        return _sign(json.dumps(msg, separators=(",", ":")), nonce)
    hdr = {"X-Push-Token": CTWING_TOKEN, "X-Iotjx-Received-At": repr(t0)}
    tester = {**hdr, "Authorization": basic("tester-h", tester_pw)}
    # Replays off (the default): the header is refused even from the tester.
    assert client.post("/push/ctwing", content=frames[0], headers=tester).status_code == 403
    on = cfg.model_copy(update={"replay_enabled": True, "mqtt_client_id": f"{cfg.mqtt_client_id}-r"})
    gateway = Gateway(on)
    gateway.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=60) as c:
            answers = {
                "tester": c.post("/push/ctwing", content=frames[0], headers=tester),
                "gateway_login": c.post("/push/ctwing", content=frames[1],
                                        headers={**hdr, "Authorization": basic("gateway-h", gateway_pw)}),
                "wrong_password": c.post("/push/ctwing", content=frames[1],
                                         headers={**hdr, "Authorization": basic("tester-h", tester_pw + "x")}),
                "no_login": c.post("/push/ctwing", content=frames[1], headers=hdr),
                "ahead": c.post("/push/ctwing", content=frames[2],
                                headers={**tester, "X-Iotjx-Received-At": str(time.time() + 3600)}),
                "not_a_time": c.post("/push/ctwing", content=frames[1],
                                     headers={**tester, "X-Iotjx-Received-At": "yesterday"}),
                "plain": c.post("/push/ctwing", content=frames[3], headers={"X-Push-Token": CTWING_TOKEN}),
                # OneNET's freshness is judged against the original time: 5 days old, yet fresh…
                "onenet_replayed": c.post("/push/onenet", content=onenet(inner[4], "n-old-1"),
                                          headers={"X-Iotjx-Received-At": repr(t0),
                                                   "Authorization": basic("tester-h", tester_pw)}),
                # …and stale without it.
                "onenet_stale": c.post("/push/onenet", content=onenet(inner[5], "n-old-2")),
            }
    finally:
        gateway.stop()
    status = {k: r.status_code for k, r in answers.items()}
    assert status == {"tester": 202, "gateway_login": 401, "wrong_password": 401, "no_login": 401, "ahead": 422,
                      "not_a_time": 422, "plain": 202, "onenet_replayed": 200, "onenet_stale": 401}
    assert answers["ahead"].json()["reason"] == "bad_original_time"
    assert "ahead of the gateway's clock" in answers["ahead"].json()["detail"]
    with psycopg.connect(db) as conn:
        raw = Counter((bytes(p), o) for p, o in conn.execute("SELECT payload, outcome FROM raw_uplinks"))
        at = dict((bytes(p), t) for p, t in conn.execute(
            "SELECT payload, extract(epoch FROM received_at)::float8 FROM raw_uplinks WHERE outcome = 'stored'"))
        rejects = conn.execute("SELECT device_id, reason, transport FROM rejected_uplinks").fetchall()
    # Stored: the frames the envelopes carry; rejected: the bodies; nothing of the refused logins.
    assert raw == Counter({(inner[0], "stored"): 1, (frames[1], "rejected:bad_original_time"): 1,
                           (frames[2], "rejected:bad_original_time"): 1, (inner[3], "stored"): 1,
                           (inner[4], "stored"): 1})
    assert abs(at[inner[0]] - t0) < 1e-6 and abs(at[inner[4]] - t0) < 1e-6 and at[inner[3]] > t0 + 4 * 86400      # timestamptz: microseconds
    assert rejects == [("?push/ctwing", "bad_original_time", "http")] * 2
