"""Every route declares who may call it, and is held to it.

The route table is walked: a route without a role dependency fails the first test (only /health is
exempt).  Then every route is called, from a table of one valid request per route that must name
every route the app serves: with no key (401), a revoked key (401), a key one role too low (403), a
key scoped to Nanchang on a Yingtan object (404, or 403 where the request itself names the other
city), and the right key (2xx) — and every write answered 2xx must have left its audit row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import OPEN_PATHS
from ingest.coap import set_device_token
from iotjx.mqtt_accounts import set_device_password
from iotjx.sites import SiteRecord, import_sites
from tests.api.conftest import YINGTAN, key_id
from tests.helpers import bearer, insert_key

ROLES = ("viewer", "operator", "admin")
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
YINGTAN_DEVICE = "869975030000018"
DEVICE = {"model": "cjt188-nb-water-std", "network": "nbiot", "site_kind": "residential", "site_name": "龙岗小区"}


def served_routes(app) -> list[tuple[str, str, Any]]:
    """(method, path template, route) for every route the app serves, however FastAPI keeps them."""
    try:
        from fastapi.routing import iter_route_contexts          # FastAPI ≥ 0.16x: included routers are lazy
        contexts = [c.original_route for c in iter_route_contexts(app.routes)]
    except ImportError:
        contexts = list(app.routes)
    return [(m, r.path, r) for r in contexts for m in sorted(getattr(r, "methods", None) or ()) if m != "HEAD"]


def declared_role(route) -> str | None:
    """The role a route's dependencies require (None: none does)."""
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        role = getattr(dependant.call, "required_role", None)
        if role is not None:
            return role
        pending.extend(dependant.dependencies)
    return None


def test_every_route_declares_a_role(settings):
    app = create_app(settings)
    routes = served_routes(app)
    assert len(routes) >= 15
    missing = [(m, p) for m, p, r in routes if p not in OPEN_PATHS and declared_role(r) is None]
    assert missing == [], f"routes without a role dependency: {missing}"
    assert OPEN_PATHS == {"/health"}


# ----------------------------------------------------------------------------- one request per route

@dataclass
class World:
    """What the requests act on: a Yingtan device with credentials and a command, a spare key."""

    db_url: str
    client: TestClient
    downlink_id: int = 0
    alarm_id: int = 0
    spare_keys: list[str] = field(default_factory=list)

    def spare_key(self) -> str:
        key = insert_key(self.db_url, "viewer", [YINGTAN])
        self.spare_keys.append(key)
        return key_id(key)

    def alarm(self) -> int:
        """A fire alarm on the Yingtan device (made once): acknowledged, then cleared, by the calls."""
        if not self.alarm_id:
            with psycopg.connect(self.db_url) as conn:
                self.alarm_id = conn.execute(
                    "INSERT INTO fire_alarms (device_id, system_type, system_address, component_type, component_address,"
                    " kind, raised_at, received_at) VALUES (%s, 1, 1, 40, 17, 'alarm', now() - interval '1 hour',"
                    " now() - interval '1 hour') RETURNING alarm_id", (YINGTAN_DEVICE,)).fetchone()[0]
        return self.alarm_id

    def reject(self) -> int:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute("INSERT INTO rejected_uplinks (received_at, device_id, transport, codec, payload, reason)"
                                " VALUES (now(), %s, 'mqtt', 'cjt188', '\\x68', 'length') RETURNING reject_id",
                                (YINGTAN_DEVICE,)).fetchone()[0]

    def job(self) -> int:
        """A re-decode job of Yingtan's admin that ended (the runner leaves it alone)."""
        with psycopg.connect(self.db_url) as conn:
            return conn.execute("INSERT INTO jobs (kind, state, cities, actor, started_at, finished_at) VALUES "
                                "('redecode', 'done', %s, 'key:test', now(), now()) RETURNING job_id",
                                ([YINGTAN],)).fetchone()[0]

    def mqtt_account(self) -> None:
        with psycopg.connect(self.db_url) as conn:
            set_device_password(conn, YINGTAN_DEVICE)


