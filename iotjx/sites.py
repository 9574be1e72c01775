"""The site catalogue: the sites a plan target counts, imported by operators with stable codes.

Guarantees: an import is all or nothing (one transaction); every name a catalogue site is known by
(official name and aliases) is one row of `site_names`, keyed by `name_key`, unique per city and
kind, so that a device naming a site in free text resolves to at most one catalogue site; an
unverified site (one a device import created from free text, `code` NULL) whose name is one of a
catalogue site's names is absorbed by that site (its devices move, the row goes).  A CSV is read a
line at a time and, once a line is bad, keeps only the error list (as `iotjx.devices.parse_csv`).

The denominators of the plan's site targets come from here, never from which sites have devices."""

from __future__ import annotations

import csv
import io
import re
import sys
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date
from importlib import resources

import psycopg

from .devices import (MAX_ERRORS, SITE_KINDS, NotUtf8, OutOfScope, RegistrationError, Registry, _Errors, _is_text,
                      _shown, _without_bom, csv_rows)

SITE_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
SITE_STATUSES = ("active", "closed")
SCENIC_GRADES = ("1A", "2A", "3A", "4A", "5A")
MAX_ALIASES = 20
MAX_NAME = 200
MAX_GRADE = 20
EARLIEST, LATEST = date(2000, 1, 1), date(2100, 12, 31)
CSV_COLUMNS = ("site_id", "city", "kind", "name")
CSV_OPTIONAL = ("aliases", "grade", "model_site", "model_site_since", "status", "opened_on", "closed_on", "district")
MAX_DISTRICT = 50
ALIAS_SEPARATOR = "|"
_TRUE, _FALSE = ("true", "yes", "1", "y", "t"), ("false", "no", "0", "n", "f", "")
_WHITESPACE = re.compile(r"\s+")


class SiteError(RegistrationError):
    """Catalogue records that cannot be imported: `.errors` lists (line, message), `.total` counts them."""


