"""Registering devices and the device models they are: shared by the API, the CLI and the demo."""

from __future__ import annotations

import csv
import io
import logging
import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .model import NETWORKS, PILOTS

log = logging.getLogger(__name__)

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
CSV_COLUMNS = ("device_id", "model")
CSV_OPTIONAL = ("network", "city", "site_kind", "site_name", "site_id", "installed_at", "reporting_interval_s",
                "status")
SITE_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")    # a catalogue site's code (iotjx.sites)
SITE_KINDS = ("residential", "commercial", "community", "scenic_spot", "museum", "campus", "farm", "dev_zone",
              "building", "road", "intersection", "parking_lot", "hydrant", "other")
STATUSES = ("active", "inactive", "retired")
MAX_ERRORS = 100                              # errors listed for one import; the rest are counted
MAX_REPORTING_INTERVAL_S = 366 * 86400
INSTALLED_AT_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
INSTALLED_AT_AHEAD = timedelta(days=1)

class RegistrationError(ValueError):
    """Device records that cannot be registered: `.errors` lists (line, message), at most the first
    MAX_ERRORS of them, `.total` counts them all; `.status` is the HTTP code the API answers with."""

    status = 422

    def __init__(self, errors: list[tuple[int, str]], total: int | None = None) -> None:
        self.errors = errors
        self.total = len(errors) if total is None else total
        more = f" (and {self.total - min(len(errors), 10)} more)" if self.total > 10 else ""
        super().__init__("; ".join(f"line {n}: {m}" if n else m for n, m in errors[:10]) + more)


class OutOfScope(RegistrationError):
    """Records for cities outside the caller's scope, or that would overwrite a device of another city."""

    status = 403


class NotUtf8(RegistrationError):
    """A CSV that is not UTF-8 text."""

    status = 415


class _Errors:
    """The first `cap` errors and the count of all: a file of a million bad lines costs `cap` messages."""

    def __init__(self, cap: int) -> None:
        self.cap, self.total, self.shown = cap, 0, []

    def add(self, line: int, message: str) -> None:
        self.total += 1
        if len(self.shown) < self.cap:
            self.shown.append((line, message))

    def raise_if_any(self, error: type[RegistrationError] = RegistrationError) -> None:
        if self.total:
            raise error(self.shown, self.total)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device as an operator registers it.  Its site is named either by `site_id` (a catalogue
    code) or in free text by `city`, `site_kind` and `site_name` (resolved through the catalogue's
    names and aliases; an unverified site when none matches)."""

    device_id: str
    model: str
    network: str = ""              # "": the model's network
    city: str = ""                 # division code, English or Chinese name
    site_kind: str = ""
    site_name: str = ""
    installed_at: datetime | None = None
    reporting_interval_s: int | None = None
    status: str = "active"
    site_id: str | None = None     # a catalogue site's code


@dataclass(frozen=True, slots=True)
class Registry:
    """What a record is checked against: the known models (→ pilot, → network: None for either) and
    the cities' codes and names."""

    models: dict[str, str]
    cities: dict[str, int]
    networks: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def load(cls, conn: psycopg.Connection) -> Registry:
        rows = conn.execute("SELECT model, pilot, network FROM device_models").fetchall()
        return cls({m: p for m, p, _ in rows}, _city_lookup(conn), {m: n for m, _, n in rows})

    def network(self, r: DeviceRecord) -> str:
        """The network a record registers its device on: its own, else its model's ("" if neither)."""
        return r.network or self.networks.get(r.model) or ""

    def city(self, value: str) -> int | None:
        value = str(value).strip()
        return self.cities.get(value) or self.cities.get(value.lower())


