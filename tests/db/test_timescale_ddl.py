"""The TimescaleDB branch of the migrations, run by a real TimescaleDB engine.

TimescaleDB cannot be installed on these machines; PGlite + TimescaleDB 2.23 (WebAssembly, the npm
package in tests/db/pglite/, under Node) can run it.  `upgrade()` itself runs against that engine,
its `psycopg.connect` redirected to an `EngineConnection` (tests/db/pglite/engine.py): the choice of
storage, the hypertables, compression, the policies, the retention statements issued at every
start-up and the re-runs all meet TimescaleDB's own checks, and the policies' jobs are run to see
them act.  The write path (COPY) is not checked here: see TIMESCALE.md."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from iotjx.db import migrations
from iotjx.db.migrations import MIGRATIONS, ROLLUP_TABLES, TIME_TABLES

from . import SCHEMA_SNAPSHOT_SQL
from .pglite.engine import Engine, EngineConnection, node_ready

VERSIONS = [m.version for m in MIGRATIONS]
ENGINE_URL = "postgresql://pglite-timescaledb/in-process"      # never dialled: connect() is redirected


@pytest.fixture(scope="module")
def quoting(pg_admin_url) -> Iterator[psycopg.Connection]:
    """A real PostgreSQL connection, used only for psycopg's client-side quoting of parameters."""
    reason = node_ready()
    if reason:
        pytest.skip(reason)
    with psycopg.connect(pg_admin_url) as conn:
        yield conn


@contextmanager
def _engine(tmp_path_factory, quoting) -> Iterator[Engine]:
    engine = Engine(tmp_path_factory.mktemp("timescale"), quoting)
    try:
        yield engine
    finally:
        engine.close()


def _upgrade(engine: Engine, raw_retention_days: int = 30, upto: int | None = None) -> dict:
    """`migrations.upgrade` itself, its connection being the engine (and its list cut at `upto`)."""
    def connect(url, autocommit=False, **kwargs):
        assert url == ENGINE_URL and autocommit, "upgrade() is expected to connect in autocommit mode"
        return EngineConnection(engine)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(psycopg, "connect", connect)
        if upto is not None:
            mp.setattr(migrations, "MIGRATIONS", tuple(m for m in MIGRATIONS if m.version <= upto))
        return migrations.upgrade(ENGINE_URL, raw_retention_days=raw_retention_days)


@pytest.fixture(scope="module")
def ts(tmp_path_factory, quoting) -> Iterator[tuple[Engine, dict]]:
    """An engine on which upgrade() has run once, and what it returned."""
    with _engine(tmp_path_factory, quoting) as engine:
        yield engine, _upgrade(engine)


def _snapshot(engine: Engine) -> dict[str, list]:
    """The schema, plus TimescaleDB's view of it (job ids left out: start-up replaces the retention job)."""
    return {
        "schema": list(engine.run(SCHEMA_SNAPSHOT_SQL).rows),
        "hypertables": list(engine.run(
            "SELECT hypertable_name, num_dimensions, compression_enabled FROM timescaledb_information.hypertables "
            "ORDER BY 1").rows),
        "compression": list(engine.run(
            "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index, orderby_asc "
            "FROM timescaledb_information.compression_settings ORDER BY 1, 2").rows),
        "jobs": list(engine.run(
            "SELECT proc_name, hypertable_name, schedule_interval::text, config::text "
            "FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL ORDER BY 1, 2").rows),
    }


def _policies(engine: Engine, proc: str, key: str) -> list[tuple]:
    return list(engine.run(f"SELECT hypertable_name, config->>'{key}' FROM timescaledb_information.jobs "
                           f"WHERE proc_name = '{proc}' ORDER BY 1").rows)


def _run_policy(engine: Engine, proc: str, table: str) -> None:
    """Run a policy's job now, as TimescaleDB's scheduler would (the engine has no background workers)."""
    job = engine.scalar(f"SELECT job_id FROM timescaledb_information.jobs "
                        f"WHERE proc_name = '{proc}' AND hypertable_name = '{table}'")
    engine.run(f"CALL run_job({job})")


