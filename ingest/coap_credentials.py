"""CoAP device credentials: per-device tokens, stored as SHA-256(salt ‖ token) in
device_credentials (migration 4), checked against a cache that reads its misses in batches."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable

import psycopg

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9._~-]{16,128}$")    # URI-query safe without escaping
UNKNOWN = (False, None, None)


class CredentialsUnavailable(RuntimeError):
    """The database cannot be read and the device is not cached: the device should retry later."""


def hash_token(salt: bytes, token: str) -> bytes:
    """SHA-256(salt ‖ token).  Tokens are ≥ 16 random characters, so a fast hash is enough and
    keeps the check cheap at thousands of uplinks a second (a slow KDF protects weak passwords)."""
    return hashlib.sha256(salt + token.encode()).digest()


def set_device_token(conn: psycopg.Connection, device_id: str, token: str | None = None) -> str:
    """Set (or rotate) a device's CoAP token; returns it (generated when not given).  LookupError
    for an unregistered device, ValueError for a token that is not 16-128 URI-safe characters."""
    token = token if token is not None else secrets.token_urlsafe(24)
    if not TOKEN_PATTERN.match(token):
        raise ValueError("a CoAP token is 16-128 characters of A-Z a-z 0-9 . _ ~ -")
    if conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,)).fetchone() is None:
        raise LookupError(f"no device {device_id}")
    salt = os.urandom(16)
    conn.execute("""INSERT INTO device_credentials (device_id, salt, token_hash) VALUES (%s, %s, %s)
                    ON CONFLICT (device_id) DO UPDATE SET salt = excluded.salt, token_hash = excluded.token_hash,
                        updated_at = now()""", (device_id, salt, hash_token(salt, token)))
    return token


class DeviceCredentials:
    """device id → (registered?, salt, hash), cached: known devices for `ttl_s` (a rotated token is
    re-read after a mismatch), unknown ids for `unknown_ttl_s`.  Misses are read together: one query
    at a time, for every id missed while the previous one ran (a burst of devices costs a few
    queries, not one thread hand-off and one query each)."""

    MAX_ENTRIES = 200_000

    def __init__(self, connect: Callable[[], psycopg.Connection], ttl_s: float = 60.0,
                 unknown_ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._ttl_s, self._unknown_ttl_s = ttl_s, unknown_ttl_s
        self._cache: dict[str, tuple[float, bool, bytes | None, bytes | None]] = {}
        # Event-loop side of the batched lookups:
        self._wanted: set[str] = set()                    # ids the next query reads
        self._next_lookup: asyncio.Future | None = None   # resolved with (entries, error) by that query
        self._looking_up = False
        self._lookup_task: asyncio.Task | None = None
        self.lookups = 0                                  # queries run (each for a set of ids)

    def cached(self, device_id: str, token: str | None) -> str | None:
        """The verdict from the cache, or None when it must be read (missing or stale entry, or a
        wrong token whose record is old enough that the token may have been rotated)."""
        entry = self._cache.get(device_id)
        if entry is None:
            return None
        age = time.monotonic() - entry[0]
        if age >= (self._ttl_s if entry[1] else self._unknown_ttl_s):
            return None
        verdict = _verdict(entry, token)
        return None if verdict == "bad_token" and age > 2.0 else verdict

    async def check(self, device_id: str, token: str | None, executor) -> str:
        """`ok`, `bad_token`, `no_token` (none set for the device) or `unknown_device`;
        CredentialsUnavailable when the database is away and the device is not cached."""
        verdict = self.cached(device_id, token)
        if verdict is not None:
            return verdict
        entry = self._cache.get(device_id)
        return _verdict(await self._lookup(device_id, entry, executor), token)

    def check_then(self, device_id: str, token: str | None, executor,
                   callback: Callable[[str | None], None]) -> None:
        """`check` without a task of the caller's own (in the event loop's thread): `callback(verdict)`
        once the device's record is read, or `callback(None)` when the database is away and the device
        is not cached."""
        cached = self._cache.get(device_id)

        def read(waiter: asyncio.Future) -> None:
            entries, error = waiter.result()
            if error is None:
                callback(_verdict(entries[device_id], token))
            else:                       # the database is away: what we knew still holds
                callback(None if cached is None else _verdict(cached, token))

        self._want(device_id, executor).add_done_callback(read)

    def _want(self, device_id: str, executor) -> asyncio.Future:
        """The future of the next batched lookup, which will read `device_id`."""
        loop = asyncio.get_running_loop()
        self._wanted.add(device_id)
        if self._next_lookup is None:
            self._next_lookup = loop.create_future()
        waiter = self._next_lookup
        if not self._looking_up:
            self._looking_up = True
            self._lookup_task = loop.create_task(self._look_up_wanted(executor))   # referenced until done
        return waiter

    async def _lookup(self, device_id: str, cached, executor):
        waiter = self._want(device_id, executor)
        entries, error = await asyncio.shield(waiter)    # shared: one cancelled request must not cancel it
        if error is None:
            return entries[device_id]
        if cached is not None:          # the database is away: what we knew still holds
            return cached
        raise CredentialsUnavailable("credentials cannot be checked now (database unreachable)") from error

    async def _look_up_wanted(self, executor) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wanted:
                ids, self._wanted = self._wanted, set()
                waiter, self._next_lookup = self._next_lookup, None
                entries, error = {}, None
                try:
                    found = await loop.run_in_executor(executor, self._fetch, ids)
                except Exception as exc:       # the waiters answer 5.03 or use what they knew
                    error = exc
                else:
                    if len(self._cache) + len(ids) > self.MAX_ENTRIES:   # bounded: random ids must not grow it
                        self._cache.clear()
                    now = time.monotonic()
                    for device_id in ids:
                        entries[device_id] = self._cache[device_id] = (now, *found.get(device_id, UNKNOWN))
                if not waiter.done():
                    waiter.set_result((entries, error))
        finally:
            self._looking_up = False

    def _fetch(self, device_ids: set[str]) -> dict[str, tuple[bool, bytes | None, bytes | None]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._conn.autocommit = True
            try:
                rows = self._conn.execute("""SELECT d.device_id, d.status, c.salt, c.token_hash FROM devices d
                                             LEFT JOIN device_credentials c USING (device_id)
                                             WHERE d.device_id = ANY(%s)""", (list(device_ids),)).fetchall()
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None
                raise
            self.lookups += 1
        return {device_id: (True, bytes(salt) if salt is not None else None,
                            bytes(digest) if digest is not None else None)
                for device_id, status, salt, digest in rows if status != "retired"}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _verdict(entry, token: str | None) -> str:
    _, known, salt, digest = entry
    if not known:
        return "unknown_device"
    if digest is None:
        return "no_token"
    if token is None or not hmac.compare_digest(hash_token(salt, token), digest):
        return "bad_token"
    return "ok"