def _shown(value: object) -> str:
    """A value quoted for an error message, cut short (a 10 MB field is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…'"


def _is_text(value: str) -> bool:
    """No control characters (NUL included) and no lone surrogates (which are not UTF-8)."""
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in value)


def installed_at_problem(value: datetime) -> str | None:
    """Why an installation time cannot be stored, or None.  The window keeps every stored time
    readable back (a year-10000 time is stored by PostgreSQL but cannot be read into Python)."""
    value = _aware(value)
    latest = datetime.now(UTC) + INSTALLED_AT_AHEAD
    if not INSTALLED_AT_EARLIEST <= value <= latest:
        return (f"installed_at must lie between {INSTALLED_AT_EARLIEST.date()} and {latest.date()} "
                f"(tomorrow), not {value.isoformat()}")
    return None


def record_problems(r: DeviceRecord, registry: Registry | None = None) -> list[str]:
    """What is wrong with one record (empty: nothing); the registry's models and cities when given."""
    problems = []
    if not isinstance(r.device_id, str) or not DEVICE_ID.match(r.device_id):
        problems.append(f"device_id {_shown(r.device_id)} must be 1-64 letters, digits or _.:-")
    if not isinstance(r.model, str) or len(r.model) > 100 or not _is_text(r.model):
        problems.append(f"model {_shown(r.model)} is not a model name")
    elif registry is not None and r.model not in registry.models:
        problems.append(f"unknown model {_shown(r.model)} (known: {', '.join(sorted(registry.models))})")
    if r.network not in (*NETWORKS, ""):
        problems.append(f"network must be one of {NETWORKS} (or empty: the model's), not {_shown(r.network)}")
    elif registry is not None and r.model in registry.models:
        fixed = registry.networks.get(r.model)
        if fixed and r.network and r.network != fixed:
            problems.append(f"model {r.model} is a {fixed} model: it cannot be registered as {r.network}")
        elif not fixed and not r.network:
            problems.append(f"model {r.model} may be on either network: give network (nbiot or cat1)")
    problems.extend(_site_problems(r, registry))
    if r.installed_at is not None and (problem := installed_at_problem(r.installed_at)):
        problems.append(problem)
    if r.reporting_interval_s is not None and not 0 < r.reporting_interval_s <= MAX_REPORTING_INTERVAL_S:
        problems.append(f"reporting_interval_s must be 1..{MAX_REPORTING_INTERVAL_S} (366 days), "
                        f"not {_shown(r.reporting_interval_s)}")
    if r.status not in STATUSES:
        problems.append("status must be active, inactive or retired")
    return problems


def _site_problems(r: DeviceRecord, registry: Registry | None) -> list[str]:
    """A record's site: a catalogue code, or city, kind and name (all three); what is given is well formed."""
    problems = []
    if r.site_id is not None and (not isinstance(r.site_id, str) or not SITE_CODE.match(r.site_id)):
        problems.append(f"site_id {_shown(r.site_id)} is not a catalogue site code (1-64 letters, digits or _.:-)")
    if not isinstance(r.city, str) or len(r.city) > 50 or not _is_text(r.city) or (
            r.city and registry is not None and registry.city(r.city) is None):
        problems.append(f"unknown city {_shown(r.city)}: use a division code such as 360600 or a name such as Yingtan")
    if r.site_kind not in (*SITE_KINDS, ""):
        problems.append(f"site_kind must be one of {', '.join(SITE_KINDS)}, not {_shown(r.site_kind)}")
    if not isinstance(r.site_name, str) or len(r.site_name) > 200 or not _is_text(r.site_name):
        problems.append("site_name must be 1-200 characters without control characters")
    elif r.site_id is None:
        lacking = [what for what in ("city", "site_kind", "site_name") if getattr(r, what) == ""]
        if lacking:
            problems.append(f"{', '.join(lacking)} {'is' if len(lacking) == 1 else 'are'} empty: name the site by "
                            "site_id (a catalogue code) or by city, site_kind and site_name")
    return problems