def name_key(name: str) -> str:
    """The form names are matched in: NFKC, casefolded, whitespace runs as one space, stripped
    (so "庐山 风景区", "庐山　风景区" (ideographic space) and "Lushan" / "LUSHAN" match)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", name).casefold()).strip()


@dataclass(frozen=True, slots=True)
class SiteRecord:
    """One site of the catalogue as an operator imports it."""

    site_id: str                       # the catalogue's stable code, e.g. JX-SS-0001
    city: str                          # division code, English or Chinese name
    kind: str                          # one of iotjx.devices.SITE_KINDS
    name: str                          # the official name
    aliases: tuple[str, ...] = ()
    grade: str | None = None           # 1A..5A for scenic spots
    model_site: bool = False
    model_site_since: date | None = None
    status: str = "active"
    opened_on: date | None = None
    closed_on: date | None = None
    district: str | None = None        # county-level division (区/县): GB/T 2260 code, or its name within the city

    def keys(self) -> list[str]:
        """The name keys this site is known by, official name first, without repeats."""
        out: list[str] = []
        for n in (self.name, *self.aliases):
            if isinstance(n, str) and (k := name_key(n)) and k not in out:
                out.append(k)
        return out


def _name_problem(what: str, value: object) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME or not _is_text(value) or not name_key(value):
        return f"{what} {_shown(value)} must be 1-{MAX_NAME} characters without control characters"
    return None


def _date_problem(what: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, date):
        return f"{what} {_shown(value)} is not a date"
    if not EARLIEST <= value <= LATEST:
        return f"{what} must lie between {EARLIEST} and {LATEST}, not {value}"
    return None


def site_problems(r: SiteRecord, registry: Registry | None = None) -> list[str]:
    """What is wrong with one catalogue record (empty: nothing); cities checked against the registry when given."""
    problems = []
    if not isinstance(r.site_id, str) or not SITE_CODE.match(r.site_id):
        problems.append(f"site_id {_shown(r.site_id)} must be 1-64 letters, digits or _.:- (e.g. JX-SS-0001)")
    if not isinstance(r.city, str) or not r.city or len(r.city) > 50 or not _is_text(r.city) or (
            registry is not None and registry.city(r.city) is None):
        problems.append(f"unknown city {_shown(r.city)}: use a division code such as 360600 or a name such as Yingtan")
    if r.kind not in SITE_KINDS:
        problems.append(f"kind must be one of {', '.join(SITE_KINDS)}, not {_shown(r.kind)}")
    if problem := _name_problem("name", r.name):
        problems.append(problem)
    if not isinstance(r.aliases, tuple | list) or len(r.aliases) > MAX_ALIASES:
        problems.append(f"at most {MAX_ALIASES} aliases")
    else:
        problems.extend(p for a in r.aliases if (p := _name_problem("alias", a)))
    if r.grade is not None and r.grade != "":
        if r.kind == "scenic_spot" and r.grade not in SCENIC_GRADES:
            problems.append(f"a scenic spot's grade is one of {' '.join(SCENIC_GRADES)}, not {_shown(r.grade)}")
        elif not isinstance(r.grade, str) or len(r.grade) > MAX_GRADE or not _is_text(r.grade):
            problems.append(f"grade {_shown(r.grade)} must be at most {MAX_GRADE} characters")
    if not isinstance(r.model_site, bool):
        problems.append(f"model_site must be true or false, not {_shown(r.model_site)}")
    for what in ("model_site_since", "opened_on", "closed_on"):
        if problem := _date_problem(what, getattr(r, what)):
            problems.append(problem)
    if r.model_site_since is not None and not r.model_site:
        problems.append("model_site_since is given but the site is not a model site (model_site false)")
    if r.status not in SITE_STATUSES:
        problems.append(f"status must be active or closed, not {_shown(r.status)}")
    elif r.status == "closed" and r.closed_on is None:
        problems.append("a closed site needs closed_on (the day it left the catalogue)")
    elif r.status == "active" and r.closed_on is not None:
        problems.append("closed_on is given but status is active (leave status empty or write closed)")
    if isinstance(r.opened_on, date) and isinstance(r.closed_on, date) and r.closed_on < r.opened_on:
        problems.append(f"closed_on {r.closed_on} is before opened_on {r.opened_on}")
    if r.district is not None and (not isinstance(r.district, str) or not 1 <= len(r.district) <= MAX_DISTRICT
                                   or not _is_text(r.district)):
        problems.append(f"district {_shown(r.district)} must be a division code such as 360102 or a name such as "
                        f"东湖区 (at most {MAX_DISTRICT} characters)")
    return problems


class Districts:
    """The `districts` table (migration 15): a record's district resolved within its city."""

    def __init__(self, rows: Iterable[tuple[int, str, str, int]]) -> None:
        self.rows = {code: (zh, en, city) for code, zh, en, city in rows}
        self.by_name: dict[tuple[int, str], int] = {}
        for code, (zh, en, city) in self.rows.items():
            for n in (zh, en):
                self.by_name[(city, name_key(n))] = code

    @classmethod
    def load(cls, conn: psycopg.Connection) -> Districts:
        return cls(conn.execute("SELECT code, name_zh, name_en, city_code FROM districts").fetchall())

    def resolve(self, value: str, city: int, city_label: str) -> tuple[int | None, str | None]:
        """(code, None) for a district of `city`, else (None, why not)."""
        if value.isascii() and value.isdigit():
            code = int(value)
            if code not in self.rows:
                return None, (f"unknown district {_shown(value)}: not one of the county-level divisions this system "
                              f"knows (GB/T 2260, table districts)")
            zh, _, other = self.rows[code]
            if other != city:
                return None, (f"district {code} ({zh}) belongs to city {other}, not to this site's city "
                              f"{city_label} ({city})")
            return code, None
        code = self.by_name.get((city, name_key(value)))
        if code is None:
            some = next((zh for _, (zh, _, c) in sorted(self.rows.items()) if c == city), "东湖区")
            return None, (f"unknown district {_shown(value)} in city {city_label} ({city}): give its division code "
                          f"(e.g. 360102) or its name within the city (e.g. {some})")
        return code, None


# ----------------------------------------------------------------------------- CSV

