"""Background jobs of the API process: today one kind, the re-decode of rejected uplinks
(`POST /rejects/redecode`, ingest/redecode.py), which may take minutes on a city's backlog.

A job is a row of `jobs` (migration 14): `submit` queues it in the caller's transaction; a
`JobRunner` thread of each API process claims queued jobs (``FOR UPDATE SKIP LOCKED``: one runner per
job however many replicas), runs them on connections of its own (never the request pool), and
records the counts after every committed chunk and the end: `done`, or `failed` with the error.

* **One at a time per city scope.**  `submit` refuses (`JobConflict`, a 409) a re-decode while a queued
  or running one covers one of the same cities (a whole-province job covers every city); the check
  and the insert are serialised by a transaction-scoped advisory lock, so two replicas cannot both
  queue.  Refusing rather than queueing: the second run would only re-examine what the first is
  storing (re-decode stores each frame once anyway), and the caller gets the running job's id to poll.
* **A job interrupted is marked failed.**  The runner holds a session advisory lock on the job while it
  runs it; every runner, at start and every `POLL_S`, marks failed a `running` job whose lock nobody
  holds (its process died or lost its connection).  Not resumed: what it committed stays committed
  (chunks are transactions, and marked), and posting the re-decode again goes on from there, storing
  nothing twice.  A job stopped by the API's shutdown is marked failed by the runner itself."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ingest.aggregates import Aggregator
from ingest.redecode import RedecodeResult, RejectFilter, redecode
from iotjx.db import connect

log = logging.getLogger(__name__)

JOB_LOCK = 0x10_7A_5D          # advisory lock namespace: (JOB_LOCK, 0) serialises submits, (JOB_LOCK, id) a run
POLL_S = 2.0                   # how often an idle runner looks for queued and orphaned jobs
MAX_ERROR = 500                # characters of an error kept
STATES = ("queued", "running", "done", "failed")
KINDS = ("redecode",)
INTERRUPTED = "interrupted: the API process running it stopped; post it again to go on (nothing is stored twice)"
SHUT_DOWN = "stopped: the API shut down before it finished; post it again to go on (nothing is stored twice)"


class JobConflict(Exception):
    """A job of the same kind covering some of the same cities is queued or running."""

    def __init__(self, job_id: int):
        super().__init__(f"a re-decode covering these cities is queued or running: job {job_id}")
        self.job_id = job_id


class _Stopped(Exception):
    pass


def _lock_key(job_id: int) -> int:
    return job_id % 2_147_483_647 or 1         # pg_advisory_lock(int4, int4); 0 is the submit lock


def submit(conn: psycopg.Connection, kind: str, params: dict[str, Any], *, cities: tuple[int, ...] | None,
           actor: str, key_id: str | None) -> int:
    """Queue a job (in the caller's transaction) and give its id; `JobConflict` when one of the same kind
    covering any of `cities` (None: every city) is queued or running."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (JOB_LOCK,))
    clash = conn.execute("""SELECT job_id FROM jobs WHERE kind = %(kind)s AND state IN ('queued', 'running')
                              AND (cities IS NULL OR %(cities)s::int[] IS NULL OR cities && %(cities)s)
                            ORDER BY job_id LIMIT 1""",
                         {"kind": kind, "cities": None if cities is None else list(cities)}).fetchone()
    if clash is not None:
        raise JobConflict(clash[0])
    return conn.execute("""INSERT INTO jobs (kind, params, cities, actor, key_id) VALUES (%s, %s, %s, %s, %s)
                           RETURNING job_id""",
                        (kind, Jsonb(params), None if cities is None else list(cities), actor, key_id)).fetchone()[0]


def fail_orphans(conn: psycopg.Connection) -> list[int]:
    """Mark failed every running job no runner holds (its lock is free); the ids marked.  `conn` is
    autocommit, and holds no job lock of its own for a job it marks (its runner's lock is taken and let go)."""
    marked = []
    for (job_id,) in conn.execute("SELECT job_id FROM jobs WHERE state = 'running' ORDER BY job_id").fetchall():
        if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (JOB_LOCK, _lock_key(job_id))).fetchone()[0]:
            continue                            # a runner holds it (perhaps this one, in another session)
        try:
            n = conn.execute("""UPDATE jobs SET state = 'failed', finished_at = now(), error = %s
                                WHERE job_id = %s AND state = 'running'""", (INTERRUPTED, job_id)).rowcount
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (JOB_LOCK, _lock_key(job_id)))
        if n:
            log.warning("job %d was interrupted (its runner is gone): marked failed", job_id)
            marked.append(job_id)
    return marked


