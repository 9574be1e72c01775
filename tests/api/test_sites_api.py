"""/sites against the real database: import one and CSV (all or nothing, lines named), list and read
with device counts, unverified sites listed, city scopes, and bad input answered 4xx."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.api.conftest import NANCHANG, YINGTAN
from tests.helpers import bearer

LONGHUSHAN = {"site_id": "JX-SS-0004", "city": "鹰潭", "kind": "scenic_spot", "name": "龙虎山风景名胜区",
              "aliases": ["龙虎山", "Longhushan"], "grade": "5A"}
CSV_HEADER = "site_id,city,kind,name,aliases,grade,model_site,model_site_since,status,opened_on,closed_on\n"


@pytest.fixture
def client(settings, keys):
    with TestClient(create_app(settings), headers=bearer(keys.admin), raise_server_exceptions=False) as client:
        yield client


def _csv(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "text/csv"}}


def test_import_one_read_it_and_devices_attach_by_alias(client, settings):
    r = client.post("/sites", json=LONGHUSHAN)
    assert r.status_code == 201 and r.json() == {"created": 1, "updated": 0, "merged_unverified": 0,
                                                 "devices_moved": 0}
    for n, name in enumerate(["龙虎山", "longhushan", "龙虎山风景名胜区"]):
        made = client.post("/devices", json={"device_id": f"86997503000{n:04d}", "model": "nb-parking-sensor",
                                             "city": "Yingtan", "site_kind": "scenic_spot", "site_name": name})
        assert made.status_code == 201 and made.json()["catalogue_sites"] == 1, made.text
    made = client.post("/devices", json={"device_id": "869975030009999", "model": "nb-parking-sensor",
                                         "site_id": "JX-SS-0004", "status": "inactive"})
    assert made.status_code == 201, made.text
    got = client.get("/sites/JX-SS-0004").json()
    assert got == {"site_id": "JX-SS-0004", "verified": True, "city": YINGTAN, "kind": "scenic_spot",
                   "name": "龙虎山风景名胜区", "aliases": ["Longhushan", "龙虎山"], "grade": "5A", "model_site": False,
                   "model_site_since": None, "status": "active", "opened_on": None, "closed_on": None,
                   "district_code": None, "district_name_zh": None, "district_name_en": None,
                   "devices": {"active": 3, "inactive": 1}}
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(DISTINCT site_id) FROM devices").fetchone()[0] == 1
    assert client.get("/sites/JX-NOPE").status_code == 404
    # Updated in place; closed_on alone makes it closed.
    r = client.post("/sites", json={**LONGHUSHAN, "closed_on": "2026-01-01"})
    assert r.json()["updated"] == 1 and client.get("/sites/JX-SS-0004").json()["status"] == "closed"
    bad = client.post("/sites", json={**LONGHUSHAN, "site_id": "JX-SS-0005", "aliases": ["龙虎山"], "name": "x"})
    assert bad.status_code == 422 and "JX-SS-0004" in bad.text and "JX-SS-0005" in bad.text
    assert bad.json()["title"] == "invalid site records"
    unknown = client.post("/devices", json={"device_id": "869975030008888", "model": "nb-parking-sensor",
                                            "site_id": "JX-NOPE"})
    assert unknown.status_code == 422 and "unknown site_id 'JX-NOPE'" in unknown.text


def test_bulk_is_all_or_nothing_and_merges_unverified_sites(client, settings):
    client.post("/devices", json={"device_id": "869975030000018", "model": "nb-parking-sensor", "city": "Jiujiang",
                                  "site_kind": "scenic_spot", "site_name": "庐山"})
    listed = client.get("/sites", params={"verified": False}).json()
    assert listed["total"] == 1 and listed["items"][0]["site_id"] is None and listed["items"][0]["name"] == "庐山"
    assert listed["items"][0]["verified"] is False and listed["items"][0]["devices"] == {"active": 1, "inactive": 0}
    bad = client.post("/sites/bulk", **_csv(CSV_HEADER + "JX-SS-0001,Jiujiang,scenic_spot,庐山风景名胜区,庐山,5A,,,,,\n"
                                            "JX-SS-0002,Ji'an,scenic_spot,井冈山,,9A,,,,,\n"
                                            "JX-CO-0001,Yingtan,community,c,,,,,closed,,\n"))
    assert bad.status_code == 422 and {e["line"] for e in bad.json()["errors"]} == {3, 4}
    assert client.get("/sites").json()["total"] == 1                 # nothing imported
    good = client.post("/sites/bulk", **_csv(CSV_HEADER + "JX-SS-0001,Jiujiang,scenic_spot,庐山风景名胜区,庐山,5A,,,,,\n"
                                             "JX-CO-0001,Yingtan,community,c,,,yes,2024-06-01,,,\n"))
    assert good.status_code == 200 and good.json() == {"created": 2, "updated": 0, "merged_unverified": 1,
                                                       "devices_moved": 1}
    assert client.get("/sites", params={"verified": False}).json()["total"] == 0
    sites = client.get("/sites").json()
    assert [s["site_id"] for s in sites["items"]] == ["JX-CO-0001", "JX-SS-0001"]
    assert sites["items"][1]["devices"]["active"] == 1
    assert client.get("/sites", params={"kind": "community"}).json()["total"] == 1
    # cursor pages: two sites one at a time, then the end
    first = client.get("/sites", params={"limit": 1}).json()
    assert [s["site_id"] for s in first["items"]] == ["JX-CO-0001"] and first["total"] == 2 and first["next_cursor"]
    second = client.get("/sites", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert [s["site_id"] for s in second["items"]] == ["JX-SS-0001"] and second["next_cursor"] is None
    assert client.get("/sites", params={"cursor": "bm90IGEgY3Vyc29y"}).status_code == 422
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT change->>'created' FROM audit_log WHERE route = '/sites/bulk'").fetchall() == [
            ("2",)]


def test_a_scoped_key_imports_and_sees_its_cities_only(client, settings, keys):
    assert client.post("/sites", json=LONGHUSHAN).status_code == 201
    nanchang = {"Authorization": bearer(keys.nanchang_admin)["Authorization"]}
    refused = client.post("/sites", json={**LONGHUSHAN, "site_id": "JX-SS-0100", "name": "y", "aliases": []},
                          headers=nanchang)
    assert refused.status_code == 403
    moved = client.post("/sites", json={**LONGHUSHAN, "city": "Nanchang"}, headers=nanchang)
    assert moved.status_code == 403                                   # another city's site
    ok = client.post("/sites", json={"site_id": "JX-MU-0001", "city": "Nanchang", "kind": "museum",
                                     "name": "江西省博物馆"}, headers=nanchang)
    assert ok.status_code == 201
    seen = client.get("/sites", headers=nanchang).json()
    assert [s["site_id"] for s in seen["items"]] == ["JX-MU-0001"] and seen["items"][0]["city"] == NANCHANG
    assert client.get("/sites/JX-SS-0004", headers=nanchang).status_code == 404
    assert client.get("/sites", params={"city": YINGTAN}, headers=nanchang).status_code == 403
    device = {"device_id": "869975030000018", "model": "nb-parking-sensor", "site_id": "JX-SS-0004"}
    assert client.post("/devices", json=device, headers=nanchang).status_code == 403


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("POST", "/sites", {"json": {**LONGHUSHAN, "name": "a\x00b"}}),
    ("POST", "/sites", {"content": b'{"site_id": "A", "city": "Yingtan", "kind": "farm", "name": "\\ud800"}',
                        "headers": {"content-type": "application/json"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "name": "x" * 201}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "aliases": ["a"] * 21}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "site_id": "bad id"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "opened_on": "1999-12-31"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "opened_on": "99999-01-01"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "grade": "6A"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "status": "closed"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "city": "Atlantis"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "district": "360102"}}),     # 东湖区 is Nanchang's
    ("POST", "/sites", {"json": {**LONGHUSHAN, "district": "369999"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "district": "东湖区"}}),
    ("POST", "/sites", {"json": {**LONGHUSHAN, "district": "x" * 51}}),
    ("POST", "/sites/bulk", _csv(CSV_HEADER.strip() + ",district\nA,Yingtan,farm,x,,,,,,,,濂溪区\n")),
    ("POST", "/sites/bulk", _csv(CSV_HEADER + "A,Yingtan,farm,x\x00y,,,,,,,\n")),
    ("POST", "/sites/bulk", _csv("site_id,city\nA,Yingtan\n")),
    ("POST", "/sites/bulk", _csv(CSV_HEADER)),
    ("GET", "/sites?limit=0", {}),
    ("GET", "/sites?limit=100000000000000000000", {}),
    ("GET", "/sites?limit=0", {}),
    ("GET", "/sites?city=123456", {}),
    ("GET", "/sites?verified=maybe", {}),
    ("GET", "/sites/" + "s" * 300, {}),
    ("GET", "/sites/%ED%A0%80", {}),
])
def test_bad_input_is_a_4xx_problem(client, method, path, kwargs):
    r = client.request(method, path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_bulk_bytes_not_utf8_are_415(client):
    r = client.post("/sites/bulk", content=CSV_HEADER.encode() + b"A,Yingtan,farm,\xff,,,,,,,\n",
                    headers={"content-type": "text/csv"})
    assert r.status_code == 415


def test_a_site_district_by_code_or_name_is_shown_with_its_names(client, settings):
    """district in (code or the name within the city), district_code and both names out; the names as the
    migration's table holds them, read here in plain SQL."""
    assert client.post("/sites", json={**LONGHUSHAN, "district": "贵溪市"}).status_code == 201
    bulk = client.post("/sites/bulk", **_csv(CSV_HEADER.strip() + ",district\n"
                                              "JX-SS-0006,Nanchang,scenic_spot,滕王阁旅游区,,5A,,,,,,360102\n"
                                              "JX-CO-0002,南昌,community,红谷滩示例社区,,,,,,,,\n"))
    assert bulk.status_code == 200, bulk.text
    with psycopg.connect(settings.database_url) as conn:
        names = {code: (zh, en) for code, zh, en in conn.execute(
            "SELECT code, name_zh, name_en FROM districts WHERE code IN (360681, 360102)")}
    got = client.get("/sites/JX-SS-0004").json()
    assert (got["district_code"], got["district_name_zh"], got["district_name_en"]) == (360681, *names[360681])
    listed = {s["site_id"]: s for s in client.get("/sites", params={"city": NANCHANG}).json()["items"]}
    assert (listed["JX-SS-0006"]["district_code"], listed["JX-SS-0006"]["district_name_zh"]) == (360102, "东湖区")
    assert listed["JX-CO-0002"]["district_code"] is None and listed["JX-CO-0002"]["district_name_en"] is None
    wrong = client.post("/sites", json={**LONGHUSHAN, "district": "东湖区"})
    assert wrong.status_code == 422 and "unknown district '东湖区' in city 鹰潭 (360600)" in wrong.text