def bundled_models() -> list[dict[str, Any]]:
    """The device models iotjx ships: the decoders' model catalogue (decoders/models/*.toml)."""
    from decoders.models import load_models

    out = []
    for name, m in load_models().items():
        out.append({
            "model": name, "codec": m.codec, "family": m.family,
            "pilot": "traffic" if m.family in ("parking", "traffic") else m.family,
            "vendor": m.vendor, "settings": m.codec_settings(), "inner_codec": m.inner_codec,
            "inner_settings": m.inner_codec_settings(), "reporting_interval_s": m.report_interval_s,
            "dedup_window_s": m.dedup_window_s, "max_payload_bytes": m.max_payload_bytes, "network": m.network,
        })
    return out


def sync_models(conn: psycopg.Connection, models: Iterable[dict[str, Any]] | None = None) -> int:
    """Upsert the device models (the catalogue is the source of truth for the ones it names).  A
    model without `max_payload_bytes` has none in the table: only the gateway's
    IOTJX_UPLINK_MAX_BYTES bounds its uplinks; one without `network` may be registered on either."""
    rows = [(m["model"], m["codec"], m["pilot"], m.get("family", m["pilot"]), m.get("vendor", ""),
             Jsonb(m.get("settings", {})), m.get("inner_codec"), Jsonb(m.get("inner_settings", {})),
             m["reporting_interval_s"], m.get("dedup_window_s"), m.get("max_payload_bytes"), m.get("network"))
            for m in (models if models is not None else bundled_models())]
    with conn.cursor() as cur:
        cur.executemany("""
            INSERT INTO device_models (model, codec, pilot, family, vendor, settings, inner_codec, inner_settings,
                                       reporting_interval_s, dedup_window_s, max_payload_bytes, network)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (model) DO UPDATE SET codec = excluded.codec, pilot = excluded.pilot,
                family = excluded.family, vendor = excluded.vendor, settings = excluded.settings,
                inner_codec = excluded.inner_codec, inner_settings = excluded.inner_settings,
                reporting_interval_s = excluded.reporting_interval_s,
                dedup_window_s = excluded.dedup_window_s,
                max_payload_bytes = excluded.max_payload_bytes, network = excluded.network""", rows)
    return len(rows)


def _city_lookup(conn: psycopg.Connection) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for code, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities"):
        lookup[str(code)] = code
        lookup[zh] = code
        lookup[zh + "市"] = code
        lookup[en.lower()] = code
    return lookup


