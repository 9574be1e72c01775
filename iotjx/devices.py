"""Registering devices and the device models they are: shared by the API, the CLI and the demo."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .model import NETWORKS, PILOTS

log = logging.getLogger(__name__)

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
CSV_COLUMNS = ("device_id", "model", "network", "city", "site_kind", "site_name")
CSV_OPTIONAL = ("installed_at", "reporting_interval_s", "status")
SITE_KINDS = ("residential", "commercial", "community", "scenic_spot", "museum", "campus", "farm", "dev_zone",
              "building", "road", "intersection", "parking_lot", "hydrant", "other")

class RegistrationError(ValueError):
    """A device record that cannot be registered; `.errors` lists (line, message) for bulk imports."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"line {n}: {m}" if n else m for n, m in errors[:10]))


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device as an operator registers it."""

    device_id: str
    model: str
    network: str
    city: str                      # division code, English or Chinese name
    site_kind: str
    site_name: str
    installed_at: datetime | None = None
    reporting_interval_s: int | None = None
    status: str = "active"


def bundled_models() -> list[dict[str, Any]]:
    """The device models iotjx ships: the decoders' model catalogue (decoders/models/*.toml)."""
    from decoders.models import load_models

    out = []
    for name, m in load_models().items():
        out.append({
            "model": name, "codec": m.codec, "family": m.family,
            "pilot": "traffic" if m.family in ("parking", "traffic") else m.family,
            "vendor": m.vendor, "settings": m.codec_settings(), "inner_codec": m.inner_codec,
            "inner_settings": dict(m.inner_settings), "reporting_interval_s": m.report_interval_s,
            "dedup_window_s": m.dedup_window_s, "max_payload_bytes": m.max_payload_bytes,
        })
    return out


def sync_models(conn: psycopg.Connection, models: Iterable[dict[str, Any]] | None = None) -> int:
    """Upsert the device models (the catalogue is the source of truth for the ones it names).  A
    model without `max_payload_bytes` has none in the table: only the gateway's
    IOTJX_UPLINK_MAX_BYTES bounds its uplinks."""
    rows = [(m["model"], m["codec"], m["pilot"], m.get("family", m["pilot"]), m.get("vendor", ""),
             Jsonb(m.get("settings", {})), m.get("inner_codec"), Jsonb(m.get("inner_settings", {})),
             m["reporting_interval_s"], m.get("dedup_window_s"), m.get("max_payload_bytes"))
            for m in (models if models is not None else bundled_models())]
    with conn.cursor() as cur:
        cur.executemany("""
            INSERT INTO device_models (model, codec, pilot, family, vendor, settings, inner_codec, inner_settings,
                                       reporting_interval_s, dedup_window_s, max_payload_bytes)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (model) DO UPDATE SET codec = excluded.codec, pilot = excluded.pilot,
                family = excluded.family, vendor = excluded.vendor, settings = excluded.settings,
                inner_codec = excluded.inner_codec, inner_settings = excluded.inner_settings,
                reporting_interval_s = excluded.reporting_interval_s,
                dedup_window_s = excluded.dedup_window_s,
                max_payload_bytes = excluded.max_payload_bytes""", rows)
    return len(rows)


def _city_lookup(conn: psycopg.Connection) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for code, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities"):
        lookup[str(code)] = code
        lookup[zh] = code
        lookup[zh + "市"] = code
        lookup[en.lower()] = code
    return lookup


def _city(cities: dict[str, int], value: str) -> int | None:
    value = str(value).strip()
    return cities.get(value) or cities.get(value.lower())