def parse_sites_csv(source: str | Iterable[str], *, registry: Registry | None = None,
                    max_errors: int = MAX_ERRORS) -> list[SiteRecord]:
    """Catalogue records from CSV with a header row, read a line at a time (text, a text file or any
    iterable of lines).  RegistrationError naming the first `max_errors` bad lines and counting all;
    a site id twice in the file is an error; NotUtf8 when the text cannot be decoded."""
    lines = io.StringIO(source, newline="") if isinstance(source, str) else source
    errors = _Errors(max_errors)
    comments: list[int] = [0]
    try:
        records = _parse(csv.DictReader(_without_comments(_without_bom(lines), comments)), errors, registry,
                         comments)
    except UnicodeDecodeError as exc:
        raise NotUtf8([(0, f"the CSV must be UTF-8 ({exc.reason} at byte {exc.start} of a chunk)")]) from None
    errors.raise_if_any(SiteError)
    return records


def _without_comments(lines: Iterable[str], comments: list[int]) -> Iterable[str]:
    """The lines but those starting with '#' before the header: comments (the sample catalogue says
    what it is); `comments[0]` counts them, so that errors name the file's own line numbers."""
    it = iter(lines)
    for line in it:
        if line.startswith("#"):
            comments[0] += 1
            continue
        yield line
        break
    yield from it


def _parse(reader: csv.DictReader, errors: _Errors, registry: Registry | None,
           comments: list[int]) -> list[SiteRecord]:
    records: list[SiteRecord] = []
    seen: dict[str, int] = {}
    for line, fields in csv_rows(reader, errors, CSV_COLUMNS, CSV_OPTIONAL, lambda: comments[0]):
        try:
            record = _record(fields)
        except ValueError as exc:
            errors.add(line, str(exc))
            continue
        problems = site_problems(record, registry)
        if record.site_id in seen:
            problems.append(f"site_id {record.site_id} appears twice (first on line {seen[record.site_id]})")
        for problem in problems:
            errors.add(line, problem)
        seen.setdefault(record.site_id, line)
        if errors.total:
            records.clear()
            continue
        records.append(record)
    return [] if errors.total else records


def _date(row: dict[str, str], column: str) -> date | None:
    value = row.get(column) or None
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{column} {_shown(value)} is not an ISO date (e.g. 2024-05-01)") from None


def _record(row: dict[str, str]) -> SiteRecord:
    model_site = (row.get("model_site") or "").lower()
    if model_site not in _TRUE + _FALSE:
        raise ValueError(f"model_site {_shown(row.get('model_site'))} must be true/false, yes/no or 1/0")
    aliases = tuple(a.strip() for a in (row.get("aliases") or "").split(ALIAS_SEPARATOR) if a.strip())
    closed_on = _date(row, "closed_on")
    status = row.get("status") or ("closed" if closed_on else "active")
    return SiteRecord(site_id=row.get("site_id", ""), city=sys.intern(row.get("city", "")),
                      kind=sys.intern(row.get("kind", "")), name=row.get("name", ""), aliases=aliases,
                      grade=row.get("grade") or None, model_site=model_site in _TRUE,
                      model_site_since=_date(row, "model_site_since"), status=status,
                      opened_on=_date(row, "opened_on"), closed_on=closed_on,
                      district=(row.get("district") or "").strip() or None)


def load_sample_sites() -> list[SiteRecord]:
    """The sample catalogue bundled for the demo and the tests (iotjx/targets/sites-sample.csv): real
    public facts for the 5A scenic spots and a few others, invented communities and zones.  It is a
    sample, not the official list: the programme office imports its own."""
    text = resources.files("iotjx.targets").joinpath("sites-sample.csv").read_text(encoding="utf-8")
    return parse_sites_csv(text)


# ----------------------------------------------------------------------------- import

