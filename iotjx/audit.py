"""The audit log: one row per write, whoever made it (an API key or the command line).

A row is written in the same transaction as the change it describes, so the log holds a row for
every committed change and none for a change that was rolled back.  `change` says what changed; a
secret never goes into it (`scrub` drops tokens, passwords and key secrets by name, as a last guard
behind the callers, which do not pass them)."""

from __future__ import annotations

import getpass
import json
from functools import partial
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

_dumps = partial(json.dumps, default=str, ensure_ascii=False)    # dates as ISO text
SECRET_FIELDS = frozenset({"token", "password", "secret", "key", "secret_hash", "password_hash", "token_hash"})


def scrub(change: Any) -> Any:
    """`change` without any member named like a secret, at any depth."""
    if isinstance(change, dict):
        return {k: scrub(v) for k, v in change.items() if str(k).lower() not in SECRET_FIELDS}
    if isinstance(change, list | tuple):
        return [scrub(v) for v in change]
    return change


def cli_actor() -> str:
    """How the audit log names a command-line user: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):         # no passwd entry (some containers)
        user = "unknown"
    return f"cli:{user}"


def record(conn: psycopg.Connection, *, actor: str, method: str, route: str, target: str | None = None,
           change: dict[str, Any] | None = None, status: int | None = None, key_id: str | None = None) -> None:
    """Add one audit row (in the caller's transaction)."""
    conn.execute("""INSERT INTO audit_log (actor, key_id, method, route, target, change, status)
                    VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                 (actor, key_id, method, route, target, Jsonb(scrub(change or {}), dumps=_dumps), status))


__all__ = ["cli_actor", "record", "scrub"]
