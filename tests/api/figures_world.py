"""One database, app and set of keys per figure test module (tests/api/test_figures_*.py): the data is
filled once per module, the tests only read it."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from iotjx.settings import Settings
from tests.api.conftest import NANCHANG, YINGTAN
from tests.helpers import bearer, insert_key, walk_pages


@dataclass
class World:
    db_url: str
    client: TestClient
    viewer: str                 # unscoped
    nanchang: str               # a viewer scoped to Nanchang
    two_cities: str             # a viewer scoped to Nanchang and Yingtan

    def get(self, path: str, key: str | None = None, **query):
        """GET with the unscoped viewer's key (or `key`); asserts a 200."""
        answer = self.client.get(path, params=query, headers=bearer(key or self.viewer))
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        return answer

    def json(self, path: str, key: str | None = None, **query):
        return self.get(path, key, **query).json()

    def items(self, path: str, key: str | None = None, **query) -> list[dict]:
        """Every item of a paginated list, following next_cursor (small pages: the cursor is exercised)."""
        return walk_pages(self.client, path, key or self.viewer, {**query, "limit": 3})

    def csv(self, path: str, key: str | None = None, **query) -> list[dict[str, str]]:
        answer = self.get(path, key, **query)
        assert answer.headers["content-type"].startswith("text/csv")
        return list(csv.DictReader(io.StringIO(answer.text)))

    def anonymous(self, path: str, **query) -> int:
        return self.client.get(path, params=query).status_code

    def sql(self, query: str, params: dict | tuple | None = None) -> list[tuple]:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute(query, params).fetchall()


def module_world(pg_admin_url: str, template_db: str, broker, fill: Callable[[str], None]) -> Iterator[World]:
    """A fresh database filled by `fill(db_url)`, an app over it and three viewer keys (a fixture's body)."""
    from tests.conftest import fresh_database

    gen = fresh_database(pg_admin_url, template_db)
    db_url = next(gen)
    try:
        fill(db_url)
        settings = Settings(database_url=db_url, **broker.gateway_settings(), mqtt_protocol=broker.protocol,
                            mqtt_client_id=f"iotjx-test-{uuid.uuid4().hex[:8]}", coverage_refresh_s=0,
                            analytics_interval_s=0)
        keys = (insert_key(db_url, "viewer"), insert_key(db_url, "viewer", [NANCHANG]),
                insert_key(db_url, "viewer", [NANCHANG, YINGTAN]))
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield World(db_url, client, *keys)
    finally:
        gen.close()
