"""GET /alarms, /alarms/{id}, ack and clear, and GET /water/alerts against the real database: GB/T
26875.3 frames stored through the gateway's pipeline, the alarms the API lists compared with a plain-SQL
count of the episodes, each role and a city-scoped key."""

from __future__ import annotations

import csv
import io

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

import decoders
from api.app import create_app
from decoders.gb26875_layout import COMPONENT_STATE
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from tests.api.conftest import key_id
from tests.analytics.test_fire import _hand_count
from tests.helpers import bearer, walk_pages

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=6)
NANCHANG_PANEL, JIUJIANG_PANEL = "860000000000011", "860000000000012"
NANCHANG, JIUJIANG = 360100, 360400


def _component(at: datetime, address: int, *, fire: bool = False, fault: bool = False, serial: int = 0) -> bytes:
    obj = {"system_type": 1, "system_address": 1, "component_type": 0x28, "component_address": address,
           "description": f"{address}号烟感", "time": at,
           "flags": {"normal_running": True, "fire_alarm": fire, "fault": fault, "started": fire}}
    return decoders.encode("gb26875", {"serial": serial, "version": "1.1", "sent_at": at, "source_address": 99,
                                       "command": 2, "app_type": COMPONENT_STATE, "objects": [obj],
                                       "with_description": True})


@pytest.fixture
def fire_db(db_url):
    """Nanchang: an alarm on detector 17 restored 15 min later, a fault on 18 still active.  Jiujiang:
    an alarm on detector 5 still active.  Each frame received 2 s after its label."""
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [
            DeviceRecord(device_id=NANCHANG_PANEL, model="gb26875-uitd", network="cat1", city="Nanchang",
                         site_kind="residential", site_name="青山湖小区", installed_at=T0 - timedelta(days=1)),
            DeviceRecord(device_id=JIUJIANG_PANEL, model="gb26875-uitd", network="cat1", city="Jiujiang",
                         site_kind="residential", site_name="浔阳小区", installed_at=T0 - timedelta(days=1))])
    story = [(NANCHANG_PANEL, T0 + timedelta(minutes=10), 17, True, False),
             (NANCHANG_PANEL, T0 + timedelta(minutes=25), 17, False, False),
             (NANCHANG_PANEL, T0 + timedelta(hours=1), 18, False, True),
             (JIUJIANG_PANEL, T0 + timedelta(hours=2), 5, True, False)]
    uplinks = [Uplink(device_id=d, payload=_component(t, a, fire=f, fault=x, serial=k), transport="mqtt",
                      received_at=(t + timedelta(seconds=2)).timestamp()) for k, (d, t, a, f, x) in enumerate(story)]
    Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))).process(uplinks)
    return db_url


def _episodes(db_url: str) -> list[tuple]:
    """The episodes by plain SQL (tests/analytics/test_fire.py's gaps-and-islands count), newest raised first."""
    with psycopg.connect(db_url) as conn:
        return sorted(_hand_count(conn), key=lambda e: e[3], reverse=True)


def _t(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _walk(client: TestClient, key: str, path: str, params: dict | None = None) -> list[dict]:
    return walk_pages(client, path, key, params, max_pages=100)


def _key(a: dict) -> tuple:
    return a["device_id"], a["component_address"], a["kind"], _t(a["raised_at"]), _t(a["restored_at"])


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_the_list_is_brought_up_to_date_and_equals_a_plain_sql_count(fire_db, client, keys):
    expected = _episodes(fire_db)
    assert len(expected) == 3
    got = _walk(client, keys.viewer, "/alarms", {"limit": 1})          # one per page: the cursor walks them
    assert [_key(a) for a in got] == expected
    states = {(a["component_address"], a["kind"]): a["state"] for a in got}
    assert states == {(17, "alarm"): "cleared_unacked", (18, "fault"): "active_unacked", (5, "alarm"): "active_unacked"}
    assert {a["city"] for a in got} == {NANCHANG, JIUJIANG}
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"kind": "fault"})] \
        == [e for e in expected if e[2] == "fault"]
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"city": NANCHANG})] \
        == [e for e in expected if e[0] == NANCHANG_PANEL]
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"device": JIUJIANG_PANEL})] \
        == [e for e in expected if e[0] == JIUJIANG_PANEL]
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"state": "open"})] == expected
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"state": "active_unacked"})] \
        == [e for e in expected if e[4] is None]
    since, until = T0 + timedelta(minutes=30), T0 + timedelta(hours=2)
    assert [_key(a) for a in _walk(client, keys.viewer, "/alarms", {"since": since.isoformat(),
                                                                     "until": until.isoformat()})] \
        == [e for e in expected if since <= e[3] < until]