def redecode_filter(params: dict[str, Any]) -> RejectFilter:
    """The reject filter a re-decode job's params (RedecodeIn as JSON) name."""
    def when(v: str | None) -> datetime | None:
        return None if v is None else datetime.fromisoformat(v)
    return RejectFilter(params.get("reason"), params.get("device"), params.get("transport"), params.get("codec"),
                        params.get("model"), when(params.get("since")), when(params.get("until")), redecoded=False)


class JobRunner:
    """A worker thread running the queued jobs of the database at `url`, one at a time.  `aggregator`
    makes the rollup aggregator a re-decode writes with (None: rollups off)."""

    def __init__(self, url: str, aggregator: Callable[[], Aggregator | None], *, poll_s: float = POLL_S):
        self.url = url
        self.aggregator = aggregator
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.alive_at: float | None = None     # monotonic time of the loop's last pass (readiness)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="iotjx-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.url, autocommit=True, application_name="iotjx-jobs")
                fail_orphans(conn)
                self.alive_at = time.monotonic()
                while not self._stop.is_set() and self.run_one(conn):
                    pass
            except (psycopg.Error, OSError) as exc:
                log.warning("job runner: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
            self._wake.wait(self.poll_s)
            self._wake.clear()
        if conn is not None:
            conn.close()

    def run_one(self, conn: psycopg.Connection) -> bool:
        """Claim the oldest queued job and run it to its end; False when none was queued."""
        with conn.transaction():
            row = conn.execute("""SELECT job_id, kind, params, cities, actor FROM jobs WHERE state = 'queued'
                                  ORDER BY job_id LIMIT 1 FOR UPDATE SKIP LOCKED""").fetchone()
            if row is None:
                return False
            job_id, kind, params, cities, actor = row
            # Held for the run, past this transaction: fail_orphans tells a live run from a dead one by it.
            conn.execute("SELECT pg_advisory_lock(%s, %s)", (JOB_LOCK, _lock_key(job_id)))
            conn.execute("UPDATE jobs SET state = 'running', started_at = now() WHERE job_id = %s", (job_id,))
        try:
            self._run(conn, job_id, kind, params, None if cities is None else tuple(cities), actor)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (JOB_LOCK, _lock_key(job_id)))
        return True

    def _run(self, conn: psycopg.Connection, job_id: int, kind: str, params: dict[str, Any],
             cities: tuple[int, ...] | None, actor: str) -> None:
        def record(r: RedecodeResult) -> None:
            conn.execute("""UPDATE jobs SET examined = %s, stored = %s, still_rejected = %s, last_reject_id = %s
                            WHERE job_id = %s""",
                         (r.examined, r.stored, Jsonb(r.still_rejected), r.last_reject_id, job_id))
            if self._stop.is_set():
                raise _Stopped

        try:
            result = redecode(lambda: connect(self.url, application_name="iotjx-redecode"), redecode_filter(params),
                              actor=actor, cities=cities, limit=2**62, aggregator=self.aggregator(), progress=record)
        except _Stopped:
            self._end(conn, job_id, "failed", SHUT_DOWN)
        except Exception as exc:                  # the job fails, the runner goes on
            log.exception("job %d failed", job_id)
            self._end(conn, job_id, "failed", (str(exc).splitlines() or [type(exc).__name__])[0][:MAX_ERROR])
        else:
            conn.execute("""UPDATE jobs SET examined = %s, stored = %s, still_rejected = %s, last_reject_id = %s
                            WHERE job_id = %s""",
                         (result.examined, result.stored, Jsonb(result.still_rejected), result.last_reject_id, job_id))
            self._end(conn, job_id, "done", None)

    @staticmethod
    def _end(conn: psycopg.Connection, job_id: int, state: str, error: str | None) -> None:
        conn.execute("UPDATE jobs SET state = %s, finished_at = now(), error = %s WHERE job_id = %s",
                     (state, error, job_id))


__all__ = ["INTERRUPTED", "JOB_LOCK", "KINDS", "STATES", "JobConflict", "JobRunner", "fail_orphans", "redecode_filter",
           "submit"]
