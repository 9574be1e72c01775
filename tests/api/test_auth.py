"""The attacks of issue 11 on the API, made again: each refused, and nothing changed in the database.
Keys: a revoked key refused on its very next request, scoped keys that see only their cities,
grants no wider than the grantor's, secrets stored only as SHA-256 and never listed or logged; the
CLI's key commands, audited."""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import socket
import subprocess
import sys

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from tests.api.conftest import NANCHANG, YINGTAN, key_id
from tests.helpers import bearer, register_fleet

DEVICE = {"model": "cjt188-nb-water-std", "network": "nbiot", "site_kind": "residential", "site_name": "龙岗小区"}


def _snapshot(db_url: str) -> tuple:
    with psycopg.connect(db_url) as conn:
        return conn.execute("""SELECT (SELECT coalesce(json_agg(d ORDER BY device_id), '[]') FROM devices d),
                                      (SELECT count(*) FROM device_credentials), (SELECT count(*) FROM downlinks),
                                      (SELECT count(*) FROM mqtt_accounts), (SELECT count(*) FROM api_keys),
                                      (SELECT count(*) FROM audit_log)""").fetchone()


def test_anonymous_callers_get_nothing_but_a_minimal_health(settings, anonymous, keys):
    fleet = register_fleet(settings.database_url, 2, seed=7)
    victim, other = fleet[0].record.device_id, fleet[1].record.device_id
    with psycopg.connect(settings.database_url) as conn:     # a command already queued for the victim
        conn.execute("""INSERT INTO downlinks (device_id, kind, params, payload, expires_at)
                        VALUES (%s, 'raw', '{}', '\\xa5', now() + interval '1 day')""", (victim,))
    before = _snapshot(settings.database_url)
    attacks = [
        ("POST", "/devices", {"json": {"device_id": "869975039999999", "city": "Yingtan", **DEVICE}}),
        ("POST", "/devices", {"json": {"device_id": victim, "city": "Yingtan", **DEVICE,
                                       "model": "gb26875-nb-smoke"}}),                    # moved to another model
        ("POST", "/devices", {"json": {"device_id": other, "city": "Yingtan", **DEVICE, "status": "retired"}}),
        ("POST", "/devices/bulk", {"content": b"device_id,model,network,city,site_kind,site_name\n"
                                              b"869975039999998,cjt188-nb-water-std,nbiot,360600,residential,x\n"}),
        ("PUT", f"/devices/{victim}/coap-token", {"json": {"token": "attacker-chosen-token-0001"}}),
        ("PUT", f"/devices/{victim}/mqtt-password", {"json": {}}),
        ("POST", f"/devices/{victim}/downlinks", {"json": {"kind": "valve_close"}}),
        ("POST", f"/devices/{victim}/downlinks", {"json": {"kind": "raw", "payload_hex": "deadbeef"}}),
        ("GET", f"/devices/{victim}/downlinks", {}),
        ("GET", "/downlinks/1", {}),
        ("GET", f"/devices/{victim}", {}),
        ("GET", "/coverage", {}),
        ("GET", "/metrics", {}),
        ("PUT", "/targets/5g-base-stations/progress", {"json": {"value": 1}}),
        ("POST", "/keys", {"json": {"role": "admin"}}),
        ("GET", "/keys", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/docs", {}),
        ("GET", "/redoc", {}),
        ("GET", "/no/such/path", {}),
        ("DELETE", "/devices", {}),
    ]
    for method, path, kwargs in attacks:
        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic YWRtaW46YWRtaW4="},
                        bearer(keys.revoked)):
            r = anonymous.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "paths" not in r.text and "/devices" not in r.json()["detail"]       # no route map
    assert _snapshot(settings.database_url) == before
    health = anonymous.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "degraded"}      # no gateway is running
    detail = anonymous.get("/health", headers=bearer(keys.viewer)).json()
    assert detail["database"]["reachable"] is True and "gateways" in detail and "version" in detail
    scoped = anonymous.get("/health", headers=bearer(keys.nanchang_viewer)).json()
    assert scoped == {"status": "degraded"}            # gateway state is the whole system's, not a city's
    assert anonymous.get("/health", headers=bearer(keys.revoked)).status_code == 401