def test_a_city_scoped_key_sees_its_cities_only(fire_db, client, keys):
    expected = _episodes(fire_db)
    got = _walk(client, keys.nanchang_viewer, "/alarms")
    assert [_key(a) for a in got] == [e for e in expected if e[0] == NANCHANG_PANEL]
    assert client.get("/alarms", params={"city": JIUJIANG}, headers=bearer(keys.nanchang_viewer)).status_code == 403
    jiujiang = _walk(client, keys.viewer, "/alarms", {"device": JIUJIANG_PANEL})[0]["alarm_id"]
    for method, path, body in (("GET", f"/alarms/{jiujiang}", None), ("POST", f"/alarms/{jiujiang}/ack", None),
                               ("POST", f"/alarms/{jiujiang}/clear", {"false_alarm": True})):
        answer = client.request(method, path, json=body, headers=bearer(keys.nanchang_operator))
        assert answer.status_code == 404 and answer.headers["content-type"] == "application/problem+json"
    with psycopg.connect(fire_db) as conn:
        assert conn.execute("SELECT acked_at, verdict_by FROM fire_alarms WHERE alarm_id = %s",
                            (jiujiang,)).fetchone() == (None, None)


def _csv_rows(client: TestClient, key: str, path: str, params: dict | None = None) -> list[dict]:
    answer = client.get(path, params=params, headers=bearer(key))
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(answer.text)))


def test_the_csv_export_is_the_list_in_full_and_scoped(fire_db, client, keys):
    expected = _episodes(fire_db)
    rows = _csv_rows(client, keys.viewer, "/alarms.csv")
    assert [(r["device_id"], int(r["component_address"]), r["kind"], _t(r["raised_at"]), _t(r["restored_at"] or None))
            for r in rows] == expected
    assert [(r["device_id"], r["kind"]) for r in _csv_rows(client, keys.nanchang_viewer, "/alarms.csv")] == \
        [(e[0], e[2]) for e in expected if e[0] == NANCHANG_PANEL]
    assert [r["kind"] for r in _csv_rows(client, keys.viewer, "/alarms.csv", {"kind": "fault"})] == \
        [e[2] for e in expected if e[2] == "fault"]
    refused = client.get("/alarms.csv", params={"city": JIUJIANG}, headers=bearer(keys.nanchang_viewer))
    assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"