@dataclass(frozen=True)
class Call:
    role: str
    path: dict[str, Any] | Callable[[World], dict[str, Any]] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    query: dict[str, Any] | None = None
    prepare: Callable[[World], None] | None = None
    scoped: int | None = None              # what a Nanchang key gets on this request (None: not a city object)
    scoped_query: dict[str, Any] | None = None
    whole_province: bool = False


TELEMETRY_RANGE = {"from": "2026-01-01T00:00:00+08:00", "to": "2026-01-02T00:00:00+08:00"}
CSV_YINGTAN = ("device_id,model,network,city,site_kind,site_name\n"
               "869975030000026,cjt188-nb-water-std,nbiot,Yingtan,residential,龙岗小区\n").encode()
SITES_CSV_YINGTAN = ("site_id,city,kind,name,aliases,model_site,model_site_since\n"
                     "JX-CO-0101,Yingtan,community,月湖示例社区,月湖社区,true,2024-06-01\n").encode()
YINGTAN_SITE = "JX-SS-0004"

DAYS = {"from": "2026-01-01", "to": "2026-01-08"}
HOURS = {"from": "2026-01-01T00:00:00+08:00", "to": "2026-01-01T06:00:00+08:00"}
# The figure routes (api/routes/water.py, fire.py, traffic.py, radio.py, health.py): each with a city filter.
FIGURES: dict[str, dict[str, str] | None] = {
    "/water/consumption": DAYS, "/water/consumption.csv": DAYS, "/water/consumption/districts": DAYS,
    "/water/consumption/districts.csv": DAYS, "/water/nights": None,
    "/water/silent-meters": None, "/water/silent-meters.csv": None, "/water/stopped-meters": None,
    "/water/stopped-meters.csv": None, "/fire/offline": None, "/fire/offline.csv": None,
    "/traffic/flow": HOURS, "/traffic/flow.csv": HOURS, "/traffic/parking": HOURS, "/traffic/parking.csv": HOURS,
    "/radio/summary": {"from": "2026-01-01T00:00:00+08:00"}, "/radio/summary.csv": {"from": "2026-01-01T00:00:00+08:00"},
    "/radio/report": HOURS, "/radio/weak.csv": HOURS, "/health/report": None, "/health/online.csv": None,
    "/health/uplink-success": HOURS, "/health/uplink-success.csv": HOURS}

