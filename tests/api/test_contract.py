"""The API's contract, held generically so that every route is covered, those added later included:
every error a problem document (`application/problem+json`) whose `type` is the stable URI of its kind,
the OpenAPI document typed throughout (one `Problem` schema for every error answer, no free-form
objects, no `HTTPValidationError`), CSV routes refusing other media types (415), a request rate per
key (429 + Retry-After), CORS off unless origins are configured, and one spelling of a city: `city`,
the integer division code, in inputs and outputs, with `city_name_zh` / `city_name_en` beside it.

The expected `type` URIs are written out here, not taken from api/problems.py: they are the contract
docs/api.md publishes."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.limits import TokenBucket
from tests.api.conftest import NANCHANG, YINGTAN
from tests.helpers import bearer

BASE = "https://iotjx.example/problems/"
PROBLEM_MEDIA = "application/problem+json"
DEVICE = {"device_id": "869975030000018", "model": "cjt188-nb-water-std", "network": "nbiot",
          "site_kind": "residential", "site_name": "龙岗小区"}
# Free-form JSON by design, each documented as such: an audit row's `change` (what the write changed,
# its shape the route's) and a downlink command's `params` (its codec's).  Nothing else may be.
FREE_FORM = {"/components/schemas/AuditOut/properties/change", "/components/schemas/DownlinkIn/properties/params",
             "/components/schemas/DownlinkOut/properties/params"}


def assert_problem(r, status: int, kind: str) -> dict[str, Any]:
    """`r` is a problem document of `status` whose type is BASE + kind; its body."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == PROBLEM_MEDIA, r.headers["content-type"]
    body = r.json()
    assert body["type"] == BASE + kind and body["status"] == status, body
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]        # text, never Starlette's {"detail": …} alone
    return body


@pytest.fixture
def app_with(settings):
    """A client of an app built with `settings` amended; keys are sent per request."""
    clients = []

    def make(**update) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def spec(admin_client) -> dict[str, Any]:
    return admin_client.get("/openapi.json").json()


def operations(spec: dict[str, Any]):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield method.upper(), path, operation


# ------------------------------------------------------------------ every error a problem document

def test_each_kind_of_error_has_its_own_stable_type(settings, keys, admin_client, anonymous):
    viewer = bearer(keys.viewer)
    nope = assert_problem(admin_client.get("/no/such/route"), 404, "no-route")
    assert "/no/such/route" in nope["detail"]
    assert_problem(anonymous.get("/no/such/route"), 401, "unauthorized")       # no route map for the anonymous
    not_allowed = admin_client.delete("/coverage")
    assert_problem(not_allowed, 405, "method-not-allowed")
    assert not_allowed.headers["allow"] == "GET"
    unauthorized = anonymous.get("/coverage")
    assert_problem(unauthorized, 401, "unauthorized")
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert_problem(anonymous.get("/coverage", headers=bearer(keys.revoked)), 401, "unauthorized")
    assert_problem(anonymous.post("/devices", json={**DEVICE, "city": YINGTAN}, headers=viewer), 403, "forbidden")
    assert_problem(admin_client.get("/devices/869975039999999"), 404, "not-found")
    measured = next(t["target_id"] for t in admin_client.get("/targets").json() if t["measure"] != "operator")
    assert_problem(admin_client.put(f"/targets/{measured}/progress", json={"value": 1}), 409, "conflict")
    assert_problem(admin_client.post("/devices", content=b"{" + b" " * (2 << 20) + b"}",
                                     headers={"content-type": "application/json"}), 413, "request-too-large")
    assert_problem(admin_client.post("/devices/bulk", json={"device_id": "1"}), 415, "unsupported-media-type")
    invalid = assert_problem(admin_client.post("/devices", json={**DEVICE, "model": "no-such-model"}), 422,
                             "invalid-request")
    assert [e["field"] for e in invalid["errors"]] == ["body.model"] and invalid["errors"][0]["error"]
    assert_problem(admin_client.get("/coverage", params={"asof": "2024-01-01"}), 422, "invalid-request")
    assert_problem(admin_client.get("/devices/%00"), 400, "bad-request")


def test_a_database_that_went_away_is_a_503_problem(settings, keys, admin_client):
    assert admin_client.get("/targets").status_code == 200         # the pool holds live connections now
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = 'iotjx-api' AND datname = current_database()")
    r = admin_client.get("/coverage/snapshots")
    body = assert_problem(r, 503, "unavailable")
    assert int(r.headers["retry-after"]) > 0 and "database" in body["title"]


