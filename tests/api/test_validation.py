"""Input that the database cannot store, or could store but not give back, is a 4xx problem document
with a reason — in JSON bodies, query strings, path parameters and CSV — never a 500, and never
reaches the last-resort handler (which would log it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import bearer

DEVICE_ID = "869975030000018"
DEVICE = {"device_id": DEVICE_ID, "model": "cjt188-nb-water-std", "network": "nbiot", "city": "鹰潭",
          "site_kind": "residential", "site_name": "龙岗小区"}
HEADER = "device_id,model,network,city,site_kind,site_name,installed_at,reporting_interval_s\n"


def _raw(text: str) -> dict:
    """A request body sent byte for byte (json.dumps would refuse NaN or escape differently)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _csv(*lines: str, raw: bytes = b"") -> dict:
    return {"content": (HEADER + "".join(lines)).encode() + raw, "headers": {"content-type": "text/csv"}}


LINE = "869975030000026,cjt188-nb-water-std,nbiot,Nanchang,residential,{site},{installed},{interval}\n"

BAD = [
    # JSON bodies
    ("POST", "/devices", {"json": {**DEVICE, "site_name": "a\x00b"}}, 422),
    ("POST", "/devices", _raw(json.dumps(DEVICE, ensure_ascii=False).replace("龙岗小区", "\\ud800")), 422),
    ("POST", "/devices", {"json": {**DEVICE, "device_id": "8699\x00"}}, 422),
    ("POST", "/devices", {"json": {**DEVICE, "reporting_interval_s": 2**31}}, 422),
    ("POST", "/devices", {"json": {**DEVICE, "reporting_interval_s": 2**80}}, 422),
    ("POST", "/devices", {"json": {**DEVICE, "installed_at": "9999-12-31T23:59:59-01:00"}}, 422),   # year 10000 UTC
    ("POST", "/devices", {"json": {**DEVICE, "installed_at": "2999-01-01T00:00:00Z"}}, 422),
    ("POST", "/devices", {"json": {**DEVICE, "installed_at": "0001-01-01T00:00:00Z"}}, 422),
    ("POST", "/devices", {"json": {**DEVICE, "site_name": "x" * 10_000}}, 422),
    ("PUT", "/targets/5g-base-stations/progress", _raw('{"value": NaN}'), 422),
    ("PUT", "/targets/5g-base-stations/progress", _raw('{"value": Infinity}'), 422),
    ("PUT", "/targets/5g-base-stations/progress", _raw('{"value": -Infinity}'), 422),
    ("PUT", "/targets/5g-base-stations/progress", _raw('{"value": 1e400}'), 422),
    ("PUT", "/targets/5g-base-stations/progress", {"json": {"value": 10**400}}, 422),
    ("PUT", "/targets/5g-base-stations/progress", {"json": {"value": 1, "note": "n" * 5000}}, 422),
    ("PUT", "/targets/5g-base-stations/progress", {"json": {"value": 1, "note": "a\x00"}}, 422),
    ("PUT", "/targets/5g-base-stations/progress", _raw('{"value": 1, "note": "\\udfff"}'), 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "valve_close", "params": {"serial": "x\x00"}}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", _raw('{"kind": "valve_close", "params": {"\\ud800": 1}}'), 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", _raw('{"kind": "valve_close", "params": {"serial": NaN}}'), 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "valve_close", "params": {"serial": 2**70}}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "valve_close", "params": {"serial": "abc"}}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "valve_close", "params": {"serial": [1]}}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "raw", "params": {"a": "b" * 5000}}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", _raw('{"kind": "raw", "params": ' + "[" * 50 + "]" * 50 + "}"), 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "raw", "payload_hex": "ab" * 5000}}, 422),
    ("POST", f"/devices/{DEVICE_ID}/downlinks", {"json": {"kind": "raw", "payload_hex": "a5", "ttl_s": 2**63}}, 422),
    ("PUT", f"/devices/{DEVICE_ID}/coap-token", {"json": {"token": "\x00" * 20}}, 422),
    ("PUT", f"/devices/{DEVICE_ID}/mqtt-password", _raw('{"password": "\\ud800aaaaaaaaaaaaaaaaaa"}'), 422),
    ("POST", "/keys", {"json": {"role": "viewer", "name": "a\x00"}}, 422),
    ("POST", "/keys", _raw('{"role": "viewer", "name": "\\ud800"}'), 422),
    ("POST", "/keys", {"json": {"role": "viewer", "cities": ["\x00"]}}, 422),
    ("POST", "/keys", {"json": {"role": "viewer", "cities": [2**70]}}, 422),
    ("POST", "/devices", {"content": b'{"device_id": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
     400),
    # path parameters and query strings
    ("GET", "/devices/8699%00", {}, 400),
    ("GET", "/devices/%ED%A0%80", {}, 422),
    ("GET", "/devices/" + "8" * 300, {}, 422),
    ("GET", "/downlinks/99999999999999999999", {}, 422),
    ("GET", "/downlinks/0", {}, 422),
    ("GET", "/keys/%00", {}, 400),
    ("DELETE", "/keys/" + "f" * 300, {}, 422),
    ("PUT", "/targets/%00/progress", {"json": {"value": 1}}, 400),
    ("PUT", "/targets/" + "t" * 5000 + "/progress", {"json": {"value": 1}}, 422),
    ("GET", "/coverage?city=%00", {}, 400),
    ("GET", "/coverage?city=99999999999999999999999", {}, 422),
    ("GET", "/coverage?city=123456", {}, 422),
    ("GET", "/coverage?pilot=%ED%A0%80", {}, 422),
    ("GET", f"/devices/{DEVICE_ID}/downlinks?limit=100000000000000000000", {}, 422),
    ("GET", "/audit?key_id=%00", {}, 400),
    ("GET", "/audit?limit=-1", {}, 422),
    # times the figures' bucket arithmetic cannot hold (schemathesis found year 3957 answered 500)
    ("GET", "/traffic/parking?from=3957-04-12T13:42:12Z&to=3957-04-12T20:04:40Z", {}, 422),
    ("GET", "/traffic/flow?from=1999-12-31T00:00:00Z&to=2000-01-01T00:00:00Z", {}, 422),
    ("GET", f"/devices/{DEVICE_ID}/telemetry?from=2101-01-01T00:00:00Z&to=2101-01-02T00:00:00Z", {}, 422),
    # CSV
    ("POST", "/devices/bulk", _csv(LINE.format(site="a\x00b", installed="", interval="")), 422),
    ("POST", "/devices/bulk", _csv(raw=b"869975030000026,cjt188-nb-water-std,nbiot,Nanchang,residential,\xed\xa0\x80,,\n"),
     415),
    ("POST", "/devices/bulk", _csv(raw=b"869975030000026,cjt188-nb-water-std,nbiot,Nanchang,residential,\xff,,\n"), 415),
    ("POST", "/devices/bulk", _csv(LINE.format(site="s", installed="9999-12-31T23:59:59-01:00", interval="")), 422),
    ("POST", "/devices/bulk", _csv(LINE.format(site="s", installed="10000-01-01", interval="")), 422),
    ("POST", "/devices/bulk", _csv(LINE.format(site="s", installed="", interval="2147483648")), 422),
    ("POST", "/devices/bulk", _csv(LINE.format(site="s", installed="", interval="9" * 5000)), 422),
    ("POST", "/devices/bulk", _csv(LINE.format(site="s" * 300, installed="", interval="")), 422),
    ("POST", "/devices/bulk", _csv(LINE.format(site="x" * 200_000, installed="", interval="")), 422),
    ("POST", "/devices/bulk", _csv("\x00" * 10 + "\n"), 422),
]


