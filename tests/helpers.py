"""Small helpers the tests share: a registered fleet, waiting on the database."""

from __future__ import annotations

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