def test_every_route_answers_its_errors_as_problems(spec, keys, admin_client, anonymous):
    """Walked from the OpenAPI document: no key → 401, an unknown query parameter → 422, a method the
    path does not take → 405 with Allow — each a problem document of its type, on every route."""
    paths: dict[str, set[str]] = {}
    for method, path, _ in operations(spec):
        paths.setdefault(path, set()).add(method)
    for path, methods in paths.items():
        concrete = re.sub(r"\{[^}]+\}", "869975030000018", path)
        for method in methods:
            if path != "/health":
                assert_problem(anonymous.request(method, concrete), 401, "unauthorized")
        if "GET" in methods:
            assert_problem(admin_client.get(concrete, params={"no_such_parameter": "1"}), 422, "invalid-request")
        missing = sorted({"GET", "POST", "PUT", "DELETE"} - methods)
        if missing:
            r = admin_client.request(missing[0], concrete)
            assert_problem(r, 405, "method-not-allowed")
            assert set(r.headers["allow"].replace(" ", "").split(",")) >= methods - {"HEAD"}, (path, r.headers["allow"])


def test_every_status_a_route_answers_is_in_its_operation(spec, keys, anonymous):
    """Every operation called bare (no body, a device id for every path parameter) by each kind of caller —
    none, a viewer, a viewer scoped to Nanchang, an admin — answers a status its operation documents."""
    callers = {"none": {}, "viewer": bearer(keys.viewer), "scoped": bearer(keys.nanchang_viewer),
               "admin": bearer(keys.admin)}
    seen = set()
    for method, path, operation in operations(spec):
        concrete = re.sub(r"\{[^}]+\}", "869975030000018", path)
        for who, headers in callers.items():
            if method != "GET" and who == "admin":
                continue                    # a bare write by an admin is only a 422: the viewer's 403 is the point
            r = anonymous.request(method, concrete, headers=headers)
            assert str(r.status_code) in operation["responses"], (method, path, who, r.status_code, r.text[:200])
            if r.status_code >= 400:
                assert r.headers["content-type"] == PROBLEM_MEDIA, (method, path, who)
            seen.add(r.status_code)
    assert {401, 403, 404} <= seen and any(200 <= s < 300 for s in seen)


# ------------------------------------------------------------------ the OpenAPI document

def _free_form(node: Any, where: str, out: list[str]) -> None:
    if isinstance(node, dict):
        if node.get("additionalProperties") is True or node == {} or (
                node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node):
            out.append(where)
        for k, v in node.items():
            _free_form(v, f"{where}/{k}", out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _free_form(v, f"{where}/{i}", out)


def test_every_error_response_is_documented_as_the_one_problem_schema(spec):
    assert "HTTPValidationError" not in json.dumps(spec) and "ValidationError" not in spec["components"]["schemas"]
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "errors"} <= set(problem["properties"])
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    checked = 0
    for method, path, operation in operations(spec):
        where = f"{method} {path}"
        assert operation.get("summary"), where
        responses = operation["responses"]
        everywhere = {"400", "422", "500"} if path == "/health" else {"400", "401", "413", "422", "429", "500", "503"}
        assert everywhere <= set(responses), (where, sorted(responses))
        if "text/csv" in operation.get("requestBody", {}).get("content", {}):
            assert "415" in responses, where
        for status, response in responses.items():
            if status == "204":
                assert "content" not in response, where
                continue
            assert response.get("content"), (where, status)
            for media, content in response["content"].items():
                assert content.get("schema"), (where, status, media)
            if status[0] in "45":
                assert response["content"] == {PROBLEM_MEDIA: {"schema": {"$ref": "#/components/schemas/Problem"}}}, \
                    (where, status)
                checked += 1
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (where, status)
    assert checked > 100


def test_no_schema_is_a_free_form_object(spec):
    found: list[str] = []
    _free_form(spec["paths"], "/paths", found)
    _free_form(spec["components"]["schemas"], "/components/schemas", found)
    assert set(found) <= FREE_FORM, sorted(set(found) - FREE_FORM)


