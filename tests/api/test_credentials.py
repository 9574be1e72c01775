"""Listing credentials (GET /credentials, GET /devices/{id}/credentials): which a device has, since when,
set by whom — recomputed here from the credential tables and the audit log in plain SQL — and never a
secret; operator and above; a city-scoped key sees its cities' devices only."""

from __future__ import annotations

from datetime import datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ingest.coap import set_device_token
from tests.api.conftest import NANCHANG, YINGTAN, key_id
from tests.helpers import bearer, insert_key, walk_pages

DEVICE = {"model": "cjt188-nb-water-std", "network": "nbiot", "site_kind": "residential"}
Y1, Y2, N1 = "869975035000011", "869975035000029", "869975035000037"


@pytest.fixture
def world(settings, keys):
    """Y1 (Yingtan): a CoAP token and an MQTT password set by the admin; Y2 (Yingtan): an MQTT password set
    by the admin; N1 (Nanchang): a token set outside the API (no audit row), and no MQTT account."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = bearer(keys.admin)
        for device, city, site in ((Y1, "Yingtan", "龙岗小区"), (Y2, "Yingtan", "月湖小区"), (N1, "Nanchang", "红谷滩小区")):
            made = client.post("/devices", json={"device_id": device, "city": city, "site_name": site, **DEVICE},
                               headers=admin)
            assert made.status_code == 201, made.text
        secrets = [client.put(f"/devices/{Y1}/coap-token", json={}, headers=admin).json()["token"],
                   client.put(f"/devices/{Y1}/mqtt-password", json={}, headers=admin).json()["password"],
                   client.put(f"/devices/{Y2}/mqtt-password", json={}, headers=admin).json()["password"]]
        with psycopg.connect(settings.database_url) as conn:
            secrets.append(set_device_token(conn, N1))
        yield client, secrets


def _sql(db_url: str, where: str = "true", params: tuple = ()) -> list[tuple]:
    """Every credential, by device and kind, with the actor of the audit row written in its transaction."""
    with psycopg.connect(db_url) as conn:
        return conn.execute(f"""
            SELECT c.device_id, c.kind, s.city_code, c.created_at, c.updated_at,
                   (SELECT l.actor FROM audit_log l WHERE l.target = c.device_id AND l.at = c.updated_at
                      AND l.route LIKE '%%' || c.kind ORDER BY l.audit_id DESC LIMIT 1)
            FROM (SELECT device_id, 'coap-token' AS kind, created_at, updated_at FROM device_credentials
                  UNION ALL SELECT device_id, 'mqtt-password', created_at, updated_at FROM mqtt_accounts
                  WHERE device_id IS NOT NULL) c
            JOIN devices d USING (device_id) JOIN sites s USING (site_id)
            WHERE {where} ORDER BY c.device_id, c.kind""", params).fetchall()


def _tuple(item: dict) -> tuple:
    return (item["device_id"], item["kind"], item["city"], datetime.fromisoformat(item["created_at"]),
            datetime.fromisoformat(item["updated_at"]), item["set_by"])


def _walk(client: TestClient, key: str, params: dict) -> list[dict]:
    return walk_pages(client, "/credentials", key, params, max_pages=50)


def test_the_list_is_the_tables_and_the_audit_log_and_never_a_secret(world, settings, keys):
    client, secrets = world
    db_url = settings.database_url
    every = _walk(client, keys.operator, {"limit": 1})
    assert [_tuple(i) for i in every] == _sql(db_url)
    assert [(i["device_id"], i["kind"]) for i in every] == [(Y1, "coap-token"), (Y1, "mqtt-password"),
                                                            (Y2, "mqtt-password"), (N1, "coap-token")]
    admin = f"key:{key_id(keys.admin)}"
    assert {(i["device_id"], i["kind"]): (i["set_by"], i["set_via"]) for i in every} == {
        (Y1, "coap-token"): (admin, "/devices/{device_id}/coap-token"),
        (Y1, "mqtt-password"): (admin, "/devices/{device_id}/mqtt-password"),
        (Y2, "mqtt-password"): (admin, "/devices/{device_id}/mqtt-password"),
        (N1, "coap-token"): (None, None)}                # set outside the API: no audit row says who
    assert {i["city_name_en"] for i in every} == {"Yingtan", "Nanchang"}
    text = client.get("/credentials", headers=bearer(keys.admin)).text \
        + client.get(f"/devices/{Y1}/credentials", headers=bearer(keys.admin)).text
    for secret in secrets:
        assert secret not in text
    # Filters, each against its SQL.
    assert [_tuple(i) for i in _walk(client, keys.operator, {"kind": "mqtt-password"})] \
        == _sql(db_url, "c.kind = 'mqtt-password'")
    assert [_tuple(i) for i in _walk(client, keys.operator, {"city": NANCHANG})] == _sql(db_url, "s.city_code = %s",
                                                                                         (NANCHANG,))
    assert [_tuple(i) for i in _walk(client, keys.operator, {"device": Y1, "limit": 1})] \
        == _sql(db_url, "c.device_id = %s", (Y1,))
    # One device's.
    one = client.get(f"/devices/{Y1}/credentials", headers=bearer(keys.operator)).json()
    assert one["device_id"] == Y1 and [_tuple(i) for i in one["credentials"]] == _sql(db_url, "c.device_id = %s", (Y1,))
    assert client.get(f"/devices/{N1}/credentials", headers=bearer(keys.operator)).json()["credentials"][0]["kind"] \
        == "coap-token"


def test_rotation_and_removal_show(world, settings, keys):
    client, _ = world
    before = client.get(f"/devices/{Y2}/credentials", headers=bearer(keys.operator)).json()["credentials"]
    assert client.put(f"/devices/{Y2}/mqtt-password", json={}, headers=bearer(keys.nanchang_admin)).status_code == 404
    second = insert_key(settings.database_url, "admin")
    assert client.put(f"/devices/{Y2}/mqtt-password", json={}, headers=bearer(second)).status_code == 200
    after = client.get(f"/devices/{Y2}/credentials", headers=bearer(keys.operator)).json()["credentials"]
    assert after[0]["created_at"] == before[0]["created_at"] and after[0]["updated_at"] > before[0]["updated_at"]
    assert after[0]["set_by"] == f"key:{key_id(second)}"
    assert client.delete(f"/devices/{Y1}/mqtt-password", headers=bearer(keys.admin)).status_code == 204
    kinds = [c["kind"] for c in client.get(f"/devices/{Y1}/credentials", headers=bearer(keys.operator)).json()["credentials"]]
    assert kinds == ["coap-token"]
    assert [_tuple(i) for i in _walk(client, keys.operator, {})] == _sql(settings.database_url)


def test_roles_and_city_scope(world, keys):
    client, _ = world
    assert client.get("/credentials", headers=bearer(keys.viewer)).status_code == 403
    assert client.get(f"/devices/{Y1}/credentials", headers=bearer(keys.viewer)).status_code == 403
    scoped = _walk(client, keys.nanchang_operator, {})
    assert [(i["device_id"], i["city"]) for i in scoped] == [(N1, NANCHANG)]
    assert client.get("/credentials", params={"city": YINGTAN}, headers=bearer(keys.nanchang_operator)).status_code == 403
    assert client.get(f"/devices/{Y1}/credentials", headers=bearer(keys.nanchang_operator)).status_code == 404
    assert client.get("/devices/869975039999999/credentials", headers=bearer(keys.operator)).status_code == 404
    for bad in ({"kind": "ssh-key"}, {"city": 999999}, {"device": "x' OR 1=1 --"}, {"cursor": "bm90LWEtY3Vyc29y"},
                {"limit": 1001}, {"secret": "1"}):
        r = client.get("/credentials", params=bad, headers=bearer(keys.operator))
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", (bad, r.text)
