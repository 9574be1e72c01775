"""Small helpers the tests share: a registered fleet, waiting on the database, API keys."""

from __future__ import annotations

import hashlib
import secrets
import time

import psycopg

from iotjx.devices import register_devices
from simulators.fleet import plan_water_fleet


def register_fleet(db_url: str, n: int, seed: int = 0, **kwargs):
    fleet = plan_water_fleet(n, seed, **kwargs)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [d.record for d in fleet])
    return fleet


def wait_for_count(db_url: str, sql: str, expected: int, timeout: float = 60.0) -> int:
    """Poll `sql` (a count) until it reaches `expected` or the timeout passes; returns the last count."""
    deadline = time.monotonic() + timeout
    count = -1
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            count = conn.execute(sql).fetchone()[0]
            if count >= expected:
                return count
            time.sleep(0.1)
    return count


def insert_key(db_url: str, role: str, cities: list[int] | None = None, revoked: bool = False) -> str:
    """An API key stored as README.md describes (`iotjx.<key_id>.<secret>`, SHA-256 of the secret),
    made here rather than by iotjx.apikeys; returns the whole key."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    with psycopg.connect(db_url) as conn:
        conn.execute("""INSERT INTO api_keys (key_id, name, role, cities, secret_hash, revoked_at)
                        VALUES (%s, 'test', %s, %s, %s, CASE WHEN %s THEN now() END)""",
                     (key_id, role, cities, hashlib.sha256(secret.encode()).digest(), revoked))
    return f"iotjx.{key_id}.{secret}"


def bearer(key: str) -> dict[str, str]:
    """The header that carries an API key."""
    return {"Authorization": f"Bearer {key}"}


def walk_pages(client, path: str, key: str, params: dict | None = None, *, max_pages: int = 1000) -> list[dict]:
    """Every item of a cursor-paginated list (api/pagination.py), page by page, following `next_cursor`
    as given; each page must be a 200, and the last page must come within `max_pages`."""
    items, cursor = [], None
    for _ in range(max_pages):
        answer = client.get(path, params={**(params or {}), **({"cursor": cursor} if cursor else {})},
                            headers=bearer(key))
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        items += answer.json()["items"]
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError(f"{path}: no last page within {max_pages} pages")


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; its last answer (a test asserts it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def store_uplinks(db_url: str, uplinks) -> dict[str, int]:
    """Store uplinks through the real write path (registry, pipeline, writer); the pipeline's counters.
    Its connections are closed after."""
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer
    from iotjx.db import connect

    registry, writer = DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))
    try:
        pipeline = Pipeline(registry, writer)
        pipeline.process(uplinks)
        return dict(pipeline.counters)
    finally:
        writer.close()
        registry.close()
