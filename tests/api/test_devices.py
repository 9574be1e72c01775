"""The device routes against the real database: the list and its filters (the Device health states and
battery held to a plain-SQL recount and to the planted story), the CSV export (round trip through the
import), 201/200 on registration, PATCH, decommission (the gateway then refuses the device), and the
bulk import that lands good lines and reports bad ones; each with keys of each role and a city-scoped key."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

import decoders
from analytics.health import batteries, not_live
from api.app import create_app
from ingest.coap import set_device_token
from ingest.coap_credentials import DeviceCredentials
from ingest.registry import DeviceRegistry
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.mqtt_accounts import set_device_password
from iotjx.sites import SiteRecord, import_sites
from tests.analytics import test_health as story
from tests.api.conftest import NANCHANG, YINGTAN, key_id
from tests.helpers import bearer, walk_pages

FACTOR = 1.5                    # the settings' default live_factor, which the API uses
CSV = {"content-type": "text/csv"}


@pytest.fixture
def fleet(settings, monkeypatch):
    """The Device health story (tests/analytics/test_health.py) stored through the real pipeline, told
    relative to now; an autocommit connection to it."""
    now = datetime.now(UTC).replace(microsecond=0)
    monkeypatch.setattr(story, "NOW", now)
    monkeypatch.setattr(story, "INSTALLED", now - timedelta(days=3))
    assert settings.live_factor == FACTOR
    with psycopg.connect(settings.database_url) as conn:
        register_devices(conn, story._records())
    ok, bad = story._story()
    counters = story._process(settings.database_url, ok + bad)
    assert counters["stored"] == len(ok) and counters["rejected"] == len(bad), counters
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _all(client: TestClient, key: str, path: str = "/devices", **query) -> list[dict]:
    """Every item of a list, page by page (3 a page, so that paging is exercised)."""
    return walk_pages(client, path, key, {**query, "limit": 3})


def _ids(conn: psycopg.Connection, where: str = "true", params: dict | None = None) -> list[str]:
    return [r[0] for r in conn.execute(f"""SELECT d.device_id FROM devices d LEFT JOIN sites s USING (site_id)
                                           WHERE {where} ORDER BY d.device_id""", params or {})]


# The Device health definitions written apart, in plain SQL over the raw log: live = active, installed
# and a stored uplink within live_factor × interval; malformed = active, installed, not live, and a
# reject with its id in that window; silent = the other active installed devices.
RECOUNT = """
    SELECT d.device_id,
           CASE WHEN EXISTS (SELECT 1 FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                               AND r.received_at >= now() - interval '1 second' * %(f)s * i.s) THEN 'live'
                WHEN EXISTS (SELECT 1 FROM rejected_uplinks x WHERE x.device_id = d.device_id
                               AND x.received_at > now() - interval '1 second' * %(f)s * i.s) THEN 'malformed'
                ELSE 'silent' END
    FROM devices d JOIN device_models m USING (model),
         LATERAL (SELECT coalesce(d.reporting_interval_s, m.reporting_interval_s) AS s) i
    WHERE d.status = 'active' AND d.installed_at <= now()"""


# --------------------------------------------------------------------------- the list

def test_list_pages_through_every_device_with_its_fields(fleet, client, keys):
    items = _all(client, keys.viewer)
    assert [d["device_id"] for d in items] == _ids(fleet)
    by_id = {d["device_id"]: d for d in items}
    row = fleet.execute("""
        SELECT d.model, m.codec, d.pilot, d.network, s.city_code, s.kind, s.name, d.status,
               coalesce(d.reporting_interval_s, m.reporting_interval_s), st.last_seen, st.uplinks
        FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
        JOIN device_state st USING (device_id) WHERE d.device_id = %s""", (story.W_LOW,)).fetchone()
    got = by_id[story.W_LOW]
    assert (got["model"], got["codec"], got["pilot"], got["network"], got["city"], got["site_kind"],
            got["site_name"], got["status"], got["reporting_interval_s"], datetime.fromisoformat(got["last_seen"]),
            got["uplinks"]) == row
    assert got["site_id"] is None                                    # an unverified (free-text) site
    assert got["live"] is True and got["state"] == "live"
    assert by_id[story.W_OFF]["state"] is None and by_id[story.W_OFF]["live"] is False      # inactive
    # the single device answers the same
    assert client.get(f"/devices/{story.W_BAD}", headers=bearer(keys.viewer)).json() == by_id[story.W_BAD]


def test_state_filters_are_the_device_health_definitions(fleet, client, keys):
    recount = dict(fleet.execute(RECOUNT, {"f": FACTOR}).fetchall())
    # every device's state, unfiltered (the page first, then the health SQL for its devices only)
    assert {d["device_id"]: d["state"] for d in _all(client, keys.viewer)} == \
        {**{d: None for d in _ids(fleet)}, **recount}
    for state in ("live", "silent", "malformed"):
        got = [d["device_id"] for d in _all(client, keys.viewer, state=state)]
        assert got == sorted(d for d, s in recount.items() if s == state), state
        assert all(d["state"] == state and d["live"] == (state == "live")
                   for d in _all(client, keys.viewer, state=state))
    # the planted story, and analytics.health itself: one definition
    silent, malformed = not_live(fleet, fleet.execute("SELECT now()").fetchone()[0], live_factor=FACTOR)
    assert {d["device_id"] for d in _all(client, keys.viewer, state="malformed")} == {story.W_BAD, story.S_BAD} \
        == {d.device_id for d in malformed}
    assert {d["device_id"] for d in _all(client, keys.viewer, state="silent")} == \
        {story.W_SILENT, story.W_NEVER, story.UITD} == {d.device_id for d in silent}
    # sending only malformed frames is not silence
    assert story.W_BAD not in {d["device_id"] for d in _all(client, keys.viewer, state="silent")}
    # a city-scoped key: the same definition, its city only
    nanchang = [d["device_id"] for d in _all(client, keys.nanchang_viewer, state="malformed")]
    assert nanchang == [story.W_BAD]


def test_battery_low_is_the_normalised_battery_state(fleet, client, keys):
    low = {d["device_id"] for d in _all(client, keys.viewer, battery_low="true")}
    assert low == {story.W_LOW, story.P_MV, story.P_BIT, story.S_LOW, story.P_JSON}
    assert low == {b.device_id for b in batteries(fleet, fleet.execute("SELECT now()").fetchone()[0])
                   if b.state == "low"}
    rest = {d["device_id"] for d in _all(client, keys.viewer, battery_low="false")}
    assert rest == set(_ids(fleet)) - low
    assert {d["device_id"] for d in _all(client, keys.nanchang_viewer, battery_low="true")} == \
        {story.P_MV, story.P_BIT}


@pytest.mark.parametrize("query, where", [
    ({"city": 360400}, "s.city_code = 360400"),
    ({"pilot": "traffic"}, "d.pilot = 'traffic'"),
    ({"network": "cat1"}, "d.network = 'cat1'"),
    ({"model": "nb-parking-sensor"}, "d.model = 'nb-parking-sensor'"),
    ({"status": "inactive"}, "d.status = 'inactive'"),
    ({"city": 360600, "pilot": "water", "status": "active"},
     "s.city_code = 360600 AND d.pilot = 'water' AND d.status = 'active'"),
    ({"model": "x' OR '1'='1"}, "false"),                        # a parameter, never SQL
])
def test_filters_equal_a_plain_sql_where(fleet, client, keys, query, where):
    assert [d["device_id"] for d in _all(client, keys.viewer, **query)] == _ids(fleet, where)


def test_site_filter_takes_a_catalogue_code(fleet, client, keys, settings):
    with psycopg.connect(settings.database_url) as conn:
        import_sites(conn, [SiteRecord("JX-SS-0004", "Yingtan", "scenic_spot", "龙虎山风景名胜区", ("龙虎山",))])
        register_devices(conn, [DeviceRecord("869975030000018", "nb-parking-sensor", site_id="JX-SS-0004")])
    got = _all(client, keys.viewer, site_id="JX-SS-0004")
    assert [d["device_id"] for d in got] == ["869975030000018"] and got[0]["site_id"] == "JX-SS-0004"
    assert _all(client, keys.viewer, site_id="JX-NO-0000") == []


def test_a_city_scoped_key_lists_only_its_cities(fleet, client, keys):
    for role in ("viewer", "operator", "admin"):
        got = [d["device_id"] for d in _all(client, keys.scoped(role))]
        assert got == _ids(fleet, "s.city_code = %(c)s", {"c": NANCHANG})
    other = client.get("/devices", params={"city": YINGTAN}, headers=bearer(keys.nanchang_viewer))
    assert other.status_code == 403 and other.headers["content-type"] == "application/problem+json"
    assert client.get(f"/devices/{story.W_LOW}", headers=bearer(keys.nanchang_viewer)).status_code == 404


def test_bad_list_requests_are_problems(fleet, client, keys):
    h = bearer(keys.viewer)
    for params in ({"state": "dead"}, {"city": 999999}, {"cursor": "nope"}, {"limit": 0}, {"citty": 360100},
                   {"battery_low": "maybe"}, {"model": "x" * 101}, {"site_id": "bad code!"}):
        r = client.get("/devices", params=params, headers=h)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", (params, r.text)
    # a cursor of another list (the cities') is refused, not misread
    cities_cursor = client.get("/cities", params={"limit": 1}, headers=h).json()["next_cursor"]
    assert client.get("/devices", params={"cursor": cities_cursor}, headers=h).status_code == 422
    assert client.get("/devices").status_code == 401


# --------------------------------------------------------------------------- CSV export

def _csv(client: TestClient, key: str, **query) -> list[dict[str, str]]:
    r = client.get("/devices.csv", params=query, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    return list(csv.DictReader(io.StringIO(r.content.decode("utf-8"))))


def test_csv_export_has_the_list_filters_and_scope(fleet, client, keys):
    rows = _csv(client, keys.viewer)
    assert [r["device_id"] for r in rows] == _ids(fleet)
    assert {r["device_id"]: r["state"] for r in _csv(client, keys.viewer, state="malformed")} == \
        {story.W_BAD: "malformed", story.S_BAD: "malformed"}
    assert [r["device_id"] for r in _csv(client, keys.nanchang_viewer)] == _ids(fleet, "s.city_code = %(c)s",
                                                                                   {"c": NANCHANG})
    assert [r["device_id"] for r in _csv(client, keys.viewer, pilot="fire", city=360400)] == \
        _ids(fleet, "d.pilot = 'fire' AND s.city_code = 360400")
    assert client.get("/devices.csv", params={"city": YINGTAN}, headers=bearer(keys.nanchang_viewer)).status_code == 403
    assert client.get("/devices.csv", params={"state": "x"}, headers=bearer(keys.viewer)).status_code == 422


def test_csv_export_imports_back_as_the_same_devices(settings, client, keys):
    with psycopg.connect(settings.database_url) as conn:
        import_sites(conn, [SiteRecord("JX-SS-0004", "Yingtan", "scenic_spot", "龙虎山风景名胜区", ("龙虎山",))])
        register_devices(conn, [
            DeviceRecord("869975030000018", "nb-parking-sensor", site_id="JX-SS-0004", reporting_interval_s=900),
            DeviceRecord("869975030000026", "cjt188-nb-water-std", city="Nanchang", site_kind="residential",
                         site_name='红谷滩 "一期", 3栋', status="inactive",
                         installed_at=datetime(2025, 3, 1, 8, 0, tzinfo=UTC)),
            DeviceRecord("869975030000034", "ctwing-lian-smoke", network="nbiot", city="360700", site_kind="building",
                         site_name="章贡区 消防站", status="retired"),
            DeviceRecord("869975030000042", "cat1-json-parking", city="上饶", site_kind="scenic_spot",
                         site_name="三清山")])
    table = """SELECT d.device_id, d.model, d.pilot, d.network, d.site_id, d.installed_at, d.status,
                      d.reporting_interval_s FROM devices d ORDER BY d.device_id"""
    with psycopg.connect(settings.database_url) as conn:
        before = conn.execute(table).fetchall()
    exported = client.get("/devices.csv", headers=bearer(keys.viewer)).content
    assert exported.decode("utf-8").splitlines()[0].startswith("device_id,model,network,city,site_kind,site_name")
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("DELETE FROM devices")
    r = client.post("/devices/bulk", content=exported, headers={**CSV, **bearer(keys.admin)})
    assert r.status_code == 200 and r.json()["created"] == 4, r.text
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(table).fetchall() == before


# --------------------------------------------------------------------------- writes

DEVICE = {"device_id": "869975030000018", "model": "cjt188-nb-water-std", "city": "Yingtan",
          "site_kind": "residential", "site_name": "龙岗小区"}


def test_post_answers_201_when_created_and_200_when_updated(settings, client, keys):
    h = bearer(keys.admin)
    assert client.post("/devices", json=DEVICE, headers=h).status_code == 201
    again = client.post("/devices", json={**DEVICE, "status": "inactive"}, headers=h)
    assert again.status_code == 200 and again.json()["updated"] == 1
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT status FROM audit_log WHERE route = '/devices' ORDER BY audit_id").fetchall() == \
            [(201,), (200,)]


def _audit(db_url: str, key: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT method, route, target, change, status FROM audit_log WHERE key_id = %s "
                            "ORDER BY audit_id", (key_id(key),)).fetchall()


def test_patch_changes_site_status_and_interval_audited(settings, client, keys):
    with psycopg.connect(settings.database_url) as conn:
        import_sites(conn, [SiteRecord("JX-SS-0004", "Yingtan", "scenic_spot", "龙虎山风景名胜区"),
                            SiteRecord("JX-SS-0100", "Nanchang", "scenic_spot", "滕王阁")])
    assert client.post("/devices", json=DEVICE, headers=bearer(keys.admin)).status_code == 201
    path = f"/devices/{DEVICE['device_id']}"
    assert client.patch(path, json={"status": "inactive"}, headers=bearer(keys.viewer)).status_code == 403
    r = client.patch(path, json={"site_id": "JX-SS-0004", "status": "inactive", "reporting_interval_s": 7200},
                     headers=bearer(keys.operator))
    assert r.status_code == 200, r.text
    assert (r.json()["site_id"], r.json()["site_kind"], r.json()["status"], r.json()["reporting_interval_s"]) == \
        ("JX-SS-0004", "scenic_spot", "inactive", 7200)
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("""SELECT s.code, d.status, d.reporting_interval_s FROM devices d JOIN sites s USING (site_id)
                               WHERE d.device_id = %s""", (DEVICE["device_id"],)).fetchone() == \
            ("JX-SS-0004", "inactive", 7200)
    # null: back to the model's interval; a field left out stays
    r = client.patch(path, json={"reporting_interval_s": None}, headers=bearer(keys.operator))
    assert r.json()["reporting_interval_s"] == 86400 and r.json()["status"] == "inactive"
    assert _audit(settings.database_url, keys.operator) == [
        ("PATCH", "/devices/{device_id}", DEVICE["device_id"],
         {"site_id": [None, "JX-SS-0004"], "status": ["active", "inactive"], "reporting_interval_s": [None, 7200]}, 200),
        ("PATCH", "/devices/{device_id}", DEVICE["device_id"], {"reporting_interval_s": [7200, None]}, 200)]
    # refused with a reason
    for body, status in (({"site_id": "JX-NO-0000"}, 422), ({"status": "retired"}, 422), ({"colour": "red"}, 422),
                         ({"reporting_interval_s": 0}, 422)):
        bad = client.patch(path, json=body, headers=bearer(keys.operator))
        assert bad.status_code == status and bad.headers["content-type"] == "application/problem+json", body
    assert client.patch(path, json={}, headers=bearer(keys.nanchang_operator)).status_code == 404
    assert client.patch("/devices/000", json={}, headers=bearer(keys.operator)).status_code == 404
    # a city-scoped key does not move its device to another city's site
    nanchang = {**DEVICE, "device_id": "869975030000026", "city": "Nanchang"}
    assert client.post("/devices", json=nanchang, headers=bearer(keys.admin)).status_code == 201
    moved = client.patch(f"/devices/{nanchang['device_id']}", json={"site_id": "JX-SS-0004"},
                         headers=bearer(keys.nanchang_operator))
    assert moved.status_code == 403
    assert client.patch(f"/devices/{nanchang['device_id']}", json={"site_id": "JX-SS-0100"},
                        headers=bearer(keys.nanchang_operator)).status_code == 200


def test_decommission_keeps_history_revokes_credentials_and_the_gateway_refuses_it(settings, client, keys):
    device = DEVICE["device_id"]
    assert client.post("/devices", json=DEVICE, headers=bearer(keys.admin)).status_code == 201
    now = datetime.now(UTC)
    frame = decoders.encode("cjt188", {"meter_address": device[-14:], "flow_m3": 1.0, "meter_time": now, "status": 0})
    assert story._process(settings.database_url, [story._up(device, frame, now - timedelta(hours=1))])["stored"] == 1
    with psycopg.connect(settings.database_url) as conn:
        set_device_token(conn, device)
        set_device_password(conn, device)
        readings = conn.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (device,)).fetchone()[0]
    assert readings == 1
    queued = client.post(f"/devices/{device}/downlinks", json={"kind": "valve_close"}, headers=bearer(keys.operator))
    assert queued.status_code == 201, queued.text
    path = f"/devices/{device}/decommission"
    assert client.post(path, headers=bearer(keys.viewer)).status_code == 403
    assert client.post(path, headers=bearer(keys.nanchang_operator)).status_code == 404
    r = client.post(path, headers=bearer(keys.operator))
    assert r.status_code == 200 and r.json() == {"device_id": device, "status": "retired", "previous_status": "active",
                                                 "mqtt_account_removed": True, "coap_token_removed": True,
                                                 "commands_expired": 1}
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT status FROM devices WHERE device_id = %s", (device,)).fetchone() == ("retired",)
        assert conn.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (device,)).fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM mqtt_accounts WHERE device_id = %s", (device,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM device_credentials WHERE device_id = %s", (device,)).fetchone()[0] == 0
        assert conn.execute("SELECT status FROM downlinks WHERE device_id = %s", (device,)).fetchall() == [("expired",)]
    assert _audit(settings.database_url, keys.operator)[1][:3] == ("POST", "/devices/{device_id}/decommission", device)
    # the gateway's registry and CoAP credentials no longer know it; its next uplink is rejected, not stored
    registry = DeviceRegistry(lambda: connect(settings.database_url))
    creds = DeviceCredentials(lambda: connect(settings.database_url))
    try:
        assert registry.lookup([device]) == {}
        assert creds._fetch({device}) == {}
    finally:
        registry.close()
        creds.close()
    later = decoders.encode("cjt188", {"meter_address": device[-14:], "flow_m3": 2.0, "meter_time": now, "status": 0})
    counters = story._process(settings.database_url, [story._up(device, later, now)])
    assert counters["stored"] == 0 and counters["rejected"] == 1, counters
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT reason FROM rejected_uplinks WHERE device_id = %s", (device,)).fetchone() == \
            ("unknown_device",)
    # listed as retired, with no state; decommissioning again changes nothing
    got = client.get(f"/devices/{device}", headers=bearer(keys.viewer)).json()
    assert got["status"] == "retired" and got["state"] is None and got["uplinks"] == 1
    again = client.post(path, headers=bearer(keys.operator)).json()
    assert again["previous_status"] == "retired" and not again["mqtt_account_removed"]
    assert client.patch(f"/devices/{device}", json={"status": "active"}, headers=bearer(keys.operator)).status_code == 409


# --------------------------------------------------------------------------- bulk import

HEADER = "device_id,model,network,city,site_kind,site_name,site_id,reporting_interval_s\n"


def test_bulk_skip_lands_100000_good_lines_and_reports_the_bad_by_line(settings, client, keys):
    rng = random.Random(14)
    cities = ["Nanchang", "Yingtan", "赣州", "360400", "Shangrao"]
    lines = [HEADER]
    good: list[str] = []
    for k in range(100_000):
        device = f"8699{k:011d}"
        good.append(device)
        lines.append(f"{device},cjt188-nb-water-std,nbiot,{rng.choice(cities)},residential,小区 {k % 50},,\n")
    bad = {  # line number (the header is line 1) -> (the line, what the error says)
        10: ("86990000000000X!,cjt188-nb-water-std,nbiot,Nanchang,residential,x,,\n", "device_id"),
        5000: ("869911111111111,no-such-model,nbiot,Nanchang,residential,x,,\n", "unknown model"),
        50000: ("869922222222222,cjt188-nb-water-std,nbiot,Atlantis,residential,x,,\n", "Atlantis"),
        70000: ("869933333333333,cjt188-nb-water-std,nbiot,,,,JX-NO-0000,\n", "unknown site_id"),
        90000: (f"{good[5]},cjt188-nb-water-std,nbiot,Nanchang,residential,x,,\n", "appears twice"),
        99999: ("869944444444444,cjt188-nb-water-std,nbiot,Nanchang,residential,坏行,,-5\n", "reporting_interval_s"),
    }
    for n in sorted(bad):
        lines.insert(n - 1, bad[n][0])
    body = "".join(lines).encode()
    r = client.post("/devices/bulk", params={"on_error": "skip"}, content=body, headers={**CSV, **bearer(keys.admin)})
    assert r.status_code == 200, r.text[:2000]
    result = r.json()
    assert result["created"] == 100_000 and result["updated"] == 0 and result["skipped"] == len(bad)
    assert {e["line"] for e in result["errors"]} == set(bad)
    for e in result["errors"]:
        assert bad[e["line"]][1] in e["error"], e
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 100_000
        assert conn.execute("SELECT count(*) FROM devices WHERE device_id = ANY(%s)",
                            (["869911111111111", "869922222222222", "869933333333333", "869944444444444"],)
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM sites WHERE name = '坏行' OR name = 'x'").fetchone()[0] == 0
        assert conn.execute("SELECT city_code FROM devices JOIN sites USING (site_id) WHERE device_id = %s",
                            (good[5],)).fetchone()[0] == {"Nanchang": 360100, "Yingtan": 360600, "赣州": 360700,
                                                          "360400": 360400, "Shangrao": 361100}[lines[6].split(",")[3]]
        audit = conn.execute("SELECT change FROM audit_log WHERE route = '/devices/bulk'").fetchone()[0]
    assert audit["on_error"] == "skip" and audit["skipped"] == len(bad) and audit["devices"] == 100_000


def test_bulk_skip_with_a_scoped_key_reports_other_cities_lines(settings, client, keys):
    body = (HEADER + "869975030000018,cjt188-nb-water-std,nbiot,Nanchang,residential,a,,\n"
                     "869975030000026,cjt188-nb-water-std,nbiot,Yingtan,residential,b,,\n"
                     "869975030000034,cjt188-nb-water-std,nbiot,南昌,residential,c,,\n").encode()
    h = {**CSV, **bearer(keys.nanchang_admin)}
    assert client.post("/devices/bulk", content=body, headers=h).status_code == 403        # reject: all or nothing
    r = client.post("/devices/bulk", params={"on_error": "skip"}, content=body, headers=h)
    assert r.status_code == 200 and r.json()["created"] == 2 and r.json()["skipped"] == 1
    assert r.json()["errors"] == [{"line": 3, "error": "city 'Yingtan' is outside this key's cities"}]
    with psycopg.connect(settings.database_url) as conn:
        assert _ids(conn) == ["869975030000018", "869975030000034"]
    # a device of another city is not overwritten through a skipping import either
    assert client.post("/devices", json={**DEVICE, "device_id": "869975030000042"},
                       headers=bearer(keys.admin)).status_code == 201
    again = (HEADER + "869975030000042,cjt188-nb-water-std,nbiot,Nanchang,residential,a,,\n"
                      "869975030000050,cjt188-nb-water-std,nbiot,Nanchang,residential,a,,\n").encode()
    r = client.post("/devices/bulk", params={"on_error": "skip"}, content=again, headers=h)
    assert r.json()["created"] == 1 and [e["line"] for e in r.json()["errors"]] == [2]


def test_bulk_refuses_what_is_not_csv(settings, client, keys):
    h = bearer(keys.admin)
    for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"},
                    {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/csv; charset=gbk"}):
        r = client.post("/devices/bulk", content=b'{"device_id": "1"}', headers={**headers, **h})
        assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json", headers
    r = client.post("/devices/bulk", json=[DEVICE], headers=h)
    assert r.status_code == 415 and "text/csv" in r.json()["detail"]
    # a file that cannot be read through is refused whole, even when skipping
    for body in (b"device_id,network\n1,nbiot\n", b"device_id,model\n", "\xff\xfe".encode("latin-1")):
        r = client.post("/devices/bulk", params={"on_error": "skip"}, content=body, headers={**CSV, **h})
        assert r.status_code in (415, 422) and r.headers["content-type"] == "application/problem+json", body
    assert client.post("/devices/bulk", params={"on_error": "maybe"}, content=b"x", headers={**CSV, **h}).status_code == 422
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0