def import_sites(conn: psycopg.Connection, records: list[SiteRecord], *, first_line: int = 1,
                 cities: Collection[int] | None = None, max_errors: int = MAX_ERRORS) -> dict[str, int]:
    """Create or update catalogue sites by code in one transaction, all or nothing; returns the counts
    `created`, `updated`, `merged_unverified` (unverified sites that became part of a catalogue site:
    adopted or absorbed) and `devices_moved` (devices re-pointed from absorbed sites).

    RegistrationError lists bad records (numbered from `first_line`) and names that would be ambiguous
    (a name or alias of two catalogue sites in one city and kind, naming both ids); with `cities` (a
    caller's scope), OutOfScope for a record of another city or one updating a site of another city."""
    registry = Registry.load(conn)
    errors, outside = _Errors(max_errors), _Errors(max_errors)
    seen: dict[str, int] = {}
    for n, r in enumerate(records, start=first_line):
        for problem in site_problems(r, registry):
            errors.add(n, problem)
        if r.site_id in seen:
            errors.add(n, f"site_id {r.site_id} appears twice (first at {seen[r.site_id]})")
        seen.setdefault(r.site_id, n)
        if cities is not None and registry.city(r.city) not in cities:
            outside.add(n, f"city {_shown(r.city)} is outside this key's cities")
    errors.raise_if_any(SiteError)
    outside.raise_if_any(OutOfScope)
    city_of = [registry.city(r.city) for r in records]
    district_of: list[int | None] = []
    if any(r.district for r in records):
        districts = Districts.load(conn)
        for n, (r, city) in enumerate(zip(records, city_of, strict=True), start=first_line):
            code, problem = districts.resolve(r.district, city, r.city) if r.district else (None, None)
            if problem:
                errors.add(n, problem)
            district_of.append(code)
        errors.raise_if_any(SiteError)
    else:
        district_of = [None] * len(records)
    # Within the file: one key, one site (per city and kind).
    owner: dict[tuple[int, str, str], str] = {}
    for n, (r, city) in enumerate(zip(records, city_of, strict=True), start=first_line):
        for key in r.keys():
            other = owner.setdefault((city, r.kind, key), r.site_id)
            if other != r.site_id:
                errors.add(n, f"the name {_shown(key)} would belong to both {other} and {r.site_id} "
                              f"({r.kind} in {city}): a name or alias must name one site")
    errors.raise_if_any(SiteError)
    line_of = {r.site_id: n for n, r in enumerate(records, start=first_line)}
    codes = list(line_of)
    try:
        with conn.transaction(), conn.cursor() as cur:
            return _import(cur, records, city_of, district_of, owner, codes, line_of, cities, errors, outside)
    except psycopg.errors.UniqueViolation as exc:
        # Names swapped between catalogue sites in one import can still meet the (city, kind, name) key.
        raise SiteError([(0, f"two sites would have the same official name: "
                                     f"{exc.diag.message_detail or exc}")]) from None


