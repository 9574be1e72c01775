"""API keys: who may call the API, with which role, for which cities.

A key reads ``iotjx.<key_id>.<secret>``.  `key_id` (16 hex digits) is public: it names the key in
lists and in the audit log.  Only SHA-256 of the secret (32 random bytes, URL-safe base64) is kept
(`api_keys.secret_hash`); the whole key is shown once, when it is made.  A fast hash is enough for a
256-bit random secret (a slow KDF protects guessable passwords) and keeps the per-request check at
one indexed lookup.  Nothing is cached: a revoked key is refused on its next request.

Roles nest: a viewer reads, an operator also queues downlinks and enters target progress, an admin
also registers devices, sets device credentials and manages keys.  A key may be limited to cities
(division codes): it then sees and touches only those cities' devices and figures."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg

ROLES = ("viewer", "operator", "admin")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_KEY = re.compile(r"^iotjx\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
TOUCH_EVERY_S = 60          # last_used_at is written at most this often per key
_COLUMNS = "key_id, name, role, cities, created_at, created_by, revoked_at, last_used_at"


class ApiKeyError(ValueError):
    """A key that cannot be made or changed as asked; `status` is the HTTP code the API answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored, without its secret."""

    key_id: str
    name: str
    role: str
    cities: tuple[int, ...] | None          # None: every city
    created_at: datetime | None = None
    created_by: str = ""
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this key."""
        return f"key:{self.key_id}"

    def allows(self, role: str) -> bool:
        """True when this key's role is `role` or above it."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def sees_city(self, city: int | None) -> bool:
        """True when this key may see an object of `city` (an object without a city only unscoped)."""
        return self.cities is None or (city is not None and city in self.cities)

    def covers(self, cities: tuple[int, ...] | None) -> bool:
        """True when a scope of `cities` is within this key's scope (None: every city)."""
        if self.cities is None:
            return True
        return cities is not None and set(cities) <= set(self.cities)

    def as_dict(self) -> dict[str, object]:
        return {"key_id": self.key_id, "name": self.name, "role": self.role,
                "cities": None if self.cities is None else list(self.cities), "created_at": self.created_at,
                "created_by": self.created_by, "revoked_at": self.revoked_at, "last_used_at": self.last_used_at}


def _key(row: tuple) -> ApiKey:
    return ApiKey(key_id=row[0], name=row[1], role=row[2], cities=None if row[3] is None else tuple(row[3]),
                  created_at=row[4], created_by=row[5], revoked_at=row[6], last_used_at=row[7])


def secret_hash(secret: str) -> bytes:
    """SHA-256 of a key's secret part: what `api_keys.secret_hash` holds."""
    return hashlib.sha256(secret.encode()).digest()


def split_key(presented: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None (nothing is looked up for a malformed one)."""
    match = _KEY.match(presented)
    return (match.group(1), match.group(2)) if match else None


def resolve_cities(conn: psycopg.Connection, values: Iterable[str | int]) -> tuple[int, ...]:
    """Division codes for codes or names (鹰潭, 鹰潭市, Yingtan); ApiKeyError naming the unknown ones."""
    lookup: dict[str, int] = {}
    for code, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities"):
        lookup.update({str(code): code, zh: code, zh + "市": code, en.lower(): code})
    codes, unknown = [], []
    for value in values:
        code = lookup.get(str(value).strip()) or lookup.get(str(value).strip().lower())
        (codes.append(code) if code is not None else unknown.append(str(value)))
    if unknown:
        raise ApiKeyError(f"unknown city {', '.join(map(repr, unknown))}: "
                          "use a division code such as 360600 or a name such as Yingtan")
    if not codes:
        raise ApiKeyError("a city scope needs at least one city (leave it out for every city)")
    return tuple(sorted(set(codes)))


def create_key(conn: psycopg.Connection, role: str, cities: Iterable[str | int] | None = None, name: str = "",
               created_by: str = "", grantor: ApiKey | None = None) -> tuple[ApiKey, str]:
    """Make a key; returns it and the whole key string, which is not kept anywhere.

    With `grantor` (the key asking), the new key may not have a higher role or a wider city scope
    (ApiKeyError with status 403)."""
    if role not in ROLES:
        raise ApiKeyError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(name) > 200 or any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        raise ApiKeyError("a key's name is at most 200 characters, without control characters")
    scope = None if cities is None else resolve_cities(conn, cities)
    if grantor is not None:
        if not grantor.allows(role):
            raise ApiKeyError(f"a {grantor.role} key cannot make a {role} key", status=403)
        if not grantor.covers(scope):
            raise ApiKeyError(f"this key may only make keys for its own cities {list(grantor.cities or ())}",
                              status=403)
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = conn.execute(f"""INSERT INTO api_keys (key_id, name, role, cities, secret_hash, created_by)
                           VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}""",
                       (key_id, name, role, None if scope is None else list(scope), secret_hash(secret),
                        created_by)).fetchone()
    return _key(row), f"iotjx.{key_id}.{secret}"


def authenticate(conn: psycopg.Connection, presented: str) -> ApiKey | None:
    """The key for a presented key string, or None (malformed, unknown, wrong secret or revoked).

    One lookup by primary key; `last_used_at` is written only when it is older than TOUCH_EVERY_S."""
    parts = split_key(presented)
    if parts is None:
        return None
    key_id, secret = parts
    row = conn.execute(f"SELECT {_COLUMNS}, secret_hash, last_used_at < now() - make_interval(secs => %s) "
                       "FROM api_keys WHERE key_id = %s", (TOUCH_EVERY_S, key_id)).fetchone()
    # compare_digest: the time taken says nothing about how much of the secret was right.
    if row is None or not hmac.compare_digest(bytes(row[8]), secret_hash(secret)) or row[6] is not None:
        return None
    if row[9] is not False:          # never used (NULL) or stale
        conn.execute("UPDATE api_keys SET last_used_at = now() WHERE key_id = %s", (key_id,))
    return _key(row)


def list_keys(conn: psycopg.Connection, within: ApiKey | None = None, *, after: tuple | None = None,
              limit: int | None = None) -> list[ApiKey]:
    """Every key (revoked ones too, with their date), or those `within` a scoped key's cities, by
    (created_at, key_id); `after` such a pair and `limit`: one page of them."""
    out: list[ApiKey] = []
    rows = conn.execute(f"""SELECT {_COLUMNS} FROM api_keys
                            WHERE %(t)s::timestamptz IS NULL OR (created_at, key_id) > (%(t)s, %(k)s)
                            ORDER BY created_at, key_id""",
                        {"t": after[0] if after else None, "k": after[1] if after else None})
    for r in rows:
        k = _key(r)
        if within is None or within.covers(k.cities):
            out.append(k)
            if limit is not None and len(out) >= limit:
                break
    return out


def revoke_key(conn: psycopg.Connection, key_id: str, within: ApiKey | None = None) -> ApiKey | None:
    """Revoke an active key (refused from its next request); None when there is no such active key
    (or it is outside the scope of `within`)."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = %s AND revoked_at IS NULL FOR UPDATE",
                       (key_id,)).fetchone()
    if row is None or (within is not None and not within.covers(_key(row).cities)):
        return None
    row = conn.execute(f"UPDATE api_keys SET revoked_at = now() WHERE key_id = %s RETURNING {_COLUMNS}",
                       (key_id,)).fetchone()
    return _key(row)


__all__ = ["ROLES", "ApiKey", "ApiKeyError", "authenticate", "create_key", "list_keys", "resolve_cities",
           "revoke_key", "secret_hash", "split_key"]
