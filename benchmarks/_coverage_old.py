"""The old `/coverage` path, kept for comparison: `analytics/coverage.py` at commit c5a11fd —
one statement per target, each rescanning the registry (issue 12).

Adapted only where it had to be, and nothing in its SQL's shape changed:

* its targets come from the new catalogue format (`old_targets`): `site_share` / `sites_meeting`
  become its "sites of kind K (city) with at least one live device (of pilot P)", with K the kinds
  of the target's site criteria and P the pilots of its device families (pilot = "traffic" for
  families traffic and parking, else the family) — grades, model sites, `min_live` and
  `min_live_share` are ignored; `live_devices` becomes its city / pilot / network count;
* an operator target reads the latest entry of `target_progress_log` (migration 8 replaced its
  `target_progress` table).

Its figures differ from the new path's (the definitions changed); only its time is compared."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg

_DEVICES = """
    WITH dev AS (
        SELECT d.device_id, d.pilot, d.network, d.site_id, s.city_code, s.kind AS site_kind,
               coalesce(d.status = 'active' AND st.last_seen >= %(now)s - make_interval(
                   secs => %(factor)s * coalesce(d.reporting_interval_s, m.reporting_interval_s)), false) AS live
        FROM devices d
        JOIN device_models m USING (model)
        LEFT JOIN sites s USING (site_id)
        LEFT JOIN device_state st USING (device_id)
        WHERE d.status <> 'retired')
"""


@dataclass(frozen=True, slots=True)
class OldTarget:
    """A target as the old code saw it (iotjx.targets.CoverageTarget at c5a11fd, lists for kind and pilot)."""

    target_id: str
    source: str
    value: float
    unit: str
    deadline: date
    measure: str                         # site_share / sites_with_live / live_devices / operator
    city: int | None = None
    pilots: tuple[str, ...] | None = None
    network: str | None = None
    site_kinds: tuple[str, ...] | None = None


def _pilot(family: str) -> str:
    return "traffic" if family in ("traffic", "parking") else family


def old_targets(path: Path) -> list[OldTarget]:
    """The catalogue at `path` (new format) as the old code's targets."""
    data = tomllib.loads(Path(path).read_text())
    out = []
    for source in ("plan", "programme"):
        for e in data.get(source, []):
            m = e["measure"]
            devices = m.get("devices", {})
            pilots = tuple(sorted({_pilot(f) for f in devices.get("family", [])})) or None
            kinds = tuple(sorted({c["kind"] for c in m.get("sites", [])})) or None
            measure = {"sites_meeting": "sites_with_live"}.get(m["kind"], m["kind"])
            out.append(OldTarget(target_id=e["id"], source=source, value=float(e["value"]),
                                 unit=e.get("unit", "devices"), deadline=e["deadline"], measure=measure,
                                 city=e.get("city"), pilots=pilots, network=devices.get("network"),
                                 site_kinds=kinds))
    return out


@dataclass(frozen=True, slots=True)
class CoverageRow:
    """One target's standing: measured value against the target, and the deadline."""

    target_id: str
    source: str
    measure: str
    city: int | None
    city_name: str | None
    value: float | None
    target: float
    unit: str
    percent: float | None
    deadline: date
    registered: int | None          # devices or sites in scope, live or not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scope(t: OldTarget, params: dict[str, Any]) -> str:
    where = ["true"]
    if t.city is not None:
        where.append("city_code = %(city)s")
        params["city"] = t.city
    if t.pilots is not None:
        where.append("pilot = ANY(%(pilots)s)")
        params["pilots"] = list(t.pilots)
    if t.network is not None:
        where.append("network = %(network)s")
        params["network"] = t.network
    return " AND ".join(where)


def _measure(conn: psycopg.Connection, t: OldTarget, now: datetime, factor: float) -> tuple[float | None, int | None]:
    params: dict[str, Any] = {"now": now, "factor": factor}
    if t.measure == "operator":
        row = conn.execute("SELECT value FROM target_progress_log WHERE target_id = %s "
                           "ORDER BY as_of DESC, entered_at DESC LIMIT 1", (t.target_id,)).fetchone()
        return (row[0] if row else None), None
    if t.measure == "live_devices":
        row = conn.execute(_DEVICES + f"SELECT count(*) FILTER (WHERE live), count(*) FROM dev WHERE {_scope(t, params)}",
                           params).fetchone()
        return float(row[0]), int(row[1])
    params["site_kinds"] = list(t.site_kinds or ())
    city = "AND s.city_code = %(city)s" if t.city is not None else ""
    params["city"] = t.city
    pilot = "AND dev.pilot = ANY(%(pilots)s)" if t.pilots is not None else ""
    params["pilots"] = list(t.pilots or ())
    row = conn.execute(_DEVICES + f"""
        SELECT count(*) FILTER (WHERE EXISTS (
                   SELECT 1 FROM dev WHERE dev.site_id = s.site_id AND dev.live {pilot})),
               count(*)
        FROM sites s WHERE s.kind = ANY(%(site_kinds)s) {city}""", params).fetchone()
    with_live, sites = int(row[0]), int(row[1])
    if t.measure == "sites_with_live":
        return float(with_live), sites
    return (100.0 * with_live / sites if sites else None), sites      # site_share


def coverage_report(conn: psycopg.Connection, targets: list[OldTarget], *, live_factor: float = 1.5,
                    now: datetime | None = None) -> list[CoverageRow]:
    """Every target with its measured value (one statement per target)."""
    now = now or datetime.now(UTC)
    names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    rows = []
    for t in targets:
        value, registered = _measure(conn, t, now, live_factor)
        percent = None if value is None else 100.0 * value / t.value
        rows.append(CoverageRow(
            target_id=t.target_id, source=t.source, measure=t.measure, city=t.city, city_name=names.get(t.city),
            value=value, target=t.value, unit=t.unit, percent=None if percent is None else round(percent, 2),
            deadline=t.deadline, registered=registered))
    return rows


def breakdown(conn: psycopg.Connection, *, live_factor: float = 1.5, now: datetime | None = None) -> list[dict[str, Any]]:
    """Registered and live devices for every city × pilot × network that has devices."""
    now = now or datetime.now(UTC)
    rows = conn.execute(_DEVICES + """
        SELECT c.code, c.name_zh, c.name_en, dev.pilot, dev.network,
               count(*) AS registered, count(*) FILTER (WHERE dev.live) AS live
        FROM dev LEFT JOIN cities c ON c.code = dev.city_code
        GROUP BY c.code, c.name_zh, c.name_en, dev.pilot, dev.network
        ORDER BY c.code NULLS LAST, dev.pilot, dev.network""", {"now": now, "factor": live_factor}).fetchall()
    return [{"city": r[0], "city_zh": r[1], "city_en": r[2], "pilot": r[3], "network": r[4],
             "registered": r[5], "live": r[6]} for r in rows]


def old_request(conn: psycopg.Connection, targets: list[OldTarget], live_factor: float = 1.5) -> dict[str, Any]:
    """What the old route computed for one `GET /coverage`: the report and the breakdown, at one `now`."""
    now = datetime.now().astimezone()
    rows = coverage_report(conn, targets, live_factor=live_factor, now=now)
    return {"targets": [r.as_dict() for r in rows], "breakdown": breakdown(conn, live_factor=live_factor, now=now)}