def _import(cur: psycopg.Cursor, records: list[SiteRecord], city_of: list[int | None],
            district_of: list[int | None], owner: dict[tuple[int, str, str], str], codes: list[str], line_of: dict[str, int],
            cities: Collection[int] | None, errors: _Errors, outside: _Errors) -> dict[str, int]:
    # Locked, so that the counts, the scope and the ambiguity checks hold until commit.
    existing = {code: (site_id, city) for site_id, code, city in cur.execute(
        "SELECT site_id, code, city_code FROM sites WHERE code = ANY(%s) ORDER BY site_id FOR UPDATE",
        (codes,)).fetchall()}
    if cities is not None:
        for code, (_, city) in existing.items():
            if city not in cities:
                outside.add(line_of[code], f"site {code} belongs to a city outside this key's cities")
        outside.raise_if_any(OutOfScope)
    # Against the catalogue: a key held by a site this import does not rewrite.
    keys = [list(c) for c in zip(*owner, strict=True)] if owner else [[], [], []]
    for city, kind, key, code in cur.execute("""
            SELECT n.city_code, n.kind, n.name_key, s.code FROM site_names n JOIN sites s USING (site_id)
            JOIN unnest(%s::integer[], %s::text[], %s::text[]) AS u(c, k, nk)
              ON n.city_code = u.c AND n.kind = u.k AND n.name_key = u.nk
            WHERE s.code <> ALL(%s)""", (*keys, codes)):
        mine = owner[(city, kind, key)]
        errors.add(line_of[mine], f"the name {_shown(key)} of {mine} is already a name of {code} "
                                  f"({kind} in {city}): a name or alias must name one site")
    errors.raise_if_any(SiteError)
    # Unverified sites of the same cities and kinds whose name is one of a record's keys.
    pairs = sorted({(c, r.kind) for r, c in zip(records, city_of, strict=True)})
    pair_cols = [list(c) for c in zip(*pairs, strict=True)] if pairs else [[], []]
    adopt: dict[str, int] = {}                 # code → the unverified row that becomes it
    absorb: list[tuple[int, str]] = []         # (unverified row, code) to fold into that code's site
    unverified = cur.execute("""
        SELECT s.site_id, s.city_code, s.kind, s.name FROM sites s
        JOIN unnest(%s::integer[], %s::text[]) AS u(c, k) ON s.city_code = u.c AND s.kind = u.k
        WHERE s.code IS NULL ORDER BY s.site_id FOR UPDATE OF s""", pair_cols).fetchall()
    official = {(c, r.kind, r.name): r.site_id for r, c in zip(records, city_of, strict=True)}
    for site_id, city, kind, name in unverified:
        code = official.get((city, kind, name))
        if code is not None and code not in existing and code not in adopt:
            adopt[code] = site_id
        elif (code := owner.get((city, kind, name_key(name)))) is not None:
            absorb.append((site_id, code))
    if adopt:
        cur.execute("""UPDATE sites s SET code = u.code, updated_at = now()
                       FROM unnest(%s::text[], %s::bigint[]) AS u(code, site_id) WHERE s.site_id = u.site_id""",
                    (list(adopt), list(adopt.values())))
    known = {code: site_id for code, (site_id, _) in existing.items()} | adopt
    moved = _absorb(cur, [(u, known[c]) for u, c in absorb if c in known])
    columns = list(zip(*[(r.site_id, c, r.kind, r.name, r.grade or None, r.model_site, r.model_site_since,
                          r.status, r.opened_on, r.closed_on, dc)
                         for r, c, dc in zip(records, city_of, district_of, strict=True)],
                       strict=True)) if records else [()] * 11
    rows = cur.execute("""
        INSERT INTO sites (code, city_code, kind, name, grade, model_site, model_site_since, status,
                           opened_on, closed_on, district_code)
        SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[], %s::text[], %s::text[], %s::boolean[],
                             %s::date[], %s::text[], %s::date[], %s::date[], %s::integer[])
        ON CONFLICT (code) DO UPDATE SET city_code = excluded.city_code, kind = excluded.kind,
            name = excluded.name, grade = excluded.grade, model_site = excluded.model_site,
            model_site_since = excluded.model_site_since, status = excluded.status,
            opened_on = excluded.opened_on, closed_on = excluded.closed_on,
            district_code = excluded.district_code, updated_at = now()
        RETURNING code, site_id""", [list(c) for c in columns]).fetchall()
    site_of = dict(rows)
    moved += _absorb(cur, [(u, site_of[c]) for u, c in absorb if c not in known])
    # Every name of every imported site, replaced.
    names = [(c, r.kind, key, site_of[r.site_id], n, i > 0)
             for r, c in zip(records, city_of, strict=True)
             for i, (key, n) in enumerate(_named_keys(r))]
    ids = list(site_of.values())
    cur.execute("DELETE FROM site_names WHERE site_id = ANY(%s)", (ids,))
    name_cols = [list(c) for c in zip(*names, strict=True)] if names else [[]] * 6
    cur.execute("""INSERT INTO site_names (city_code, kind, name_key, site_id, name, is_alias)
                   SELECT * FROM unnest(%s::integer[], %s::text[], %s::text[], %s::bigint[], %s::text[],
                                        %s::boolean[])""", name_cols)
    created = len(records) - len(existing)
    return {"created": created, "updated": len(existing), "merged_unverified": len(adopt) + len(absorb),
            "devices_moved": moved}


# ----------------------------------------------------------------------------- reading

_COLUMNS = ("site_id", "verified", "city", "kind", "name", "aliases", "grade", "model_site", "model_site_since",
            "status", "opened_on", "closed_on", "district_code", "district_name_zh", "district_name_en", "active",
            "inactive")
