"""The database a command runs against (configured, or an embedded one for the demo), its schema
applied, and kept applied for a gateway that starts while the database is away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psycopg

from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_database(settings: Settings, *, data_dir: Path | None = None) -> Settings:
    """Settings with a database: the configured one, else an embedded one in `data_dir` (the demo's
    broker, with the accounts it makes, is `demo._demo_broker`)."""
    if settings.database_url is not None:
        return settings
    from .db.embedded import start_embedded_postgres
    data_dir = Path(data_dir or settings.data_dir).resolve()
    log.info("no IOTJX_DATABASE_URL: using an embedded PostgreSQL in %s", data_dir / "pg")
    return settings.model_copy(update={"database_url": start_embedded_postgres(data_dir / "pg")})


def prepare_database(settings: Settings) -> dict[str, object]:
    """Migrations and the device-model catalogue, applied; returns the migration summary."""
    from .db import connect
    from .db.migrations import upgrade
    from .devices import sync_models

    summary = upgrade(settings.database_url, raw_retention_days=settings.raw_retention_days)
    with connect(settings.database_url) as conn:
        summary["models"] = sync_models(conn)
        conn.commit()
    return summary


class SchemaKeeper:
    """The database's schema for a process that must run while the database is away (the gateway:
    it spools and acknowledges meanwhile).  `apply_now` tries `prepare_database` once; `start` keeps
    trying in a thread until it succeeds; `ready` is set from then on.  `gate(factory)` wraps a
    connection factory so that nothing reaches the database before the schema is there: until then
    it raises psycopg.OperationalError, which the pipeline treats as a database that does not answer
    (spool, retry), so no uplink is decoded or written against tables that are not there yet."""

    def __init__(self, settings: Settings, *, first_delay_s: float = 0.5, retry_max_s: float = 15.0,
                 prepare: Callable[[Settings], object] | None = None) -> None:
        self._settings = settings
        self._prepare = prepare or prepare_database
        self._first_delay_s = first_delay_s
        self._retry_max_s = retry_max_s
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.attempts = 0
        self._last_error: str | None = None

    def apply_now(self) -> bool:
        """True once the schema is applied (now or before); False while the database does not answer.
        Any other error (a migration that fails) is raised: that needs an operator."""
        if self.ready.is_set():
            return True
        self.attempts += 1
        try:
            self._prepare(self._settings)
        except psycopg.OperationalError as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # Once per change: an outage retried every few seconds says nothing new.
            log.log(logging.WARNING if error != self._last_error else logging.DEBUG,
                    "schema not applied, the database does not answer (retried in the background): %s", error)
            self._last_error = error
            return False
        if self._last_error is not None:
            log.warning("the database answers again: schema applied after %d attempts", self.attempts)
        self.ready.set()
        return True

    def start(self) -> None:
        """Retry in a thread until the schema is applied (nothing to do when it already is)."""
        if self.ready.is_set() or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="iotjx-schema", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def gate(self, factory: Callable[[], T]) -> Callable[[], T]:
        """`factory`, refusing (OperationalError) until the schema is applied."""
        def gated() -> T:
            if not self.ready.is_set():
                raise psycopg.OperationalError("the schema is not applied yet (the database did not answer at "
                                               "start-up; migrations are retried in the background)")
            return factory()
        return gated

    def _run(self) -> None:
        delay = self._first_delay_s
        while not self._stop.wait(delay):
            try:
                if self.apply_now():
                    return
            except Exception:     # a migration that fails: loud, and tried again (the process stays up)
                log.exception("applying the schema failed; trying again in %.0f s", self._retry_max_s)
                delay = self._retry_max_s
                continue
            delay = min(delay * 2, self._retry_max_s)