def register_devices(conn: psycopg.Connection, records: list[DeviceRecord], *, first_line: int = 1,
                     cities: Collection[int] | None = None, max_errors: int = MAX_ERRORS,
                     lines: Sequence[int] | None = None) -> dict[str, int]:
    """Create or update devices (and their unverified sites) in one transaction, all or nothing;
    returns the counts created, updated, sites, and of those sites catalogue_sites and unverified_sites.

    A record's site is its catalogue `site_id`, or its free-text city, kind and name: a name or alias
    of a catalogue site there attaches it to that site, otherwise to an unverified site of that name.
    RegistrationError lists the bad records (numbered from `first_line`, or by `lines`: each record's
    line, for records that are not consecutive lines; the first `max_errors`);
    with `cities` (a caller's scope), OutOfScope for a record of another city (a catalogue site's own
    city for `site_id` records) or one that would overwrite a device registered in another city."""
    registry = Registry.load(conn)
    errors, outside = _Errors(max_errors), _Errors(max_errors)
    numbers = list(lines) if lines is not None else range(first_line, first_line + len(records))
    if len(numbers) != len(records):
        raise ValueError(f"{len(records)} records but {len(numbers)} line numbers")
    seen: set[str] = set()
    for n, r in zip(numbers, records, strict=True):
        for problem in record_problems(r, registry):
            errors.add(n, problem)
        if r.device_id in seen:
            errors.add(n, f"device_id {r.device_id} appears twice")
        seen.add(r.device_id)
        if cities is not None and r.site_id is None and registry.city(r.city) not in cities:
            outside.add(n, f"city {_shown(r.city)} is outside this key's cities")
    errors.raise_if_any()
    outside.raise_if_any(OutOfScope)
    with conn.transaction(), conn.cursor() as cur:
        catalogue = _catalogue_sites(cur, records, registry, numbers, errors, outside, cities)
        errors.raise_if_any()
        outside.raise_if_any(OutOfScope)
        # Locked, so that the counts and the scope check hold until commit.
        existing = dict(cur.execute("""SELECT d.device_id, s.city_code FROM devices d LEFT JOIN sites s USING (site_id)
                                       WHERE d.device_id = ANY(%s) FOR UPDATE OF d""", (list(seen),)).fetchall())
        if cities is not None:
            for n, r in zip(numbers, records, strict=True):
                if r.device_id in existing and existing[r.device_id] not in cities:
                    outside.add(n, f"device {r.device_id} cannot be registered with this key")
            outside.raise_if_any(OutOfScope)
        site_keys = sorted({(registry.city(r.city), r.site_kind, r.site_name) for i, r in enumerate(records)
                            if catalogue[i] is None})
        columns = [list(c) for c in zip(*site_keys, strict=True)] if site_keys else [[], [], []]
        cur.execute("""INSERT INTO sites (city_code, kind, name)
                       SELECT * FROM unnest(%s::integer[], %s::text[], %s::text[])
                       ON CONFLICT (city_code, kind, name) DO NOTHING""", columns)
        unverified = {(c, k, n): i for i, c, k, n in cur.execute("""
            SELECT s.site_id, s.city_code, s.kind, s.name FROM sites s
            JOIN unnest(%s::integer[], %s::text[], %s::text[]) AS u(c, k, n)
              ON s.city_code = u.c AND s.kind = u.k AND s.name = u.n""", columns)}
        site_ids = [catalogue[i] if catalogue[i] is not None
                    else unverified[(registry.city(r.city), r.site_kind, r.site_name)] for i, r in enumerate(records)]
        # executemany runs in pipeline mode: 100,000 devices in a few round trips' time, not 100,000.
        cur.executemany("""
            INSERT INTO devices (device_id, model, pilot, network, site_id, installed_at, status, reporting_interval_s)
            VALUES (%s, %s, %s, %s, %s, coalesce(%s, now()), %s, %s)
            ON CONFLICT (device_id) DO UPDATE SET model = excluded.model, pilot = excluded.pilot,
                network = excluded.network, site_id = excluded.site_id,
                installed_at = coalesce(%s, devices.installed_at), status = excluded.status,
                reporting_interval_s = excluded.reporting_interval_s""",
            [(r.device_id, r.model, registry.models[r.model], registry.network(r), site_id, r.installed_at, r.status,
              r.reporting_interval_s, r.installed_at) for r, site_id in zip(records, site_ids, strict=True)])
    created = len(seen) - len(existing)
    in_catalogue = {i for i in catalogue if i is not None}
    return {"created": created, "updated": len(records) - created, "sites": len(set(site_ids)),
            "catalogue_sites": len(in_catalogue), "unverified_sites": len(set(site_ids) - in_catalogue)}


