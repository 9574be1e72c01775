"""GET /ready: 200 when every check passes; a 503 `not-ready` problem naming what is not (a schema behind
the code, a stopped job runner, an exhausted pool); only a key without a city scope; /health stays open."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from api.app import create_app
from api.routes.system import _checks
from iotjx.db.migrations import MIGRATIONS
from tests.helpers import bearer

CHECKS = ["pool", "database", "schema", "catalogue", "jobs"]


def _not_ready(r) -> dict:
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["type"].endswith("/not-ready") and [c["name"] for c in body["checks"]] == CHECKS
    return {c["name"]: c for c in body["checks"]}


def test_ready_when_everything_is_and_only_for_a_whole_province_key(settings, keys, anonymous):
    r = anonymous.get("/ready", headers=bearer(keys.viewer))
    assert r.status_code == 200, r.text
    assert r.json()["ready"] is True and [c["name"] for c in r.json()["checks"]] == CHECKS
    assert all(c["ready"] for c in r.json()["checks"])
    assert anonymous.get("/ready").status_code == 401
    assert anonymous.get("/ready", headers=bearer(keys.nanchang_admin)).status_code == 403
    assert anonymous.get("/health").status_code == 200          # the open probe is unchanged while up


def test_a_schema_behind_the_code_is_not_ready(settings, keys, anonymous):
    head = MIGRATIONS[-1].version
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (head,))
    checks = _not_ready(anonymous.get("/ready", headers=bearer(keys.viewer)))
    assert not checks["schema"]["ready"] and f"at migration {head - 1}" in checks["schema"]["detail"]
    assert [n for n, c in checks.items() if not c["ready"]] == ["schema"]


def test_a_stopped_job_runner_is_not_ready(settings, keys):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.app.state.jobs.stop()
        checks = _not_ready(client.get("/ready", headers=bearer(keys.admin)))
    assert [n for n, c in checks.items() if not c["ready"]] == ["jobs"]


def test_an_exhausted_pool_is_not_ready(settings):
    """A real pool of one connection, held: exhausted; the database is still checked on its own connection."""
    app = SimpleNamespace(state=SimpleNamespace(catalogue=[object()], jobs=SimpleNamespace(running=True)))
    with ConnectionPool(settings.database_url, min_size=1, max_size=1) as pool:
        pool.wait()
        free = {c.name: c.ready for c in _checks(SimpleNamespace(app=app), pool, settings)}
        with pool.connection():
            held = {c.name: c.ready for c in _checks(SimpleNamespace(app=app), pool, settings)}
    assert free == dict.fromkeys(CHECKS, True)
    assert held == {**free, "pool": False}