def test_the_typed_answers_conform_to_their_schemas(settings, keys, admin_client, anonymous):
    """/health, /targets and /coverage's lists, answered by a real database, against the models the
    OpenAPI document describes (spot checks of shape; schemathesis walks every operation)."""
    health = admin_client.get("/health").json()
    assert set(health) == {"status", "version", "database", "gateways", "broker_connected", "queue_depth"}
    assert health["database"]["reachable"] is True and isinstance(health["database"]["schema_version"], int)
    assert anonymous.get("/health").json() in ({"status": "ok"}, {"status": "degraded"})
    targets = admin_client.get("/targets").json()
    assert targets and all(isinstance(t["sites"], list) and "value" in t for t in targets)
    with psycopg.connect(settings.database_url) as conn:
        days = [(d.isoformat(), h, n) for d, h, n in conn.execute(
            "SELECT day, how, devices FROM coverage_snapshot_days ORDER BY day DESC")]
    snapshots = admin_client.get("/coverage/snapshots").json()
    assert snapshots["count"] == len(days) and [(d["day"], d["how"], d["devices"]) for d in snapshots["days"]] == days


# ------------------------------------------------------------------ CSV routes take CSV

def test_csv_routes_refuse_other_media_types_and_write_nothing(settings, spec, admin_client):
    csv_routes = [(m, p) for m, p, op in operations(spec) if "text/csv" in op.get("requestBody", {}).get("content", {})]
    assert {("POST", "/devices/bulk"), ("POST", "/sites/bulk")} <= set(csv_routes)
    for method, path in csv_routes:
        for headers, content in ((None, None), ({"content-type": "application/json"}, b"device_id,model\n"),
                                 ({"content-type": "text/csv; charset=latin-1"}, b"device_id,model\n"),
                                 ({"content-type": "text/plain"}, b"device_id,model\n")):
            kwargs = {"json": {"device_id": "869975030000018"}} if content is None else {"content": content,
                                                                                         "headers": headers}
            body = assert_problem(admin_client.request(method, path, **kwargs), 415, "unsupported-media-type")
            assert "text/csv" in body["detail"]
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT (SELECT count(*) FROM devices) + (SELECT count(*) FROM sites)").fetchone()[0] == 0
    # text/csv, with or without charset=utf-8, reaches the import (its own 422: a header without records)
    for content_type in ("text/csv", "text/csv; charset=UTF-8"):
        r = admin_client.post("/devices/bulk", content=b"device_id,model\n", headers={"content-type": content_type})
        assert_problem(r, 422, "invalid-request")


# ------------------------------------------------------------------ rate limit per key

def test_a_key_past_its_burst_is_refused_with_retry_after(app_with, keys):
    # A rate so low that no token comes back during the test: the burst is all there is.
    client = app_with(api_rate_per_s=0.001, api_rate_burst=3)
    viewer, other = bearer(keys.viewer), bearer(keys.operator)
    assert [client.get("/targets", headers=viewer).status_code for _ in range(3)] == [200] * 3
    refused = client.get("/targets", headers=viewer)
    body = assert_problem(refused, 429, "rate-limited")
    assert int(refused.headers["retry-after"]) >= 1 and "3" in body["detail"]
    assert_problem(client.get("/coverage", headers=viewer), 429, "rate-limited")      # per key, not per route
    assert client.get("/targets", headers=other).status_code == 200                     # another key has its own
    assert [client.get("/health", headers=viewer).status_code for _ in range(5)] == [200] * 5   # /health exempt
    assert [client.get("/health").status_code for _ in range(5)] == [200] * 5
    assert_problem(client.get("/targets"), 401, "unauthorized")         # no key: refused before any bucket


def test_rate_zero_is_no_limit(app_with, keys):
    client = app_with(api_rate_per_s=0, api_rate_burst=1)
    assert {client.get("/targets", headers=bearer(keys.viewer)).status_code for _ in range(5)} == {200}


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)          # one token every 0.5 s
    assert bucket.take(100.25) == pytest.approx(0.25)        # half a token there: a quarter second to go
    assert bucket.take(100.5) == 0.0
    assert [bucket.take(1000.0) for _ in range(4)][-1] == pytest.approx(0.5)    # refilled to 3, not more


# ------------------------------------------------------------------ CORS

def _cors_headers(r) -> set[str]:
    return {h for h in r.headers if h.lower().startswith("access-control-")}