def _catalogue_sites(cur: psycopg.Cursor, records: list[DeviceRecord], registry: Registry, numbers: Sequence[int],
                     errors: _Errors, outside: _Errors, cities: Collection[int] | None) -> list[int | None]:
    """Each record's catalogue site (its row id), or None where its free text names none: by
    `site_id` (which must exist and agree with any city, kind and name also given), else by a name or
    alias of a catalogue site in the record's city and kind."""
    from .sites import name_key

    codes = sorted({r.site_id for r in records if r.site_id is not None})
    by_code: dict[str, tuple[int, int, str, str]] = {}
    names: dict[int, set[str]] = {}
    if codes:
        for code, site_id, city, kind, name in cur.execute(
                "SELECT code, site_id, city_code, kind, name FROM sites WHERE code = ANY(%s)", (codes,)):
            by_code[code] = (site_id, city, kind, name)
        for site_id, key in cur.execute("SELECT site_id, name_key FROM site_names WHERE site_id = ANY(%s)",
                                        ([v[0] for v in by_code.values()],)):
            names.setdefault(site_id, set()).add(key)
    free = sorted({(registry.city(r.city), r.site_kind, name_key(r.site_name)) for r in records if r.site_id is None})
    by_name: dict[tuple[int, str, str], int] = {}
    if free:
        by_name = {(c, k, nk): i for c, k, nk, i in cur.execute("""
            SELECT n.city_code, n.kind, n.name_key, n.site_id FROM site_names n
            JOIN unnest(%s::integer[], %s::text[], %s::text[]) AS u(c, k, nk)
              ON n.city_code = u.c AND n.kind = u.k AND n.name_key = u.nk""",
            [list(c) for c in zip(*free, strict=True)])}
    out: list[int | None] = []
    for n, r in zip(numbers, records, strict=True):
        if r.site_id is None:
            out.append(by_name.get((registry.city(r.city), r.site_kind, name_key(r.site_name))))
            continue
        site = by_code.get(r.site_id)
        if site is None:
            errors.add(n, f"unknown site_id {_shown(r.site_id)}: not a code of the site catalogue")
            out.append(None)
            continue
        site_id, city, kind, name = site
        if r.city and registry.city(r.city) != city:
            errors.add(n, f"site {r.site_id} is in city {city}, not {_shown(r.city)}")
        if r.site_kind and r.site_kind != kind:
            errors.add(n, f"site {r.site_id} is a {kind}, not a {r.site_kind}")
        if r.site_name and name_key(r.site_name) not in names.get(site_id, ()):
            errors.add(n, f"site {r.site_id} is {_shown(name)}: {_shown(r.site_name)} is not one of its names")
        if cities is not None and city not in cities:
            outside.add(n, f"site {r.site_id} is in a city outside this key's cities")
        out.append(site_id)
    return out


def parse_csv(source: str | Iterable[str], *, registry: Registry | None = None,
              max_errors: int = MAX_ERRORS) -> list[DeviceRecord]:
    """Device records from CSV with a header row, read a line at a time from `source` (text, a text
    file or any iterable of lines).  RegistrationError naming the first `max_errors` bad lines and
    counting all of them; with `registry`, unknown models and cities and repeated ids are found here
    too.  Once a line is bad no more records are kept (none will be registered), so a large bad
    file costs the error list, not the file.  NotUtf8 when the text cannot be decoded."""
    lines = io.StringIO(source, newline="") if isinstance(source, str) else source
    errors = _Errors(max_errors)
    try:
        records = _parse_csv(csv.DictReader(_without_bom(lines)), errors, registry)
    except UnicodeDecodeError as exc:
        raise NotUtf8([(0, f"the CSV must be UTF-8 ({exc.reason} at byte {exc.start} of a chunk)")]) from None
    errors.raise_if_any()
    return records


@dataclass(frozen=True, slots=True)
class ParsedRows:
    """A CSV read row by row: the good records with their lines, and every bad line's reasons."""

    records: list[DeviceRecord]
    lines: list[int]                       # records[i] is on lines[i]
    errors: list[tuple[int, str]]          # (line, reason), the first `max_errors`
    errors_total: int
    bad_lines: int                         # lines with at least one reason


def parse_csv_rows(source: str | Iterable[str], *, registry: Registry | None = None,
                   max_errors: int = 10_000) -> ParsedRows:
    """As `parse_csv`, but a bad line is set aside with its reasons and the good ones are kept (the
    second of two lines with one device_id is the bad one).  RegistrationError only for what spoils
    the whole file: a header without the required columns, or a line that is not CSV (the reader
    cannot go on past it); NotUtf8 for text that is not UTF-8."""
    lines = io.StringIO(source, newline="") if isinstance(source, str) else source
    whole, errors = _Errors(max_errors), _Errors(max_errors)
    records: list[DeviceRecord] = []
    numbers: list[int] = []
    bad: set[int] = set()
    seen: set[str] = set()
    try:
        for line, fields in csv_rows(csv.DictReader(_without_bom(lines)), whole, CSV_COLUMNS, CSV_OPTIONAL):
            try:
                problems = record_problems(record := _record(fields), registry)
            except ValueError as exc:
                problems, record = [str(exc)], None
            if record is not None and record.device_id in seen:
                problems.append(f"device_id {record.device_id} appears twice")
            for problem in problems:
                errors.add(line, problem)
            if problems:
                bad.add(line)
                continue
            seen.add(record.device_id)
            records.append(record)
            numbers.append(line)
    except UnicodeDecodeError as exc:
        raise NotUtf8([(0, f"the CSV must be UTF-8 ({exc.reason} at byte {exc.start} of a chunk)")]) from None
    whole.raise_if_any()
    return ParsedRows(records, numbers, errors.shown, errors.total, len(bad))


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    it = iter(lines)
    for first in it:
        yield first.lstrip("\ufeff")
        break
    yield from it