def test_a_revoked_key_is_refused_on_its_next_request(settings, keys):
    with TestClient(create_app(settings)) as client:
        made = client.post("/keys", json={"role": "operator", "name": "night shift"}, headers=bearer(keys.admin))
        assert made.status_code == 201
        new = made.json()
        assert new["key"].startswith(f"iotjx.{new['key_id']}.") and new["role"] == "operator"
        assert client.get("/coverage", headers=bearer(new["key"])).status_code == 200
        assert client.delete(f"/keys/{new['key_id']}", headers=bearer(keys.admin)).status_code == 204
        assert client.get("/coverage", headers=bearer(new["key"])).status_code == 401
        assert client.delete(f"/keys/{new['key_id']}", headers=bearer(keys.admin)).status_code == 404
        listed = client.get("/keys", headers=bearer(keys.admin))
        assert new["key"].split(".")[2] not in listed.text                     # the secret is never listed
        row = next(k for k in listed.json()["items"] if k["key_id"] == new["key_id"])
        assert row["revoked_at"] is not None and row["last_used_at"] is not None and "key" not in row
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute("SELECT secret_hash FROM api_keys WHERE key_id = %s", (new["key_id"],)).fetchone()[0]
        assert bytes(stored) == hashlib.sha256(new["key"].split(".")[2].encode()).digest()
        log = conn.execute("SELECT method, route, target, change::text FROM audit_log ORDER BY audit_id").fetchall()
    assert [(m, r, t) for m, r, t, _ in log] == [("POST", "/keys", new["key_id"]),
                                                  ("DELETE", "/keys/{key_id}", new["key_id"])]
    assert all(new["key"].split(".")[2] not in change for *_, change in log)


def test_last_used_is_written_at_most_once_a_minute(settings, keys):
    with TestClient(create_app(settings), headers=bearer(keys.viewer)) as client:
        assert client.get("/targets").status_code == 200
        with psycopg.connect(settings.database_url) as conn:
            first = conn.execute("SELECT last_used_at, xmin::text FROM api_keys WHERE key_id = %s",
                                 (key_id(keys.viewer),)).fetchone()
        for _ in range(5):
            assert client.get("/targets").status_code == 200
        with psycopg.connect(settings.database_url) as conn:
            again = conn.execute("SELECT last_used_at, xmin::text FROM api_keys WHERE key_id = %s",
                                 (key_id(keys.viewer),)).fetchone()
    assert first[0] is not None and again == first          # not one more row version for five requests


