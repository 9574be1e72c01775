"""The API against the real database: health, registration (single and CSV), device lookup (with an admin key)."""

from __future__ import annotations

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from ingest.gateway import Gateway
from tests.helpers import bearer


def test_health_reports_storage_and_gateway(settings, keys, no_thread_leaks):
    gateway = Gateway(settings, heartbeat_s=0.2)
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        with TestClient(create_app(settings), headers=bearer(keys.admin)) as client:
            import time
            deadline = time.monotonic() + 10
            body = client.get("/health").json()
            while not body.get("gateways") and time.monotonic() < deadline:
                time.sleep(0.2)
                body = client.get("/health").json()
        assert body["database"]["reachable"] and body["database"]["storage"] == "postgresql"
        assert body["database"]["schema_version"] >= 3
        assert body["broker_connected"] is True and body["status"] == "ok"
        assert body["gateways"][0]["gateway_id"] == settings.mqtt_client_id
        assert body["queue_depth"] == 0
    finally:
        gateway.stop()


def test_health_without_gateways_is_degraded(settings, keys):
    with TestClient(create_app(settings), headers=bearer(keys.viewer)) as client:
        body = client.get("/health").json()
    assert body["status"] == "degraded" and body["database"]["reachable"]


def test_register_one_then_read_it_back(settings, admin_client):
    device = {"device_id": "869975030000018", "model": "cjt188-nb-water-std", "network": "nbiot", "city": "鹰潭",
              "site_kind": "residential", "site_name": "龙岗小区"}
    client = admin_client
    r = client.post("/devices", json=device)
    assert r.status_code == 201 and r.json() == {"created": 1, "updated": 0, "sites": 1, "catalogue_sites": 0,
                                                 "unverified_sites": 1}
    wrong = client.post("/devices", json={**device, "network": "cat1"})       # an NB-IoT model
    assert wrong.status_code == 422 and "is a nbiot model: it cannot be registered as cat1" in wrong.text
    assert client.post("/devices", json={**device, "network": "", "status": "inactive"}).json()["updated"] == 1
    got = client.get(f"/devices/{device['device_id']}").json()
    assert got["city"] == 360600 and got["network"] == "nbiot" and got["codec"] == "cjt188"
    assert got["status"] == "inactive"
    assert got["pilot"] == "water" and got["last_seen"] is None and got["uplinks"] == 0
    assert client.get("/devices/000").status_code == 404
    bad = client.post("/devices", json={**device, "model": "no-such-model"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["field"] == "body.model"
    assert client.post("/devices", json={**device, "city": "Atlantis"}).status_code == 422


def test_bulk_csv_is_all_or_nothing_with_line_numbers(settings, admin_client):
    good = ("device_id,model,network,city,site_kind,site_name,reporting_interval_s\n"
            "869975030000026,cjt188-nb-water-std,nbiot,Nanchang,residential,红谷滩 1,3600\n"
            "869975030000034,gb26875-nb-smoke,nbiot,360700,building,章贡区 消防站,\n"
            "869975030000042,nb-parking-sensor,nbiot,上饶,scenic_spot,三清山,600\n")
    bad = good + "86997503000005X!,cjt188-nb-water-std,nbiot,Atlantis,residential,x,\n"
    client = admin_client
    r = client.post("/devices/bulk", content=bad.encode(), headers={"content-type": "text/csv"})
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert {e["line"] for e in errors} == {5}
    assert any("device_id" in e["error"] for e in errors) and any("Atlantis" in e["error"] for e in errors)
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0
    r = client.post("/devices/bulk", content=good.encode(), headers={"content-type": "text/csv"})
    assert r.status_code == 200 and r.json() == {"created": 3, "updated": 0, "sites": 3, "catalogue_sites": 0,
                                                 "unverified_sites": 3, "skipped": 0, "errors": [], "errors_total": 0}
    r = client.post("/devices/bulk", content=b"device_id,network\n1,nbiot\n", headers={"content-type": "text/csv"})
    assert r.status_code == 422 and "header lacks column(s) model" in r.json()["errors"][0]["error"]
    assert "site_id" in r.json()["errors"][0]["error"]          # the optional columns are listed
    with psycopg.connect(settings.database_url) as conn:
        rows = dict(conn.execute("SELECT device_id, pilot FROM devices").fetchall())
    assert rows == {"869975030000026": "water", "869975030000034": "fire", "869975030000042": "traffic"}


def test_openapi_is_served_to_a_key_holder_only(settings, keys):
    with TestClient(create_app(settings)) as client:
        assert client.get("/openapi.json").status_code == 401 and client.get("/docs").status_code == 401
        spec = client.get("/openapi.json", headers=bearer(keys.viewer)).json()
        assert {"/health", "/devices", "/devices/bulk", "/coverage", "/keys"} <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert client.get("/docs", headers=bearer(keys.viewer)).status_code == 200
