"""A second fresh database, for runs that compare two systems."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import fresh_database


@pytest.fixture
def second_db_url(pg_admin_url, template_db) -> Iterator[str]:
    yield from fresh_database(pg_admin_url, template_db)
