"""Background jobs (api/jobs.py, /jobs): one re-decode at a time per city scope (409 naming the job), a
job whose runner is gone marked failed (at start and while running), a job that raises marked failed
with its error while the runner goes on, the list newest first against a plain SQL walk, city scope.

A job "running elsewhere" is a jobs row in state running whose advisory lock a test connection holds,
as a runner of another API process does."""

from __future__ import annotations

import time

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.jobs import INTERRUPTED, JOB_LOCK
from tests.api.conftest import NANCHANG, YINGTAN, key_id
from tests.helpers import bearer, walk_pages


def _wait(client: TestClient, key: str, job_id: int, states: tuple[str, ...] = ("done", "failed")) -> dict:
    for _ in range(1200):
        job = client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert job.status_code == 200, job.text
        if job.json()["state"] in states:
            return job.json()
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {job.json()}")


def _running_job(db_url: str, cities: list[int] | None, **counts) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("INSERT INTO jobs (kind, state, cities, actor, started_at, examined, stored) "
                            "VALUES ('redecode', 'running', %s, 'key:elsewhere', now(), %s, %s) RETURNING job_id",
                            (cities, counts.get("examined", 0), counts.get("stored", 0))).fetchone()[0]


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_one_redecode_at_a_time_per_city_scope(settings, keys, client):
    db_url = settings.database_url
    held = _running_job(db_url, [YINGTAN])
    with psycopg.connect(db_url, autocommit=True) as runner_elsewhere:
        runner_elsewhere.execute("SELECT pg_advisory_lock(%s, %s)", (JOB_LOCK, held))
        # Nanchang's scope does not overlap Yingtan's: it runs.
        ok = client.post("/rejects/redecode", json={}, headers=bearer(keys.nanchang_admin))
        assert ok.status_code == 202, ok.text
        assert _wait(client, keys.nanchang_admin, ok.json()["job_id"])["state"] == "done"
        # The whole province covers Yingtan: refused, naming the running job.
        clash = client.post("/rejects/redecode", json={"reason": "unsupported"}, headers=bearer(keys.admin))
        assert clash.status_code == 409 and clash.headers["content-type"] == "application/problem+json"
        body = clash.json()
        assert body["type"].endswith("/conflict") and body["job_id"] == held and f"/jobs/{held}" in body["detail"]
        # Still running: its lock is held, so no runner marks it failed (the API's own runner sweeps meanwhile).
        client.app.state.jobs.wake()
        time.sleep(0.5)
        assert client.get(f"/jobs/{held}", headers=bearer(keys.admin)).json()["state"] == "running"
    # Its runner gone (the lock went with its connection): marked failed, then a re-decode may start.
    gone = _wait(client, keys.admin, held)
    assert (gone["state"], gone["error"]) == ("failed", INTERRUPTED) and gone["finished_at"] is not None
    again = client.post("/rejects/redecode", json={}, headers=bearer(keys.admin))
    assert again.status_code == 202, again.text
    assert _wait(client, keys.admin, again.json()["job_id"])["state"] == "done"
    with psycopg.connect(db_url) as conn:
        refused = conn.execute("SELECT count(*) FROM audit_log WHERE route = '/rejects/redecode'").fetchone()[0]
        states = conn.execute("SELECT state, count(*) FROM jobs GROUP BY 1 ORDER BY 1").fetchall()
    assert refused == 2                         # the 409 wrote nothing
    assert states == [("done", 2), ("failed", 1)]


def test_a_job_interrupted_by_a_restart_is_marked_failed_at_start(settings, keys):
    db_url = settings.database_url
    orphan = _running_job(db_url, None, examined=1500, stored=1200)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        job = _wait(client, keys.admin, orphan)
    assert (job["state"], job["error"]) == ("failed", INTERRUPTED)
    assert (job["examined"], job["stored"]) == (1500, 1200)         # what it committed is kept


