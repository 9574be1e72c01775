"""Migrations on the real PostgreSQL: idempotent, safe under concurrent start-ups, and the plain
PostgreSQL storage (native range partitions by UTC day, created ahead, old raw-log days dropped).

Expected partitions and bounds are computed here from the calendar, not read back from the code."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from iotjx.db.migrations import LOCK_ID, MIGRATIONS, TIME_TABLES, drop_expired_partitions, ensure_partitions, upgrade

from . import SCHEMA_SNAPSHOT_SQL

VERSIONS = [m.version for m in MIGRATIONS]


def _today() -> date:
    return datetime.now(UTC).date()


def _on_one_day(action: Callable[[], object]) -> tuple[date, object]:
    """`action()` and the UTC day it ran on; a run that crosses midnight is run again, since the
    partitions made ahead depend on the day."""
    while True:
        day = _today()
        result = action()
        if _today() == day:
            return day, result


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


@contextmanager
def _empty_database(pg_admin_url: str) -> Iterator[str]:
    name = f"iotjx_m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**info)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db(pg_admin_url) -> Iterator[str]:
    with _empty_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def plain_postgresql(pg_admin_url) -> None:
    """These tests are about the storage used where TimescaleDB is absent (test_timescale_ddl covers it)."""
    with psycopg.connect(pg_admin_url) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            pytest.skip("this server offers timescaledb, so the schema would not use native partitions")


def _snapshot(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(SCHEMA_SNAPSHOT_SQL).fetchall()


def _dump(url: str) -> str | None:
    """pg_dump's view of the schema, when a pg_dump of the server's major version is at hand."""
    pg_dump = shutil.which("pg_dump")
    if not pg_dump:
        return None
    with psycopg.connect(url) as conn:
        server_major = conn.info.server_version // 10000
    client = subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout.split()[-1]
    if int(client.split(".")[0]) != server_major:
        return None
    text = subprocess.run([pg_dump, "--schema-only", "--no-owner", "--dbname", url],
                          capture_output=True, text=True, check=True).stdout
    # Recent minor releases fence the script with a random \restrict key: not part of the schema.
    return "\n".join(line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def _partitions(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """Partition name -> its bound, rendered in UTC."""
    conn.execute("SET TimeZone = 'UTC'")
    return dict(conn.execute("""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass""", (table,)).fetchall())


def _day_partitions(table: str, days) -> dict[str, str]:
    return {f"{table}_p{d:%Y%m%d}": f"FOR VALUES FROM ('{d} 00:00:00+00') TO ('{d + timedelta(days=1)} 00:00:00+00')"
            for d in days}


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=k) for k in range((last - first).days + 1)]


def test_a_second_upgrade_applies_nothing_and_leaves_the_schema_identical(empty_db):
    first = upgrade(empty_db)
    assert first["applied"] == VERSIONS and first["version"] == VERSIONS[-1]

    def again():
        before = (_snapshot(empty_db), _dump(empty_db))
        return before, upgrade(empty_db), (_snapshot(empty_db), _dump(empty_db))

    _, (before, second, after) = _on_one_day(again)
    assert second == {**first, "applied": []}
    assert after[0] == before[0]
    assert after[1] == before[1]


def test_every_migration_applied_again_changes_nothing(db_url):
    before = _snapshot(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        timescale = conn.execute("SELECT value FROM iotjx_meta WHERE key = 'storage'").fetchone()[0] == "timescaledb"
        for m in MIGRATIONS:
            with conn.transaction():
                m.apply(conn, timescale)
    assert _snapshot(db_url) == before


def _waiting_for_the_migration_lock(conn: psycopg.Connection) -> int:
    return conn.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND ((classid::bigint << 32) | objid::bigint) = %s""", (LOCK_ID,)).fetchone()[0]