CALLS: dict[tuple[str, str], Call] = {
    ("GET", "/metrics"): Call("viewer", whole_province=True, scoped=403),
    ("GET", "/openapi.json"): Call("viewer"),
    ("GET", "/docs"): Call("viewer"),
    ("POST", "/devices"): Call("admin", json={"device_id": "869975030000034", "city": "Yingtan", **DEVICE}, scoped=403),
    ("POST", "/devices/bulk"): Call("admin", content=CSV_YINGTAN, scoped=403),
    ("GET", "/devices/{device_id}"): Call("viewer", {"device_id": YINGTAN_DEVICE}, scoped=404),
    ("GET", "/devices"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/devices.csv"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("PATCH", "/devices/{device_id}"): Call("operator", {"device_id": YINGTAN_DEVICE}, json={"status": "inactive"},
                                            scoped=404),
    ("GET", "/cities"): Call("viewer"),
    ("PUT", "/devices/{device_id}/coap-token"): Call("admin", {"device_id": YINGTAN_DEVICE}, json={}, scoped=404),
    ("PUT", "/devices/{device_id}/mqtt-password"): Call("admin", {"device_id": YINGTAN_DEVICE}, json={}, scoped=404),
    ("DELETE", "/devices/{device_id}/mqtt-password"): Call("admin", {"device_id": YINGTAN_DEVICE},
                                                           prepare=World.mqtt_account, scoped=404),
    ("POST", "/devices/{device_id}/downlinks"): Call("operator", {"device_id": YINGTAN_DEVICE},
                                                     json={"kind": "valve_close"}, scoped=404),
    ("GET", "/devices/{device_id}/downlinks"): Call("viewer", {"device_id": YINGTAN_DEVICE}, scoped=404),
    ("GET", "/downlinks/{downlink_id}"): Call("viewer", lambda w: {"downlink_id": w.downlink_id}, scoped=404),
    ("POST", "/sites"): Call("admin", json={"site_id": "JX-FA-0101", "city": "Yingtan", "kind": "farm",
                                            "name": "示例农场", "aliases": ["鹰潭农场"]}, scoped=403),
    ("POST", "/sites/bulk"): Call("admin", content=SITES_CSV_YINGTAN, scoped=403),
    ("GET", "/sites"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/sites/{site_id}"): Call("viewer", {"site_id": YINGTAN_SITE}, scoped=404),
    ("GET", "/devices/{device_id}/telemetry"): Call("viewer", {"device_id": YINGTAN_DEVICE}, query=TELEMETRY_RANGE,
                                                   scoped=404),
    ("GET", "/sites/{site_id}/telemetry"): Call("viewer", {"site_id": YINGTAN_SITE}, query=TELEMETRY_RANGE, scoped=404),
    ("GET", "/coverage"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/reports/coverage"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/targets"): Call("viewer"),
    ("PUT", "/targets/{target_id}/progress"): Call("operator", {"target_id": "5g-base-stations"},
                                                   json={"value": 12}, scoped=404),
    ("GET", "/targets/{target_id}/progress"): Call("viewer", {"target_id": "5g-base-stations"}, scoped=404),
    ("GET", "/targets/{target_id}/history"): Call("viewer", {"target_id": "yingtan-water-nbiot"}, scoped=404),
    ("GET", "/coverage/snapshots"): Call("viewer"),
    ("POST", "/coverage/snapshots"): Call("admin", json={"day": str(date.today() - timedelta(days=2))},
                                          whole_province=True, scoped=403),
    ("GET", "/keys"): Call("admin"),
    ("POST", "/keys"): Call("admin", json={"role": "viewer", "cities": ["Yingtan"]}, scoped=403),
    ("DELETE", "/keys/{key_id}"): Call("admin", lambda w: {"key_id": w.spare_key()}, scoped=404),
    ("GET", "/audit"): Call("admin", whole_province=True, scoped=403),
    ("GET", "/alarms"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/alarms.csv"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/alarms/kpis"): Call("viewer", query={"since": "2026-01-01T00:00:00Z", "until": "2027-01-01T00:00:00Z"},
                                  scoped=403, scoped_query={"since": "2026-01-01T00:00:00Z",
                                                            "until": "2027-01-01T00:00:00Z", "city": YINGTAN}),
    ("GET", "/alarms/{alarm_id}"): Call("viewer", lambda w: {"alarm_id": w.alarm()}, scoped=404),
    ("POST", "/alarms/{alarm_id}/ack"): Call("operator", lambda w: {"alarm_id": w.alarm()}, scoped=404),
    ("POST", "/alarms/{alarm_id}/clear"): Call("operator", lambda w: {"alarm_id": w.alarm()},
                                               json={"false_alarm": True, "note": "test"}, scoped=404),
    ("GET", "/water/alerts"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/water/alerts.csv"): Call("viewer", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/rejects"): Call("viewer"),
    ("GET", "/rejects/{reject_id}"): Call("viewer", lambda w: {"reject_id": w.reject()}, scoped=404),
    ("POST", "/rejects/redecode"): Call("admin", json={"device": YINGTAN_DEVICE}),
    **{("GET", path): Call("viewer", query=query, scoped=403, scoped_query={**(query or {}), "city": YINGTAN})
       for path, query in FIGURES.items()},
    ("GET", "/water/sites/{site_id}/nights"): Call("viewer", {"site_id": YINGTAN_SITE}, query=DAYS, scoped=404),
    ("GET", "/water/sites/{site_id}/nights.csv"): Call("viewer", {"site_id": YINGTAN_SITE}, query=DAYS, scoped=404),
    ("GET", "/jobs"): Call("admin"),
    ("GET", "/jobs/{job_id}"): Call("admin", lambda w: {"job_id": w.job()}, scoped=404),
    ("GET", "/credentials"): Call("operator", scoped=403, scoped_query={"city": YINGTAN}),
    ("GET", "/devices/{device_id}/credentials"): Call("operator", {"device_id": YINGTAN_DEVICE}, scoped=404),
    ("GET", "/ready"): Call("viewer", whole_province=True, scoped=403),
    # last: it retires the device the other calls act on
    ("POST", "/devices/{device_id}/decommission"): Call("operator", {"device_id": YINGTAN_DEVICE}, scoped=404),
}


def _send(client: TestClient, method: str, template: str, call: Call, world: World, key: str | None,
          query: dict[str, Any] | None = None) -> Any:
    if call.prepare is not None:
        call.prepare(world)
    params = call.path(world) if callable(call.path) else call.path
    kwargs: dict[str, Any] = {"headers": bearer(key) if key else {}, "params": query or call.query}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.content is not None:
        kwargs["content"] = call.content
        kwargs["headers"] = {**kwargs["headers"], "content-type": "text/csv"}
    return client.request(method, template.format(**params), **kwargs)


@pytest.fixture
def world(settings, keys):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        w = World(settings.database_url, client)
        made = client.post("/devices", json={"device_id": YINGTAN_DEVICE, "city": "Yingtan", **DEVICE},
                           headers=bearer(keys.admin))
        assert made.status_code == 201, made.text
        with psycopg.connect(settings.database_url) as conn:
            set_device_token(conn, YINGTAN_DEVICE)
            import_sites(conn, [SiteRecord(YINGTAN_SITE, "Yingtan", "scenic_spot", "龙虎山风景名胜区", ("龙虎山",))])
        queued = client.post(f"/devices/{YINGTAN_DEVICE}/downlinks", json={"kind": "raw", "payload_hex": "a5"},
                             headers=bearer(keys.admin))
        w.downlink_id = queued.json()["id"]
        yield w


def _audit_rows(db_url: str, key: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT actor, key_id, method, route, target, change, status FROM audit_log "
                            "WHERE key_id = %s ORDER BY audit_id", (key_id(key),)).fetchall()


def test_every_route_refuses_the_wrong_callers_and_audits_its_writes(world, keys, settings):
    client = world.client
    routes = [(m, p) for m, p, _ in served_routes(client.app) if p not in OPEN_PATHS]
    assert sorted(routes) == sorted(CALLS), "each served route needs one request in CALLS (and no other)"
    for (method, template), call in CALLS.items():
        where = f"{method} {template}"
        no_key = _send(client, method, template, call, world, None)
        assert no_key.status_code == 401, where
        assert no_key.headers["content-type"] == "application/problem+json", where
        assert _send(client, method, template, call, world, keys.revoked).status_code == 401, where
        role = ROLES.index(call.role)
        if role > 0:
            low = getattr(keys, ROLES[role - 1])
            assert _send(client, method, template, call, world, low).status_code == 403, where
        if call.scoped is not None:
            scoped = _send(client, method, template, call, world, keys.scoped(call.role), call.scoped_query)
            assert scoped.status_code == call.scoped, (where, scoped.text)
        # The right key: a fresh one of exactly the role needed, so that its audit rows are this call's.
        right = insert_key(settings.database_url, call.role)
        answer = _send(client, method, template, call, world, right)
        assert 200 <= answer.status_code < 300, (where, answer.status_code, answer.text)
        rows = _audit_rows(settings.database_url, right)
        if method in WRITES:
            assert len(rows) == 1, (where, rows)
            actor, kid, row_method, route, target, change, status = rows[0]
            assert (actor, kid, row_method, route, status) == (f"key:{key_id(right)}", key_id(right), method,
                                                               template, answer.status_code), where
            assert isinstance(change, dict), where
            for secret in ("token", "password", "key"):      # what the answer showed once is not in the log
                if answer.headers.get("content-type", "").startswith("application/json") and secret in answer.json():
                    assert answer.json()[secret] not in str(change), where
        else:
            assert rows == [], where
    # The scoped keys never wrote anything: no audit row carries them.
    for role in ROLES:
        assert _audit_rows(settings.database_url, keys.scoped(role)) == []
