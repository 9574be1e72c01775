"""Keys for the API tests, made with SQL and SHA-256 computed in tests/helpers.py (not by
iotjx.apikeys), so that the tests hold the stored format to what README.md says."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import bearer, insert_key

YINGTAN, NANCHANG = 360600, 360100


def key_id(key: str) -> str:
    return key.split(".")[1]


@dataclass(frozen=True)
class Keys:
    admin: str
    operator: str
    viewer: str
    revoked: str
    nanchang_admin: str
    nanchang_operator: str
    nanchang_viewer: str

    def scoped(self, role: str) -> str:
        return getattr(self, f"nanchang_{role}")


@pytest.fixture
def keys(db_url) -> Keys:
    return Keys(admin=insert_key(db_url, "admin"), operator=insert_key(db_url, "operator"),
                viewer=insert_key(db_url, "viewer"), revoked=insert_key(db_url, "admin", revoked=True),
                nanchang_admin=insert_key(db_url, "admin", [NANCHANG]),
                nanchang_operator=insert_key(db_url, "operator", [NANCHANG]),
                nanchang_viewer=insert_key(db_url, "viewer", [NANCHANG]))


@pytest.fixture
def anonymous(settings):
    """A client that sends no key."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def admin_client(settings, keys):
    """A client that sends the (unscoped) admin key."""
    with TestClient(create_app(settings), headers=bearer(keys.admin), raise_server_exceptions=False) as client:
        yield client