def csv_rows(reader: csv.DictReader, errors: _Errors, required: tuple[str, ...], optional: tuple[str, ...],
             offset: Callable[[], int] = lambda: 0) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped fields) of each data row of a CSV with a header; a header without a
    `required` column, or a line that is not CSV (after which the reader cannot go on), is an error and
    ends the rows.  `offset()`: lines before what the reader saw (comments), so that lines are the file's."""
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        errors.add(1, f"not CSV: {exc}")
        return
    missing = [c for c in required if c not in header]
    if missing:
        errors.add(offset() + 1, f"header lacks column(s) {', '.join(missing)}; "
                                 f"expected {', '.join(required)} (+ optional {', '.join(optional)})")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:          # the reader cannot go on after this (e.g. an overlong field)
            errors.add(offset() + reader.line_num, f"not CSV: {exc}")
            return
        yield offset() + reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items()
                                           if isinstance(k, str) and isinstance(v, str)}


def _parse_csv(reader: csv.DictReader, errors: _Errors, registry: Registry | None) -> list[DeviceRecord]:
    records: list[DeviceRecord] = []
    seen: set[str] = set()
    for line, fields in csv_rows(reader, errors, CSV_COLUMNS, CSV_OPTIONAL):
        try:
            record = _record(fields)
        except ValueError as exc:
            errors.add(line, str(exc))
            continue
        problems = record_problems(record, registry)
        if registry is not None and record.device_id in seen:
            problems.append(f"device_id {record.device_id} appears twice")
        for problem in problems:
            errors.add(line, problem)
        if errors.total:
            records.clear()
            seen.clear()
            continue
        seen.add(record.device_id)
        records.append(record)
    return [] if errors.total else records


def _record(row: dict[str, str]) -> DeviceRecord:
    installed = row.get("installed_at") or None
    interval = row.get("reporting_interval_s") or None
    if interval is not None and not re.fullmatch(r"[+-]?[0-9]{1,12}", interval):
        raise ValueError(f"reporting_interval_s {_shown(interval)} is not a whole number of seconds up to "
                         f"{MAX_REPORTING_INTERVAL_S}")
    try:
        when = _aware(datetime.fromisoformat(installed)) if installed else None
    except ValueError:
        raise ValueError(f"installed_at {_shown(installed)} is not an ISO 8601 time "
                         "(e.g. 2025-03-01T08:00:00+08:00)") from None
    # sys.intern: a 100,000-line file repeats a few models, cities and kinds; one copy of each is kept.
    return DeviceRecord(
        device_id=row.get("device_id", ""), model=sys.intern(row.get("model", "")),
        network=sys.intern(row.get("network", "")), city=sys.intern(row.get("city", "")),
        site_kind=sys.intern(row.get("site_kind", "")), site_name=row.get("site_name", ""),
        site_id=row.get("site_id") or None, installed_at=when, reporting_interval_s=int(interval) if interval else None,
        status=sys.intern(row.get("status") or "active"))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = ["MAX_ERRORS", "PILOTS", "DeviceRecord", "NotUtf8", "OutOfScope", "RegistrationError", "Registry",
           "ParsedRows", "bundled_models", "installed_at_problem", "parse_csv", "parse_csv_rows", "record_problems",
           "register_devices", "sync_models"]