def test_a_job_that_raises_fails_with_its_error_and_the_runner_goes_on(settings, keys, client):
    with psycopg.connect(settings.database_url) as conn:
        # No actor: ingest.redecode refuses to run without one (what the API always gives).
        bad = conn.execute("INSERT INTO jobs (kind, actor) VALUES ('redecode', '') RETURNING job_id").fetchone()[0]
    client.app.state.jobs.wake()
    job = _wait(client, keys.admin, bad)
    assert job["state"] == "failed" and job["error"] == "redecode needs an actor (who asked for it)"
    after = client.post("/rejects/redecode", json={}, headers=bearer(keys.admin))
    assert after.status_code == 202
    assert _wait(client, keys.admin, after.json()["job_id"])["state"] == "done"


def test_the_list_pages_newest_first_filters_and_keeps_to_the_key_s_cities(settings, keys, client):
    db_url = settings.database_url
    with psycopg.connect(db_url) as conn:
        for k, cities in enumerate([None, [NANCHANG], [YINGTAN], [NANCHANG, YINGTAN], [NANCHANG], None]):
            conn.execute("INSERT INTO jobs (kind, state, cities, actor, created_at, started_at, finished_at) "
                         "VALUES ('redecode', %s, %s, 'key:test', now() - make_interval(mins => %s), now(), now())",
                         ("done" if k % 2 else "failed", cities, 60 - k))

    def walk(key: str, params: dict) -> list[int]:
        return [j["job_id"] for j in walk_pages(client, "/jobs", key, params, max_pages=50)]

    def sql(where: str) -> list[int]:
        with psycopg.connect(db_url) as conn:
            return [r[0] for r in conn.execute(f"SELECT job_id FROM jobs WHERE {where} "
                                               "ORDER BY created_at DESC, job_id DESC").fetchall()]

    assert walk(keys.admin, {"limit": 2}) == sql("true")
    assert walk(keys.admin, {"state": "failed", "limit": 1}) == sql("state = 'failed'")
    assert walk(keys.nanchang_admin, {"limit": 1}) == sql(f"cities <@ ARRAY[{NANCHANG}]")
    assert len(walk(keys.nanchang_admin, {})) == 2
    for bad in ({"state": "lost"}, {"kind": "rebuild"}, {"cursor": "bm90LWEtY3Vyc29y"}, {"limit": 0}, {"colour": 1}):
        r = client.get("/jobs", params=bad, headers=bearer(keys.admin))
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", bad
    assert client.get("/jobs/999999", headers=bearer(keys.admin)).status_code == 404
    assert client.get("/jobs", headers=bearer(keys.operator)).status_code == 403
    assert key_id(keys.admin)                   # the keys fixture made the keys this test uses


def test_a_job_stopped_by_the_shutdown_is_failed_with_what_it_committed(settings):
    """The runner asked to stop ends the job after the chunk it is in (its rows committed, counted)."""
    from api.jobs import SHUT_DOWN, JobRunner
    from iotjx.db import connect

    db_url = settings.database_url
    with psycopg.connect(db_url) as conn:
        for k in range(3):                     # an unknown device's frames: examined, still rejected
            conn.execute("INSERT INTO rejected_uplinks (received_at, device_id, transport, payload, reason) "
                         "VALUES (now(), '869975036000019', 'mqtt', %s, 'unknown_device')", (bytes([0x68, k]),))
        job_id = conn.execute("INSERT INTO jobs (kind, actor) VALUES ('redecode', 'key:test') RETURNING job_id"
                              ).fetchone()[0]
    runner = JobRunner(db_url, lambda: None)
    runner._stop.set()                         # as stop() does, without a thread: run_one is called here
    with connect(db_url, autocommit=True) as conn:
        assert runner.run_one(conn) is True
        assert runner.run_one(conn) is False   # nothing else queued
    with psycopg.connect(db_url) as conn:
        state, error, examined, stored, still, finished = conn.execute(
            "SELECT state, error, examined, stored, still_rejected, finished_at FROM jobs WHERE job_id = %s",
            (job_id,)).fetchone()
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                            (job_id,)).fetchone()[0]
    assert (state, error, examined, stored, still) == ("failed", SHUT_DOWN, 3, 0, {"unknown_device": 3})
    assert finished is not None and held == 0   # its lock let go