def test_concurrent_start_ups_both_succeed_and_apply_each_migration_once(empty_db, pg_admin_url):
    results: dict[str, object] = {}

    def start_up(name: str) -> None:
        try:
            results[name] = upgrade(empty_db)
        except BaseException as exc:   # noqa: BLE001 - reported by the assertion below
            results[name] = exc

    # Hold the lock until both start-ups wait on it, so that they really race when it is released.
    with psycopg.connect(empty_db, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        threads = [threading.Thread(target=start_up, args=(n,), name=f"upgrade-{n}") for n in ("a", "b")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _waiting_for_the_migration_lock(gate) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_for_the_migration_lock(gate) == 2, "both start-ups should be waiting for the lock"
        gate.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
        for t in threads:
            t.join(120)
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert sorted(results["a"]["applied"] + results["b"]["applied"]) == VERSIONS
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [(v,) for v in VERSIONS]
        assert conn.execute("SELECT count(*) FROM iotjx_meta WHERE key = 'storage'").fetchone()[0] == 1
    # And the raced schema is the one a single start-up makes.
    with _empty_database(pg_admin_url) as alone:
        def both() -> tuple[list, list]:
            upgrade(alone)
            return _snapshot(empty_db), _snapshot(alone)

        _, (raced, single) = _on_one_day(both)
        assert raced == single


def test_storage_is_recorded_as_postgresql_with_range_partitioned_time_tables(db_url, plain_postgresql):
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT value FROM iotjx_meta WHERE key = 'storage'").fetchall() == [("postgresql",)]
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone()[0] == 0
        keys = conn.execute("""
            SELECT c.relname, p.partstrat::text, a.attname FROM pg_partitioned_table p
              JOIN pg_class c ON c.oid = p.partrelid
              JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]""").fetchall()
    assert sorted(keys) == sorted((t, "r", col) for t, col in TIME_TABLES.items())


def test_daily_partitions_exist_from_yesterday_to_a_week_ahead(empty_db, plain_postgresql):
    today, summary = _on_one_day(lambda: upgrade(empty_db))
    assert summary["storage"] == "postgresql"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for table in TIME_TABLES:
            assert _partitions(conn, table) == _day_partitions(table, _days(today - timedelta(days=1),
                                                                            today + timedelta(days=7))), table


def test_ensure_partitions_makes_a_far_future_day_on_demand_and_its_rows_land_there(db_url, plain_postgresql):
    far = _today() + timedelta(days=400)
    part = f"water_readings_p{far:%Y%m%d}"
    insert = ("INSERT INTO water_readings (time, device_id, transport) VALUES (%s, 'far-meter', 'mqtt') "
              "RETURNING tableoid::regclass::text")
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):
            conn.execute(insert, (_midnight(far) + timedelta(hours=12),))
        assert ensure_partitions(conn, far, far) == len(TIME_TABLES)
        assert ensure_partitions(conn, far, far) == 0
        for table in TIME_TABLES:
            assert _day_partitions(table, [far]).items() <= _partitions(conn, table).items()
        first, last = _midnight(far), _midnight(far) + timedelta(days=1, microseconds=-1)
        assert conn.execute(insert, (first,)).fetchone()[0] == part
        assert conn.execute(insert, (last,)).fetchone()[0] == part
        # Days are UTC days whatever the session's zone: 07:59 in Nanchang the next day is still `far`.
        conn.execute("SET TimeZone = 'Asia/Shanghai'")
        local = f"{far + timedelta(days=1)} 07:59:59+08"
        assert conn.execute(insert.replace("%s", "%s::timestamptz"), (local,)).fetchone()[0] == part
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, (_midnight(far + timedelta(days=1)),))
        assert conn.execute("SELECT count(*) FROM water_readings WHERE device_id = 'far-meter'").fetchone()[0] == 3


def test_drop_expired_partitions_drops_only_raw_log_days_before_the_window(db_url, plain_postgresql):
    def drop_old():
        today = _today()
        with psycopg.connect(db_url, autocommit=True) as conn:
            ensure_partitions(conn, today - timedelta(days=40), today - timedelta(days=20))
            held = sorted(datetime.strptime(name[-8:], "%Y%m%d").date() for name in _partitions(conn, "raw_uplinks"))
            conn.cursor().executemany(
                "INSERT INTO raw_uplinks (received_at, device_id, transport, payload, outcome) "
                "VALUES (%s, %s, 'mqtt', '\\x68'::bytea, 'stored')",
                [(_midnight(d) + timedelta(hours=6), f"raw-{d}") for d in held])
            dropped = drop_expired_partitions(conn, 30)
            again = drop_expired_partitions(conn, 30)
            return (held, dropped, again, _partitions(conn, "raw_uplinks"), _partitions(conn, "water_readings"),
                    sorted(r[0] for r in conn.execute("SELECT device_id FROM raw_uplinks")))

    today, (held, dropped, again, raw_left, water_left, rows_left) = _on_one_day(drop_old)
    keep_from = today - timedelta(days=30)
    kept = [d for d in held if d >= keep_from]
    assert held[0] == today - timedelta(days=40)
    assert (dropped, again) == (len(held) - len(kept), 0) and dropped == 10     # days -40 .. -31
    assert raw_left == _day_partitions("raw_uplinks", kept)
    assert rows_left == sorted(f"raw-{d}" for d in kept)
    # Retention is for the raw log only: the readings keep every day.
    assert _day_partitions("water_readings", _days(today - timedelta(days=40), today - timedelta(days=20))).items() \
        <= water_left.items()