_SELECT = """
    SELECT s.code, s.code IS NOT NULL, s.city_code, s.kind, s.name,
           coalesce((SELECT array_agg(n.name ORDER BY n.name) FROM site_names n
                     WHERE n.site_id = s.site_id AND n.is_alias), '{}'),
           s.grade, s.model_site, s.model_site_since, s.status, s.opened_on, s.closed_on,
           s.district_code, (SELECT di.name_zh FROM districts di WHERE di.code = s.district_code),
           (SELECT di.name_en FROM districts di WHERE di.code = s.district_code),
           (SELECT count(*) FROM devices d WHERE d.site_id = s.site_id AND d.status = 'active'),
           (SELECT count(*) FROM devices d WHERE d.site_id = s.site_id AND d.status = 'inactive')
    FROM sites s"""
_WHERE = """
    WHERE (%(city)s::integer IS NULL OR s.city_code = %(city)s)
      AND (%(cities)s::integer[] IS NULL OR s.city_code = ANY(%(cities)s))
      AND (%(kind)s::text IS NULL OR s.kind = %(kind)s)
      AND (%(verified)s::boolean IS NULL OR (s.code IS NOT NULL) = %(verified)s)
      AND (%(status)s::text IS NULL OR s.status = %(status)s)"""


_ORDER = "(s.code IS NULL)::int, coalesce(s.code, ''), s.city_code, s.kind, s.name, s.site_id"


def list_sites(conn: psycopg.Connection, *, city: int | None = None, cities: Collection[int] | None = None,
               kind: str | None = None, verified: bool | None = None, status: str | None = None,
               limit: int = 100, after: tuple | None = None) -> tuple[int, list[dict]]:
    """(how many sites match, one page of them): catalogue sites by code, then unverified ones; each
    with its aliases and its active and inactive devices (retired ones are not counted).  `cities`
    is a caller's scope.  Each row's `sort_key` is its place in that order: `after` one, the page
    starts behind it (keyset pagination)."""
    params = {"city": city, "cities": list(cities) if cities is not None else None, "kind": kind,
              "verified": verified, "status": status, "limit": limit, "after": list(after) if after else None}
    total = conn.execute(f"SELECT count(*) FROM sites s {_WHERE}", params).fetchone()[0]
    page = "" if after is None else (f" AND ({_ORDER}) > (%(a0)s::int, %(a1)s::text, %(a2)s::int, %(a3)s::text, "
                                     "%(a4)s::text, %(a5)s::bigint)")
    params.update({f"a{k}": v for k, v in enumerate(after or ())})
    rows = conn.execute(f"""{_SELECT.replace("FROM sites s", f", {_ORDER} FROM sites s")} {_WHERE} {page}
                            ORDER BY {_ORDER} LIMIT %(limit)s""", params).fetchall()
    return total, [{**dict(zip(_COLUMNS, r[:len(_COLUMNS)], strict=True)), "sort_key": tuple(r[len(_COLUMNS):])}
                   for r in rows]


def get_site(conn: psycopg.Connection, code: str) -> dict | None:
    """One catalogue site as `list_sites` gives it, or None."""
    row = conn.execute(f"{_SELECT} WHERE s.code = %s", (code,)).fetchone()
    return None if row is None else dict(zip(_COLUMNS, row, strict=True))


def _named_keys(r: SiteRecord) -> list[tuple[str, str]]:
    """(key, name as written) for the official name then each alias, a key once."""
    out: dict[str, str] = {}
    for n in (r.name, *r.aliases):
        out.setdefault(name_key(n), n)
    return list(out.items())


def _absorb(cur: psycopg.Cursor, moves: list[tuple[int, int]]) -> int:
    """Re-point the devices of unverified sites to catalogue sites and delete the unverified rows;
    the number of devices moved."""
    if not moves:
        return 0
    old, new = [list(c) for c in zip(*moves, strict=True)]
    cur.execute("""UPDATE devices d SET site_id = u.new FROM unnest(%s::bigint[], %s::bigint[]) AS u(old, new)
                   WHERE d.site_id = u.old""", (old, new))
    moved = cur.rowcount
    cur.execute("DELETE FROM sites WHERE site_id = ANY(%s) AND code IS NULL", (old,))
    return moved


__all__ = ["SITE_CODE", "Districts", "SiteError", "SiteRecord", "get_site", "import_sites", "list_sites", "load_sample_sites", "name_key", "parse_sites_csv",
           "site_problems"]