def test_acknowledge_and_clear_record_who_and_when_and_refuse_invalid_transitions(fire_db, client, keys):
    alarms = {(a["component_address"], a["kind"]): a for a in _walk(client, keys.viewer, "/alarms")}
    fault, restored = alarms[(18, "fault")]["alarm_id"], alarms[(17, "alarm")]["alarm_id"]
    operator = bearer(keys.operator)
    assert client.post(f"/alarms/{fault}/ack", headers=bearer(keys.viewer)).status_code == 403
    before = datetime.now(UTC)
    acked = client.post(f"/alarms/{fault}/ack", headers=operator)
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "active_acked" and acked.json()["acked_by"] == f"key:{key_id(keys.operator)}"
    assert _t(acked.json()["acked_at"]) >= before - timedelta(seconds=5)
    again = client.post(f"/alarms/{fault}/ack", headers=operator)
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
    assert "acknowledged" in again.json()["detail"]

    cleared = client.post(f"/alarms/{fault}/clear", json={"false_alarm": False, "note": "探头更换"}, headers=operator)
    assert cleared.status_code == 200, cleared.text
    assert (cleared.json()["state"], cleared.json()["cleared_by"], cleared.json()["false_alarm"], cleared.json()["note"]) \
        == ("cleared", f"key:{key_id(keys.operator)}", False, "探头更换")
    assert client.post(f"/alarms/{fault}/clear", json={"false_alarm": True}, headers=operator).status_code == 409

    # Restored by the device, not acknowledged: the verdict acknowledges it and keeps the device's clear.
    verdict = client.post(f"/alarms/{restored}/clear", json={"false_alarm": True}, headers=operator).json()
    assert (verdict["state"], verdict["cleared_by"], verdict["false_alarm"]) == ("cleared", "device", True)
    assert _t(verdict["cleared_at"]) == _t(alarms[(17, "alarm")]["restored_at"])

    for bad in ({}, {"false_alarm": "perhaps"}, {"false_alarm": True, "note": "x\x00"}):
        answer = client.post(f"/alarms/{restored}/clear", json=bad, headers=operator)
        assert answer.status_code == 422, (bad, answer.text)
    assert client.post("/alarms/999999/ack", headers=operator).status_code == 404

    with psycopg.connect(fire_db) as conn:
        rows = conn.execute("""SELECT actor, route, target, change->>'action', change->>'to', status FROM audit_log
                               WHERE route LIKE '/alarms/%%' ORDER BY audit_id""").fetchall()
        stored = conn.execute("SELECT acked_by, verdict_by, false_alarm FROM fire_alarms WHERE alarm_id = %s",
                              (fault,)).fetchone()
    actor = f"key:{key_id(keys.operator)}"
    assert rows == [(actor, "/alarms/{alarm_id}/ack", f"alarm:{fault}", "ack", "active_acked", 200),
                    (actor, "/alarms/{alarm_id}/clear", f"alarm:{fault}", "clear", "cleared", 200),
                    (actor, "/alarms/{alarm_id}/clear", f"alarm:{restored}", "clear", "cleared", 200)]
    assert stored == (actor, actor, False)


def test_bad_filters_are_problems(fire_db, client, keys):
    for bad in ({"kind": "smoke"}, {"state": "burning"}, {"city": 999999}, {"site": "x y"}, {"limit": 1001},
                {"since": NOW.isoformat(), "until": T0.isoformat()}, {"cursor": "W10"}, {"cursor": "WzEsMl0"},
                {"alarm_state": "open"}):
        answer = client.get("/alarms", params=bad, headers=bearer(keys.viewer))
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    assert client.get("/alarms/0", headers=bearer(keys.viewer)).status_code == 422
    assert client.get("/alarms", headers={}).status_code == 401


def test_water_alerts_newest_first_filtered_and_scoped(db_url, client, keys):
    meters = [("869975032000001", "Nanchang"), ("869975032000002", "Yingtan")]
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model="cjt188-nb-water-std", network="nbiot", city=c,
                                             site_kind="residential", site_name=f"{c} 小区") for d, c in meters])
        for k in range(6):
            device = meters[k % 2][0]
            conn.execute("INSERT INTO water_alerts (device_id, kind, opened_at, closed_at, detail) VALUES (%s, %s, %s, %s, 'x')",
                         (device, ("continuous_flow", "battery_low", "reverse_flow")[k % 3], T0 + timedelta(hours=k),
                          None if k % 2 else T0 + timedelta(hours=k, minutes=30)))

    def sql(where: str = "true", params: tuple = ()) -> list[tuple]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(f"SELECT alert_id, device_id, kind FROM water_alerts WHERE {where} "
                                "ORDER BY opened_at DESC, alert_id DESC", params).fetchall()

    def got(key: str, params: dict | None = None) -> list[tuple]:
        return [(a["alert_id"], a["device_id"], a["kind"]) for a in _walk(client, key, "/water/alerts", params)]

    assert got(keys.viewer, {"limit": 2}) == sql()
    assert got(keys.viewer, {"open": "true"}) == sql("closed_at IS NULL")
    assert got(keys.viewer, {"kind": "battery_low"}) == sql("kind = 'battery_low'")
    assert got(keys.viewer, {"city": 360600}) == sql("device_id = %s", (meters[1][0],))
    assert got(keys.nanchang_viewer) == sql("device_id = %s", (meters[0][0],))
    assert client.get("/water/alerts", params={"city": 360600}, headers=bearer(keys.nanchang_viewer)).status_code == 403
    csv_got = [(int(r["alert_id"]), r["device_id"], r["kind"]) for r in _csv_rows(client, keys.viewer, "/water/alerts.csv")]
    assert csv_got == sql()
    assert [(int(r["alert_id"]), r["device_id"], r["kind"]) for r in
            _csv_rows(client, keys.nanchang_viewer, "/water/alerts.csv", {"open": "false"})] == \
        sql("device_id = %s AND closed_at IS NOT NULL", (meters[0][0],))