@pytest.fixture
def client(settings, keys):
    with TestClient(create_app(settings), headers=bearer(keys.admin), raise_server_exceptions=False) as client:
        assert client.post("/devices", json=DEVICE).status_code == 201
        yield client


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), BAD,
                         ids=[f"{i}-{m} {p[:40]}" for i, (m, p, _, _) in enumerate(BAD)])
def test_unstorable_input_is_a_4xx_problem_with_a_reason(client, caplog, method, path, kwargs, status):
    caplog.set_level(logging.WARNING, logger="api")
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]      # the last resort was not reached


def test_the_registered_device_stays_readable_and_nothing_bad_was_stored(client, settings):
    for method, path, kwargs, _ in BAD:
        client.request(method, path, **kwargs)
    assert client.get(f"/devices/{DEVICE_ID}").status_code == 200
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM downlinks").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM target_progress_log").fetchone()[0] == 0


def test_cli_import_refuses_the_same_and_audits_what_it_registers(settings, tmp_path):
    env = {**os.environ, "IOTJX_DATABASE_URL": settings.database_url}
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + LINE.format(site="s", installed="9999-12-31T23:59:59-01:00", interval="")
                   + LINE.format(site="s", installed="", interval="4294967296"), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "devices", "import", str(bad)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "line 2" in run.stdout and "installed_at must lie between 2000-01-01" in run.stdout
    assert "line 3" in run.stdout and "reporting_interval_s" in run.stdout
    good = tmp_path / "good.csv"
    good.write_text(HEADER + LINE.format(site="s", installed="2024-05-01T08:00:00+08:00", interval="3600"),
                    encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "devices", "import", str(good)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT device_id, reporting_interval_s FROM devices").fetchall() == [
            ("869975030000026", 3600)]
        actor, method, change = conn.execute("SELECT actor, method, change FROM audit_log").fetchone()
    assert actor.startswith("cli:") and method == "devices import" and change["created"] == 1
