"""Real services for the tests: PostgreSQL at 127.0.0.1:5432 when it answers (else an embedded one),
and a Mosquitto started with the project's configuration on spare ports (else embedded amqtt).

The broker is the secured one (deploy/mosquitto/mosquitto.conf): anonymous clients are refused, the
gateway logs in with a gateway account on the service listener (`broker.url`, `settings`), test
publishers with a tester account (`broker.tester_login`), devices with their own accounts on the
device listener (`broker.device_url`) once `broker.sync(db_url)` has written them from the registry.
Its ACL has `+` as the topic prefix, so that each test keeps a prefix of its own.

IOTJX_TEST_DATABASE_URL names a server to use instead; if it is given but unreachable the whole run
stops, rather than silently testing against something else."""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from iotjx.settings import Settings

LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _with_db(url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory) -> str:
    given = os.environ.get("IOTJX_TEST_DATABASE_URL")
    if given:
        if not _answers(given):
            pytest.exit(f"IOTJX_TEST_DATABASE_URL={given} does not answer", returncode=3)
        return given
    if _answers(LOCAL_PG):
        return LOCAL_PG
    from iotjx.db.embedded import start_embedded_postgres
    return start_embedded_postgres(tmp_path_factory.mktemp("embedded") / "pg")


class _Copies:
    """Copies of the migrated template made ahead and dropped behind, on a thread of their own, so that
    a test waits for neither CREATE DATABASE (~0.3-0.7 s with a thousand relations) nor DROP DATABASE.
    Making comes before dropping; at the end every copy made and not yet dropped is dropped."""

    AHEAD = 2

    def __init__(self, admin_url: str, template: str) -> None:
        self.admin_url, self.template = admin_url, template
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.ready: queue.Queue = queue.Queue()
        self.out: set[str] = set()                  # taken by a test, not given back yet
        self.seq = itertools.count()
        for _ in range(self.AHEAD):
            self.jobs.put((0, next(self.seq), None))
        self.thread = threading.Thread(target=self._run, name="db-copies", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while True:
                _, _, job = self.jobs.get()
                if job == ("stop",):
                    return
                try:
                    if job is None:
                        name = f"iotjx_t_{uuid.uuid4().hex[:10]}"
                        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
                        self.ready.put(name)
                    else:
                        conn.execute(f'DROP DATABASE IF EXISTS "{job[1]}" WITH (FORCE)')
                except Exception as exc:           # handed to the test that waits for a copy
                    if job is None:
                        self.ready.put(exc)

    def take(self) -> str:
        self.jobs.put((0, next(self.seq), None))          # the next test's copy
        got = self.ready.get(timeout=300)
        if isinstance(got, Exception):
            raise got
        self.out.add(got)
        return got

    def give_back(self, name: str) -> None:
        self.out.discard(name)
        self.jobs.put((1, next(self.seq), ("drop", name)))

    def close(self) -> None:
        self.jobs.put((2, next(self.seq), ("stop",)))
        self.thread.join(timeout=300)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            # spares, and copies a module fixture took and never gave back (a generator left unclosed)
            while not self.ready.empty():
                name = self.ready.get()
                if isinstance(name, str):
                    self.out.add(name)
            for name in sorted(self.out):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_COPIES: dict[tuple[str, str], _Copies] = {}


@pytest.fixture(scope="session")
def template_db(pg_admin_url) -> Iterator[str]:
    """A database migrated once; each test gets a copy of it."""
    from iotjx.runtime import prepare_database

    name = f"iotjx_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    prepare_database(Settings(database_url=_with_db(pg_admin_url, name)))
    _COPIES[(pg_admin_url, name)] = copies = _Copies(pg_admin_url, name)
    yield name
    copies.close()
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_database(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A copy of the migrated template for one test, dropped afterwards (a fixture's body)."""
    copies = _COPIES[(pg_admin_url, template_db)]
    name = copies.take()
    try:
        yield _with_db(pg_admin_url, name)
    finally:
        copies.give_back(name)


@pytest.fixture
def db_url(pg_admin_url, template_db) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    yield from fresh_database(pg_admin_url, template_db)


class BrokerHandle:
    def __init__(self, impl, protocol: str) -> None:
        self.impl = impl
        self.protocol = protocol

    @property
    def url(self) -> str:
        return self.impl.url

    @property
    def host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.impl.port

    @property
    def secured(self) -> bool:
        """Accounts and ACL (Mosquitto); the embedded amqtt fallback is anonymous."""
        from iotjx.broker import MosquittoProcess
        return isinstance(self.impl, MosquittoProcess)

    @property
    def device_url(self) -> str:
        return getattr(self.impl, "device_url", self.impl.url)

    @property
    def device_port(self) -> int:
        return getattr(self.impl, "device_port", self.impl.port)

    def gateway_settings(self) -> dict[str, str]:
        """Settings fields for a gateway: the service listener and the gateway account."""
        return self.impl.gateway_settings() if self.secured else {"mqtt_url": self.impl.url}

    @property
    def tester_login(self) -> dict[str, str]:
        """`username`/`password` of the tester account (MqttPublisher's keywords); {} on amqtt."""
        return dict(self.impl.tester_login) if self.secured else {}

    def sync(self, db_url: str) -> None:
        """The registry's MQTT accounts (device passwords set by the test) written and reloaded."""
        if self.secured:
            self.impl.sync(db_url)

    @property
    def shared_subscriptions(self) -> bool:
        """`$share/…` works (Mosquitto 2, for 3.1.1 and 5 clients); the embedded amqtt has none."""
        from iotjx.broker import MosquittoProcess
        return isinstance(self.impl, MosquittoProcess)


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[BrokerHandle]:
    """Mosquitto with deploy/mosquitto/mosquitto.conf on a spare port; amqtt where none is installed."""
    from iotjx.broker import AmqttBroker, MosquittoProcess

    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        impl = MosquittoProcess(tmp_path_factory.mktemp("mosquitto")).start()
        handle = BrokerHandle(impl, "3.1.1")      # the gateway's default; MQTT 5 runs in tests/ingest/test_faults.py
    else:
        impl = AmqttBroker().start()
        handle = BrokerHandle(impl, "3.1.1")
    yield handle
    impl.stop()


@pytest.fixture
def settings(db_url, broker) -> Settings:
    return Settings(database_url=db_url, **broker.gateway_settings(), mqtt_protocol=broker.protocol,
                    mqtt_client_id=f"iotjx-test-{uuid.uuid4().hex[:8]}",
                    mqtt_topic_prefix=f"t{uuid.uuid4().hex[:6]}", batch_age_ms=50,
                    # /coverage recomputed per request: a test sees what it just wrote (the refreshed
                    # report has its own test in tests/analytics/test_coverage.py)
                    coverage_refresh_s=0,
                    # no scheduled analytics in the background of the API's tests (tests/analytics/test_schedule.py
                    # runs the loop itself)
                    analytics_interval_s=0)


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fails a test that leaves iotjx or paho threads running (clean shut-down)."""
    before = set(threading.enumerate())
    yield
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in set(threading.enumerate()) - before
                if t.is_alive() and (t.name.startswith("iotjx") or "paho" in t.name or t.name.startswith("Thread"))]
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"threads left running: {[t.name for t in left]}")