def test_kpis_equal_a_plain_sql_recount_within_the_keys_cities(fire_db, client, keys):
    alarms = {(a["component_address"], a["kind"]): a["alarm_id"] for a in _walk(client, keys.viewer, "/alarms")}
    operator = bearer(keys.operator)
    assert client.post(f"/alarms/{alarms[(5, 'alarm')]}/ack", headers=operator).status_code == 200
    assert client.post(f"/alarms/{alarms[(17, 'alarm')]}/clear", json={"false_alarm": True},
                       headers=operator).status_code == 200
    window = {"since": T0.isoformat(), "until": NOW.isoformat()}
    with psycopg.connect(fire_db) as conn:
        expected = conn.execute("""
            SELECT s.city_code, count(*), count(a.acked_at),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.acked_at - a.received_at)),
                   count(*) FILTER (WHERE a.acked_at - a.received_at <= interval '10 seconds')
            FROM fire_alarms a JOIN devices d USING (device_id) JOIN sites s ON s.site_id = d.site_id
            WHERE a.kind = 'alarm' AND a.raised_at >= %s AND a.raised_at < %s
            GROUP BY 1 ORDER BY 1""", (T0, NOW)).fetchall()
        false = conn.execute("""SELECT s.city_code, s.name, count(*), count(a.false_alarm),
                                       count(*) FILTER (WHERE a.false_alarm)
                                FROM fire_alarms a JOIN devices d USING (device_id) JOIN sites s ON s.site_id = d.site_id
                                WHERE a.kind = 'alarm' GROUP BY 1, 2 ORDER BY 1""").fetchall()
    answer = client.get("/alarms/kpis", params=window, headers=bearer(keys.viewer))
    assert answer.status_code == 200, answer.text
    got = [(c["city"], c["alarms"], c["acked"], c["ack_p50_s"], c["within_budget"]) for c in answer.json()["cities"]]
    assert got == [(c, n, a, pytest.approx(p) if p is not None else None, w) for c, n, a, p, w in expected]
    assert [(x["city"], x["site_name"], x["alarms"], x["with_verdict"], x["false_alarms"])
            for x in answer.json()["sites"]] == false
    scoped = client.get("/alarms/kpis", params=window, headers=bearer(keys.nanchang_viewer)).json()
    assert [c["city"] for c in scoped["cities"]] == [NANCHANG] and {x["city"] for x in scoped["sites"]} == {NANCHANG}
    assert client.get("/alarms/kpis", params={**window, "city": JIUJIANG},
                      headers=bearer(keys.nanchang_viewer)).status_code == 403
    assert client.get("/alarms/kpis", params={"since": NOW.isoformat(), "until": T0.isoformat()},
                      headers=bearer(keys.viewer)).status_code == 422
    assert client.get("/alarms/kpis", headers=bearer(keys.viewer)).status_code == 422
