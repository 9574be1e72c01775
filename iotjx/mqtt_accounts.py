"""MQTT accounts: who may connect to the broker, as the registry says.

Each device that talks MQTT gets its own account, named by its device id; each gateway replica and
the (optional) tester have service accounts.  Only a salted PBKDF2-HMAC-SHA512 hash of a password is
kept (`mqtt_accounts`); the password is returned once, when it is set.  The hash parameters are the
ones Mosquitto's password file uses (``$7$<iterations>$<base64 salt>$<base64 hash>``, written by
`mosquitto_passwd` since 2.0), so the broker's files can be generated from the table without
knowing a single password; EMQX's built-in PostgreSQL authentication reads the same columns
(``pbkdf2``, ``sha512``).  A change to the table or to a device's status is announced on the
PostgreSQL channel `NOTIFY_CHANNEL`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets

import psycopg

NOTIFY_CHANNEL = "iotjx_mqtt_accounts"
ROLES = ("device", "gateway", "tester")
SERVICE_ROLES = ("gateway", "tester")
# Mosquitto's own count (mosquitto_passwd 2.0).  Passwords made here are 144 random bits, so the
# count adds little against guessing and costs the broker CPU at every CONNECT (a fleet reconnecting
# after a broker restart pays it a million times).
ITERATIONS = 101
SALT_BYTES = 12
# A user name Mosquitto's password file and ACL patterns can hold: no ':' (the file's separator),
# no MQTT wildcard or level separator (%u is substituted into topics), no whitespace.
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PASSWORD = re.compile(r"^[\x21-\x7e]{16,128}$")


def new_password() -> str:
    """A random password (24 URL-safe characters, 144 bits)."""
    return secrets.token_urlsafe(18)


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> tuple[int, bytes, bytes]:
    """(iterations, salt, PBKDF2-HMAC-SHA512 of the password): what `mqtt_accounts` keeps."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return iterations, salt, hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)


def verify_password(password: str, iterations: int, salt: bytes, password_hash: bytes) -> bool:
    return hmac.compare_digest(hash_password(password, salt, iterations)[2], password_hash)


def mosquitto_hash(iterations: int, salt: bytes, password_hash: bytes) -> str:
    """The hash in Mosquitto's password-file format (``$7$`` = PBKDF2-SHA512)."""
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(password_hash).decode()}"


def check_username(username: str) -> None:
    if not USERNAME.match(username):
        raise ValueError(f"{username!r} cannot be an MQTT user name: 1-64 of A-Z a-z 0-9 _ . - "
                         "(Mosquitto's password file and topic patterns cannot hold ':', '/', '+', '#' or spaces)")


def _store(conn: psycopg.Connection, username: str, role: str, device_id: str | None, password: str | None) -> str:
    password = new_password() if password is None else password
    if not PASSWORD.match(password):
        raise ValueError("an MQTT password is 16-128 printable ASCII characters without spaces")
    iterations, salt, digest = hash_password(password)
    # A password is rotated only for an account of the same role: a device registered under a
    # gateway's name must not take its account over (nor the other way round).
    stored = conn.execute("""
        INSERT INTO mqtt_accounts (username, role, device_id, iterations, salt, password_hash)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (username) DO UPDATE SET iterations = excluded.iterations, salt = excluded.salt,
            password_hash = excluded.password_hash, updated_at = now()
        WHERE mqtt_accounts.role = excluded.role
        RETURNING 1""", (username, role, device_id, iterations, salt, digest)).fetchone()
    if stored is None:
        raise ValueError(f"{username!r} is already the name of another kind of MQTT account")
    return password


def set_device_password(conn: psycopg.Connection, device_id: str, password: str | None = None) -> str:
    """Set (or rotate) a device's MQTT password; returns it (generated when not given).  LookupError
    for an unregistered device, ValueError for an id Mosquitto cannot take as a user name or a
    password that is not 16-128 printable characters.  The caller commits."""
    if conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,)).fetchone() is None:
        raise LookupError(f"no device {device_id}")
    check_username(device_id)
    return _store(conn, device_id, "device", device_id, password)


def set_service_account(conn: psycopg.Connection, username: str, role: str, password: str | None = None) -> str:
    """Create (or rotate the password of) a gateway or tester account; returns the password.  A name
    that is a registered device's id is refused (a device's account is named by its id)."""
    if role not in SERVICE_ROLES:
        raise ValueError(f"a service account is one of {', '.join(SERVICE_ROLES)}, not {role!r}")
    check_username(username)
    if conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (username,)).fetchone() is not None:
        raise ValueError(f"{username!r} is a device id; a service account needs another name")
    return _store(conn, username, role, None, password)


def verify_account(conn: psycopg.Connection, username: str, password: str, role: str) -> bool:
    """True when `username` is an account of `role` whose password is `password` (a tester's HTTP
    login for replays, ingest/http.py).  One PBKDF2 per call: callers cache what they accepted."""
    row = conn.execute("SELECT iterations, salt, password_hash FROM mqtt_accounts WHERE username = %s AND role = %s",
                       (username, role)).fetchone()
    if row is None:
        hash_password(password)           # as long as a check: the answer's time says nothing of the name
        return False
    return verify_password(password, row[0], bytes(row[1]), bytes(row[2]))


def delete_account(conn: psycopg.Connection, username: str, role: str | None = None) -> bool:
    """Remove an account, of `role` only when given (the broker refuses it once its files are
    generated again)."""
    return conn.execute("DELETE FROM mqtt_accounts WHERE username = %s AND (%s::text IS NULL OR role = %s)",
                        (username, role, role)).rowcount > 0