def test_cors_is_off_by_default(admin_client, keys):
    preflight = admin_client.options("/coverage", headers={"Origin": "https://grafana.example.org",
                                                           "Access-Control-Request-Method": "GET",
                                                           "Access-Control-Request-Headers": "authorization"})
    assert _cors_headers(preflight) == set()
    assert preflight.headers["content-type"] == PROBLEM_MEDIA
    got = admin_client.get("/coverage", headers={"Origin": "https://grafana.example.org"})
    assert got.status_code == 200 and _cors_headers(got) == set()


def test_cors_answers_the_configured_origins_only(app_with, keys):
    client = app_with(api_cors_origins="https://grafana.example.org, http://localhost:3000")
    ask = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    preflight = client.options("/coverage", headers={"Origin": "https://grafana.example.org", **ask})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://grafana.example.org"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    got = client.get("/coverage", headers={"Origin": "http://localhost:3000", **bearer(keys.viewer)})
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == "http://localhost:3000"
    refused = client.get("/coverage", headers={"Origin": "https://evil.example", **bearer(keys.viewer)})
    assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
    stranger = client.options("/coverage", headers={"Origin": "https://evil.example", **ask})
    assert_problem(stranger, 400, "cors-refused")
    assert "access-control-allow-origin" not in stranger.headers


def test_a_cors_origin_that_is_not_an_origin_stops_the_start(settings):
    for bad in ("grafana.example.org", "https://grafana.example.org/dashboards", "ftp://x.example"):
        with pytest.raises(ValueError, match="not an origin"):
            settings.model_validate({**settings.model_dump(), "api_cors_origins": bad})


# ------------------------------------------------------------------ one spelling of a city

def test_city_is_the_integer_code_everywhere_in_the_document(spec):
    allowed = {"city", "cities", "city_name_zh", "city_name_en"}
    for name, schema in spec["components"]["schemas"].items():
        for prop, sub in schema.get("properties", {}).items():
            if prop.startswith("city"):
                assert prop in allowed, (name, prop)
            if prop == "city":
                types = {s.get("type") for s in sub.get("anyOf", [sub])}
                assert "integer" in types, (name, sub)
    for method, path, operation in operations(spec):
        for param in operation.get("parameters", []):
            if param["name"] == "city":
                schema = param["schema"]
                assert {s.get("type") for s in schema.get("anyOf", [schema])} <= {"integer", "null"}, (method, path)


def test_a_city_that_does_not_exist_is_refused_on_every_route_that_takes_one(spec, admin_client):
    taking = [(m, p) for m, p, op in operations(spec) if m == "GET" and "{" not in p
              and any(q["name"] == "city" for q in op.get("parameters", []))]
    assert ("GET", "/coverage") in taking and ("GET", "/sites") in taking
    for _, path in taking:
        body = admin_client.get(path, params={"city": 999999}).json()
        assert body["status"] in (404, 422) and body["type"] in (BASE + "not-found", BASE + "invalid-request"), path
        assert "999999" in json.dumps(body, ensure_ascii=False), path


def test_city_names_ride_beside_the_code_as_the_cities_table_has_them(settings, admin_client, keys):
    assert admin_client.post("/devices", json={**DEVICE, "city": YINGTAN}).status_code == 201    # the code, as an int
    other = {**DEVICE, "device_id": "869975030000026", "city": str(NANCHANG)}
    assert admin_client.post("/devices", json=other).status_code == 201
    with psycopg.connect(settings.database_url) as conn:
        names = {c: (zh, en) for c, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities")}
    breakdown = admin_client.get("/coverage").json()["breakdown"]
    assert {r["city"] for r in breakdown} == {YINGTAN, NANCHANG}
    for row in breakdown:
        assert (row["city_name_zh"], row["city_name_en"]) == names[row["city"]]
        assert not {"city_zh", "city_en", "city_name"} & set(row)
    for row in admin_client.get("/coverage").json()["targets"] + admin_client.get("/targets").json():
        expected = names[row["city"]] if row["city"] else (None, None)
        assert (row["city_name_zh"], row["city_name_en"]) == expected, row["target_id"]
    scoped = admin_client.get("/coverage", headers=bearer(keys.nanchang_viewer)).json()["breakdown"]
    assert {r["city"] for r in scoped} == {NANCHANG}
    assert_problem(admin_client.post("/devices", json={**DEVICE, "city": 999999}), 422, "invalid-request")