def _insert(engine: Engine, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Rows written with one INSERT (COPY is what the engine cannot take)."""
    values = ", ".join(engine.inline("(" + ", ".join(["%s"] * len(columns)) + ")", row) for row in rows)
    engine.run(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}")


def test_upgrade_chooses_timescaledb_and_applies_every_migration(ts):
    engine, summary = ts
    assert (summary["storage"], summary["applied"], summary["version"]) == ("timescaledb", VERSIONS, VERSIONS[-1])
    assert engine.scalar("SELECT value FROM iotjx_meta WHERE key = 'storage'") == "timescaledb"
    assert engine.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'") == 1
    assert [r[0] for r in engine.run("SELECT version FROM schema_migrations ORDER BY 1").rows] == VERSIONS


def test_every_time_table_is_a_hypertable_with_daily_chunks_and_no_native_partitions(ts):
    engine, _ = ts
    dims = engine.run("SELECT hypertable_name, column_name, time_interval::text "
                      "FROM timescaledb_information.dimensions").rows
    assert sorted(dims) == sorted((t, col, "1 day") for t, col in TIME_TABLES.items())
    assert engine.scalar("SELECT count(*) FROM pg_partitioned_table") == 0
    conn = EngineConnection(engine)
    today = datetime.now(UTC).date()
    # The plain-PostgreSQL helpers are no-ops on hypertables (the writer calls ensure_partitions anyway).
    assert migrations.ensure_partitions(conn, today, today + timedelta(days=400)) == 0
    assert migrations.drop_expired_partitions(conn, 1) == 0


def test_compression_segments_by_device_and_orders_by_time_descending(ts):
    engine, _ = ts
    enabled = engine.run("SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables").rows
    assert sorted(enabled) == sorted((t, True) for t in TIME_TABLES)
    settings = engine.run("SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index, "
                          "orderby_asc FROM timescaledb_information.compression_settings").rows
    expected = [(t, ROLLUP_TABLES.get(t, "device_id"), 1, None, None) for t in TIME_TABLES] + \
               [(t, col, None, 1, False) for t, col in TIME_TABLES.items()]
    assert sorted(settings, key=str) == sorted(expected, key=str)


def test_compression_policy_on_every_time_table_and_retention_on_the_raw_log_only(ts):
    engine, _ = ts
    assert _policies(engine, "policy_compression", "compress_after") == sorted((t, "7 days") for t in TIME_TABLES)
    assert _policies(engine, "policy_retention", "drop_after") == [("raw_uplinks", "30 days")]


def test_a_second_upgrade_applies_nothing_and_changes_nothing(ts):
    engine, _ = ts
    before = _snapshot(engine)
    assert _upgrade(engine)["applied"] == []
    assert _snapshot(engine) == before
    # A changed IOTJX_RAW_RETENTION_DAYS replaces the policy at the next start-up; still one policy.
    _upgrade(engine, raw_retention_days=10)
    assert _policies(engine, "policy_retention", "drop_after") == [("raw_uplinks", "10 days")]
    _upgrade(engine, raw_retention_days=30)
    assert _snapshot(engine) == before


def test_every_migration_applied_again_changes_nothing(ts):
    engine, _ = ts
    before = _snapshot(engine)
    conn = EngineConnection(engine)
    for m in MIGRATIONS:
        with conn.transaction():
            m.apply(conn, True)
    assert _snapshot(engine) == before


def _water_history(devices: tuple[str, ...], days: int, now: datetime) -> list[tuple]:
    """A reading every 5 hours per device over the last `days` days, with made-up cumulative flows."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=days)
    rows, k = [], 0
    while (t := start + timedelta(hours=5 * k)) < now - timedelta(minutes=5):
        rows += [(t, d, "mqtt", round(1000 * i + 0.125 * k, 3)) for i, d in enumerate(devices, 1)]
        k += 1
    return rows


def _by_day(rows: list[tuple], zone) -> dict[tuple, tuple]:
    """Per (local midnight as UTC, device): count, sum, max — plain Python, the reference."""
    out: dict[tuple, list] = {}
    for t, device, _, flow in rows:
        local = t.astimezone(zone)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
        c = out.setdefault((day, device), [0, 0.0, float("-inf")])
        c[0], c[1], c[2] = c[0] + 1, c[1] + flow, max(c[2], flow)
    return {k: tuple(v) for k, v in out.items()}


def _buckets(engine: Engine, devices: tuple[str, ...], zone: str | None) -> dict[tuple, tuple]:
    bucket = "time_bucket('1 day', time" + (f", '{zone}')" if zone else ")")
    wanted = ", ".join(engine.inline("%s", (d,)) for d in devices)
    rows = engine.run(f"SELECT {bucket} AS day, device_id, count(*), sum(flow_m3), max(flow_m3) FROM water_readings "
                      f"WHERE device_id IN ({wanted}) GROUP BY 1, 2").rows
    return {(datetime.fromisoformat(day), device): (n, total, top) for day, device, n, total, top in rows}


def _same_aggregates(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(
        got[k][0] == expected[k][0] and got[k][2] == expected[k][2] and got[k][1] == pytest.approx(expected[k][1])
        for k in expected)


def test_time_bucket_reads_compressed_and_recent_chunks_and_late_rows(ts):
    engine, _ = ts
    devices = ("tb-meter-1", "tb-meter-2", "tb-meter-3")
    now = datetime.now(UTC)
    rows = _water_history(devices, 20, now)
    _insert(engine, "water_readings", ("time", "device_id", "transport", "flow_m3"), rows)
    _run_policy(engine, "policy_compression", "water_readings")
    chunks = engine.run("SELECT range_end, is_compressed FROM timescaledb_information.chunks "
                        "WHERE hypertable_name = 'water_readings'").rows
    cutoff = datetime.now(UTC) - timedelta(days=7)
    assert {(datetime.fromisoformat(end) <= cutoff) for end, _ in chunks} == {True, False}
    assert all(done == (datetime.fromisoformat(end) <= cutoff) for end, done in chunks), chunks
    # A reading delayed past the compression horizon (a spool replayed after a long outage) still lands.
    late = (now - timedelta(days=12, minutes=7), devices[0], "spool", 999.5)
    _insert(engine, "water_readings", ("time", "device_id", "transport", "flow_m3"), [late])
    rows.append(late)
    assert _same_aggregates(_buckets(engine, devices, None), _by_day(rows, UTC))
    # Jiangxi's operators count days in China Standard Time.
    assert _same_aggregates(_buckets(engine, devices, "Asia/Shanghai"), _by_day(rows, ZoneInfo("Asia/Shanghai")))


def test_retention_drops_raw_uplinks_past_the_window_and_nothing_else(ts):
    engine, _ = ts
    now = datetime.now(UTC)
    ages = {"raw-40d": 40, "raw-31d": 31, "raw-29d": 29, "raw-now": 0}
    _insert(engine, "raw_uplinks", ("received_at", "device_id", "transport", "payload", "outcome"),
            [(now - timedelta(days=age, minutes=1), d, "mqtt", b"\x68\x10", "stored") for d, age in ages.items()])
    _insert(engine, "water_readings", ("time", "device_id", "transport"),
            [(now - timedelta(days=40), "old-meter", "mqtt")])
    _run_policy(engine, "policy_retention", "raw_uplinks")
    kept = {r[0] for r in engine.run("SELECT device_id FROM raw_uplinks WHERE device_id LIKE 'raw-%'").rows}
    assert kept == {"raw-29d", "raw-now"}
    assert engine.scalar("SELECT count(*) FROM water_readings WHERE device_id = 'old-meter'") == 1


def test_upgrading_a_version_1_database_with_compressed_chunks(ts, tmp_path_factory, quoting):
    """The oldest schema in service, a week of data compressed, then every later migration: a later
    migration that alters a hypertable meets compressed chunks in production, not on a fresh install."""
    fresh, _ = ts
    with _engine(tmp_path_factory, quoting) as engine:
        assert _upgrade(engine, upto=1)["applied"] == [1]
        rows = _water_history(("v1-meter",), 15, datetime.now(UTC))
        _insert(engine, "water_readings", ("time", "device_id", "transport", "flow_m3"), rows)
        _run_policy(engine, "policy_compression", "water_readings")
        assert engine.scalar("SELECT count(*) FROM timescaledb_information.chunks "
                             "WHERE hypertable_name = 'water_readings' AND is_compressed") > 0
        assert _upgrade(engine)["applied"] == VERSIONS[1:]
        assert engine.run("SELECT count(*), count(extra), sum(flow_m3) FROM water_readings").rows == \
            ((len(rows), 0, pytest.approx(sum(r[3] for r in rows))),)
        old = datetime.now(UTC) - timedelta(days=12)
        _insert(engine, "water_readings", ("time", "device_id", "transport", "extra"),
                [(old, "v1-meter", "spool", Jsonb({"leak": True}))])
        assert engine.scalar("SELECT extra->>'leak' FROM water_readings WHERE extra IS NOT NULL") == "true"
        # Upgraded step by step or installed fresh: the same schema, the same TimescaleDB settings.
        assert _snapshot(engine) == _snapshot(fresh)


def test_reject_retention_purges_in_chunks_on_timescaledb_too(ts):
    """rejected_uplinks and reject_tally are plain tables on TimescaleDB as well (reject_id stays a
    primary key on its own); the gateway's chunked purge runs there under its advisory lock."""
    from ingest.rejects import purge_rejects

    engine, _ = ts
    assert engine.scalar("SELECT count(*) FROM timescaledb_information.hypertables "
                         "WHERE hypertable_name IN ('rejected_uplinks', 'reject_tally')") == 0
    now = datetime.now(UTC)
    ages = {f"rej-{k}": 31 + k for k in range(7)} | {"rej-new": 29}
    _insert(engine, "rejected_uplinks", ("received_at", "device_id", "transport", "payload", "reason"),
            [(now - timedelta(days=age), d, "mqtt", b"\x68", "checksum") for d, age in ages.items()])
    _insert(engine, "reject_tally", ("minute", "transport", "source", "reason", "rejects"),
            [(now.replace(second=0, microsecond=0) - timedelta(days=age), "mqtt", d, "checksum", 1)
             for d, age in ages.items()])
    purged = purge_rejects(EngineConnection(engine), 30, chunk=3, pause_s=0)
    assert (purged.rows, purged.done) == ({"rejected_uplinks": 7, "reject_tally": 7}, True)
    assert [r[0] for r in engine.run("SELECT device_id FROM rejected_uplinks WHERE device_id LIKE 'rej-%'").rows] \
        == ["rej-new"]
    assert [r[0] for r in engine.run("SELECT source FROM reject_tally").rows] == ["rej-new"]
    assert engine.scalar("SELECT data_type FROM information_schema.columns "
                         "WHERE table_name = 'device_models' AND column_name = 'max_payload_bytes'") == "integer"
