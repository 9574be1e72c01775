"""Database access shared by the gateway, analytics and the API."""

from __future__ import annotations

import logging

import psycopg

log = logging.getLogger(__name__)


def connect(url: str, *, autocommit: bool = False, application_name: str = "iotjx") -> psycopg.Connection:
    """A psycopg 3 connection; a clear error naming the URL's host when the database does not answer."""
    try:
        return psycopg.connect(url, autocommit=autocommit, application_name=application_name, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise psycopg.OperationalError(f"cannot reach the database at {redact(url)}: {exc}") from exc


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def storage_kind(conn: psycopg.Connection) -> str:
    """'timescaledb' or 'postgresql': what the schema was built on (recorded by the first migration)."""
    row = conn.execute("SELECT value FROM iotjx_meta WHERE key = 'storage'").fetchone()
    return row[0] if row else "unknown"