def test_a_scoped_key_sees_and_touches_only_its_cities(settings, keys):
    admin, scoped = bearer(keys.admin), bearer(keys.nanchang_admin)
    with TestClient(create_app(settings)) as client:
        assert client.post("/devices", json={"device_id": "869975030000100", "city": "Yingtan", **DEVICE},
                           headers=admin).status_code == 201
        mine = client.post("/devices", json={"device_id": "869975030000200", "city": "南昌", **DEVICE}, headers=scoped)
        assert mine.status_code == 201
        assert client.get("/devices/869975030000200", headers=scoped).json()["city"] == NANCHANG
        assert client.get("/devices/869975030000100", headers=scoped).status_code == 404
        assert client.get("/devices/869975030000999", headers=scoped).status_code == 404   # same answer as absent
        # Taking over a Yingtan device by registering its id in Nanchang is refused, and it stays in Yingtan.
        grab = client.post("/devices", json={"device_id": "869975030000100", "city": "Nanchang", **DEVICE},
                           headers=scoped)
        assert grab.status_code == 403
        assert client.get("/devices/869975030000100", headers=admin).json()["city"] == YINGTAN
        csv = ("device_id,model,network,city,site_kind,site_name\n"
               "869975030000201,cjt188-nb-water-std,nbiot,Nanchang,residential,a\n"
               "869975030000202,cjt188-nb-water-std,nbiot,Yingtan,residential,b\n")
        bulk = client.post("/devices/bulk", content=csv.encode(), headers=scoped)
        assert bulk.status_code == 403 and [e["line"] for e in bulk.json()["errors"]] == [3]
        cov = client.get("/coverage", headers=scoped).json()
        assert {r["city"] for r in cov["breakdown"]} == {NANCHANG}
        assert cov["targets"] and {t["city"] for t in cov["targets"]} == {NANCHANG}
        assert {t["city"] for t in client.get("/targets", headers=scoped).json()} == {NANCHANG}
        assert client.get("/coverage", params={"city": YINGTAN}, headers=scoped).status_code == 403
        # Keys: no wider than the grantor's scope or role; only keys within its cities are listed.
        assert client.post("/keys", json={"role": "viewer"}, headers=scoped).status_code == 403
        assert client.post("/keys", json={"role": "viewer", "cities": ["Nanchang", "Yingtan"]},
                           headers=scoped).status_code == 403
        narrow = client.post("/keys", json={"role": "viewer", "cities": ["360100"]}, headers=scoped)
        assert narrow.status_code == 201 and narrow.json()["cities"] == [NANCHANG]
        assert client.post("/keys", json={"role": "admin", "cities": [YINGTAN]},
                           headers=bearer(keys.nanchang_operator)).status_code == 403
        listed = {k["key_id"] for k in client.get("/keys", headers=scoped).json()["items"]}
        assert key_id(keys.admin) not in listed and narrow.json()["key_id"] in listed
        assert client.delete(f"/keys/{key_id(keys.viewer)}", headers=scoped).status_code == 404
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 2


def test_cli_keys_create_list_revoke_are_audited(settings, tmp_path):
    env = {**os.environ, "IOTJX_DATABASE_URL": settings.database_url}

    def iotjx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "iotjx.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    made = iotjx("keys", "create", "--role", "operator", "--city", "Yingtan", "--city", "360100", "--name", "ops")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("iotjx.") and len(key.split(".")) == 3 and " " not in key
    assert iotjx("keys", "create", "--role", "root").returncode != 0
    assert iotjx("keys", "create", "--role", "viewer", "--city", "Atlantis").returncode != 0
    with TestClient(create_app(settings)) as client:
        assert client.get("/targets", headers=bearer(key)).status_code == 200
        listed = iotjx("keys", "list")
        assert key_id(key) in listed.stdout and key.split(".")[2] not in listed.stdout
        assert iotjx("keys", "revoke", key_id(key)).returncode == 0
        assert client.get("/targets", headers=bearer(key)).status_code == 401
    assert iotjx("keys", "revoke", key_id(key)).returncode == 1
    with psycopg.connect(settings.database_url) as conn:
        cities = conn.execute("SELECT cities FROM api_keys WHERE key_id = %s", (key_id(key),)).fetchone()[0]
        log = conn.execute("SELECT actor, method, target, change::text FROM audit_log ORDER BY audit_id").fetchall()
    assert sorted(cities) == [NANCHANG, YINGTAN]
    assert [(a, m, t) for a, m, t, _ in log] == [(f"cli:{getpass.getuser()}", "keys create", key_id(key)),
                                                 (f"cli:{getpass.getuser()}", "keys revoke", key_id(key))]
    assert all(key.split(".")[2] not in change for *_, change in log)


def test_no_key_or_secret_in_the_log(settings, keys, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        made = client.post("/keys", json={"role": "viewer"}, headers=bearer(keys.admin)).json()
        client.get("/targets", headers=bearer(made["key"]))
        client.get("/targets", headers=bearer(made["key"] + "x"))
        client.get("/targets", headers=bearer(keys.revoked))
    text = caplog.text
    for secret in (made["key"], keys.admin, keys.revoked):
        assert secret.split(".")[2] not in text


def test_health_without_a_key_says_nothing_of_a_database_that_is_down(settings):
    with socket.socket() as s:                     # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = settings.model_copy(update={"database_url": f"postgresql://postgres@127.0.0.1:{port}/none"})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        r = client.get("/health")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == "down: the database cannot be reached" and int(r.headers["retry-after"]) > 0