def test_migration_14_jobs_hold_their_states_and_ends(db_url):
    """The jobs table refuses a state or kind it does not know, an ended job without its end time, a
    running one without its start; and the lists' and the credential listing's indexes exist."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        ok = conn.execute("INSERT INTO jobs (kind, actor) VALUES ('redecode', 'key:x') "
                          "RETURNING state, examined, stored, still_rejected, cities, finished_at").fetchone()
        assert ok == ("queued", 0, 0, {}, None, None)
        for values in ("'redecode', 'paused', NULL, NULL", "'rebuild', 'queued', NULL, NULL",
                       "'redecode', 'done', now(), NULL", "'redecode', 'failed', now(), NULL",
                       "'redecode', 'running', NULL, NULL", "'redecode', 'queued', NULL, now()"):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(f"INSERT INTO jobs (kind, state, started_at, finished_at, actor) VALUES ({values}, 'key:x')")
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename IN ('jobs', 'audit_log')")}
        assert {"jobs_page", "jobs_open", "audit_log_target"} <= indexes


# Independent reference for migration 15: per city, how many county-level divisions the Ministry of Civil
# Affairs' 2023 list gives (districts, county-level cities, counties), and a few codes by name.
JIANGXI_DIVISIONS = {360100: 9, 360200: 4, 360300: 5, 360400: 13, 360500: 2, 360600: 3, 360700: 18, 360800: 13,
                     360900: 10, 361000: 11, 361100: 12}


def test_migration_15_districts_belong_to_their_cities_and_sites_to_theirs(db_url):
    """Jiangxi's 100 county-level divisions, each in the city its code names; a site's district must
    be a known one of the site's own city; NULL (unknown) is allowed."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        per_city = dict(conn.execute("SELECT city_code, count(*) FROM districts GROUP BY 1").fetchall())
        assert per_city == JIANGXI_DIVISIONS and sum(per_city.values()) == 100
        assert conn.execute("SELECT count(*) FROM districts WHERE name_zh LIKE '%区'").fetchone()[0] == 27
        assert conn.execute("SELECT count(*) FROM districts WHERE name_zh LIKE '%市'").fetchone()[0] == 12
        assert conn.execute("SELECT count(*) FROM districts WHERE name_zh LIKE '%县'").fetchone()[0] == 61
        named = dict(conn.execute("SELECT name_zh, code FROM districts WHERE name_zh = ANY(%s)",
                                  (["东湖区", "红谷滩区", "濂溪区", "庐山市", "龙南市", "广信区", "婺源县"],)).fetchall())
        assert named == {"东湖区": 360102, "红谷滩区": 360113, "濂溪区": 360402, "庐山市": 360483, "龙南市": 360783,
                         "广信区": 361104, "婺源县": 361130}
        site = conn.execute("INSERT INTO sites (city_code, kind, name, code, district_code) "
                            "VALUES (360100, 'community', 'm15 site', 'M15-1', 360102) RETURNING site_id").fetchone()[0]
        conn.execute("UPDATE sites SET district_code = NULL WHERE site_id = %s", (site,))
        with pytest.raises(psycopg.errors.CheckViolation):      # 昌江区 is Jingdezhen's
            conn.execute("UPDATE sites SET district_code = 360202 WHERE site_id = %s", (site,))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # no such division
            conn.execute("UPDATE sites SET district_code = 360199 WHERE site_id = %s", (site,))
        with pytest.raises(psycopg.errors.CheckViolation):      # a district whose code is not its city's
            conn.execute("INSERT INTO districts VALUES (360199, 'x', 'x', 360200)")