def register_devices(conn: psycopg.Connection, records: list[DeviceRecord], *, first_line: int = 1) -> dict[str, int]:
    """Create or update devices (and their sites) in one transaction; all or nothing.

    Raises RegistrationError listing every bad record (numbered from `first_line`)."""
    cities = _city_lookup(conn)
    models = dict(conn.execute("SELECT model, pilot FROM device_models").fetchall())
    errors: list[tuple[int, str]] = []
    seen: set[str] = set()
    for n, r in enumerate(records, start=first_line):
        problems = []
        if not DEVICE_ID.match(r.device_id or ""):
            problems.append(f"device_id {r.device_id!r} must be 1-64 letters, digits or _.:-")
        elif r.device_id in seen:
            problems.append(f"device_id {r.device_id} appears twice")
        if r.model not in models:
            problems.append(f"unknown model {r.model!r} (known: {', '.join(sorted(models))})")
        if r.network not in NETWORKS:
            problems.append(f"network must be one of {NETWORKS}, not {r.network!r}")
        if _city(cities, r.city) is None:
            problems.append(f"unknown city {r.city!r}: use a division code such as 360600 or a name such as Yingtan")
        if r.site_kind not in SITE_KINDS:
            problems.append(f"site_kind must be one of {', '.join(SITE_KINDS)}, not {r.site_kind!r}")
        if not r.site_name:
            problems.append("site_name is empty")
        elif len(r.site_name) > 200 or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in r.site_name):
            problems.append("site_name must be 1-200 characters without control characters")
        if r.reporting_interval_s is not None and r.reporting_interval_s <= 0:
            problems.append("reporting_interval_s must be positive")
        if r.status not in ("active", "inactive", "retired"):
            problems.append("status must be active, inactive or retired")
        errors.extend((n, p) for p in problems)
        seen.add(r.device_id)
    if errors:
        raise RegistrationError(errors)
    created = 0
    with conn.transaction(), conn.cursor() as cur:
        site_keys = {(_city(cities, r.city), r.site_kind, r.site_name)
                     for r in records}
        site_ids: dict[tuple[int, str, str], int] = {}
        for key in sorted(site_keys):
            cur.execute("""INSERT INTO sites (city_code, kind, name) VALUES (%s, %s, %s)
                           ON CONFLICT (city_code, kind, name) DO UPDATE SET name = excluded.name
                           RETURNING site_id""", key)
            site_ids[key] = cur.fetchone()[0]
        for r in records:
            city = _city(cities, r.city)
            cur.execute("""
                INSERT INTO devices (device_id, model, pilot, network, site_id, installed_at, status, reporting_interval_s)
                VALUES (%s, %s, %s, %s, %s, coalesce(%s, now()), %s, %s)
                ON CONFLICT (device_id) DO UPDATE SET model = excluded.model, pilot = excluded.pilot,
                    network = excluded.network, site_id = excluded.site_id,
                    installed_at = coalesce(%s, devices.installed_at), status = excluded.status,
                    reporting_interval_s = excluded.reporting_interval_s
                RETURNING (xmax = 0)""",
                (r.device_id, r.model, models[r.model], r.network, site_ids[(city, r.site_kind, r.site_name)],
                 r.installed_at, r.status, r.reporting_interval_s, r.installed_at))
            created += 1 if cur.fetchone()[0] else 0
    return {"created": created, "updated": len(records) - created, "sites": len(site_ids)}


def parse_csv(text: str) -> list[DeviceRecord]:
    """Device records from CSV with a header row; RegistrationError naming every bad line."""
    try:
        return _parse_csv(csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    except csv.Error as exc:
        raise RegistrationError([(0, f"not CSV: {exc}")]) from None


def _parse_csv(reader: csv.DictReader) -> list[DeviceRecord]:
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise RegistrationError([(1, f"header lacks column(s) {', '.join(missing)}; "
                                     f"expected {', '.join(CSV_COLUMNS)} (+ optional {', '.join(CSV_OPTIONAL)})")])
    records, errors = [], []
    for row in reader:
        line = reader.line_num
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        try:
            installed = row.get("installed_at") or None
            interval = row.get("reporting_interval_s") or None
            records.append(DeviceRecord(
                device_id=row["device_id"], model=row["model"], network=row["network"], city=row["city"],
                site_kind=row["site_kind"], site_name=row["site_name"],
                installed_at=_aware(datetime.fromisoformat(installed)) if installed else None,
                reporting_interval_s=int(interval) if interval else None,
                status=row.get("status") or "active"))
        except ValueError as exc:
            errors.append((line, str(exc)))
    if errors:
        raise RegistrationError(errors)
    return records


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = ["PILOTS", "DeviceRecord", "RegistrationError", "bundled_models", "parse_csv", "register_devices",
           "sync_models"]
