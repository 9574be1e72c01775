"""SQL injection and oversize attempts on every text parameter of every operation (issue 14): each is
refused (a 4xx problem document) or harmless (a 2xx that matches nothing), never a 5xx; afterwards the
schema and the rows are what they were.  The parameters come from the served OpenAPI document, so an
operation added later is walked too."""

from __future__ import annotations

import re
from urllib.parse import quote

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import bearer, insert_key

PAYLOADS = ("x' OR '1'='1", "1; DROP TABLE devices; --", "x\" OR \"\"=\"", "%' OR 1=1 --", "') OR true --",
            "x' UNION SELECT secret_hash, NULL FROM api_keys --", "%", "_",   # LIKE patterns match nothing either
            "A" * 16_000)
DEVICES = [{"device_id": f"86997503000{n:04d}", "model": "cjt188-nb-water-std", "city": "Yingtan",
            "site_kind": "residential", "site_name": "龙岗小区"} for n in range(3)]


def _state(db_url: str) -> tuple:
    """What an injection would change: the tables, and the rows of those holding devices, keys and sites."""
    with psycopg.connect(db_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()
        rows = conn.execute("""SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM api_keys WHERE revoked_at IS NULL),
                                      (SELECT count(*) FROM sites), (SELECT count(*) FROM device_models)""").fetchone()
    return tables, rows


def _string_params(spec: dict) -> list[tuple[str, str, str, str]]:
    """(method, path, where, name) of every string parameter of every operation (query and path)."""
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for p in op.get("parameters", []):
                schema = p.get("schema", {})
                kinds = {schema.get("type")} | {s.get("type") for s in schema.get("anyOf", [])}
                if "string" in kinds:
                    out.append((method.upper(), path, p["in"], p["name"]))
    return out


def test_injection_and_oversize_on_every_text_parameter_are_refused_or_harmless(settings, caplog):
    admin = insert_key(settings.database_url, "admin")
    with TestClient(create_app(settings), headers=bearer(admin), raise_server_exceptions=False) as client:
        for body in DEVICES:
            assert client.post("/devices", json=body).status_code == 201
        spec = client.get("/openapi.json").json()
        params = _string_params(spec)
        assert len({(m, p) for m, p, _, _ in params}) >= 30        # the walk reaches the API, not a few routes
        before = _state(settings.database_url)
        served = 0
        for method, path, where, name in params:
            for payload in PAYLOADS:
                query, url = {}, path
                if where == "path":
                    url = path.replace("{" + name + "}", quote(payload[:2000], safe=""))
                else:
                    query[name] = payload
                # other path parameters: a device that exists, so the text parameter is what is judged
                url = re.sub(r"\{device_id\}", DEVICES[0]["device_id"], url)
                url = re.sub(r"\{[a-z_]+\}", "1", url)
                r = client.request(method, url, params=query)
                assert r.status_code < 500, (method, path, name, payload[:40], r.status_code, r.text[:300])
                if r.status_code >= 400:
                    assert r.headers["content-type"].startswith("application/problem+json"), (method, path, name)
                elif r.headers["content-type"].startswith("application/json") and method == "GET":
                    served += 1
                    items = r.json().get("items") if isinstance(r.json(), dict) else None
                    # a filter that is an injection matches nothing; it never widens a list
                    if where == "query" and items is not None:
                        assert items == [], (path, name, payload[:40], items[:2])
        assert _state(settings.database_url) == before
        assert served > 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
