"""Coverage: what the registry and recent uplinks show, by city, pilot and network, against each target.

A device is *live* when it is active and its last stored uplink is within
``live_factor × reporting interval`` of now (the device's interval, else its model's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg

from iotjx.targets import CoverageTarget

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
class CoverageRow:
    """One target's standing: measured value against the target, and the deadline."""

    target_id: str
    source: str
    clause_zh: str
    clause_en: str
    target_zh: str
    target_en: str
    measure: str
    city: int | None
    city_name: str | None
    pilot: str | None
    network: str | None
    site_kind: str | None
    value: float | None
    target: float
    unit: str
    percent: float | None
    deadline: date
    registered: int | None          # devices or sites in scope, live or not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scope(t: CoverageTarget, params: dict[str, Any]) -> str:
    where = ["true"]
    if t.city is not None:
        where.append("city_code = %(city)s")
        params["city"] = t.city
    if t.pilot is not None:
        where.append("pilot = %(pilot)s")
        params["pilot"] = t.pilot
    if t.network is not None:
        where.append("network = %(network)s")
        params["network"] = t.network
    return " AND ".join(where)


def _measure(conn: psycopg.Connection, t: CoverageTarget, now: datetime, factor: float) -> tuple[float | None, int | None]:
    params: dict[str, Any] = {"now": now, "factor": factor}
    if t.measure == "operator":
        row = conn.execute("SELECT value FROM target_progress WHERE target_id = %s", (t.target_id,)).fetchone()
        return (row[0] if row else None), None
    if t.measure == "live_devices":
        row = conn.execute(_DEVICES + f"SELECT count(*) FILTER (WHERE live), count(*) FROM dev WHERE {_scope(t, params)}",
                           params).fetchone()
        return float(row[0]), int(row[1])
    params["site_kind"] = t.site_kind
    city = "AND s.city_code = %(city)s" if t.city is not None else ""
    params["city"] = t.city
    pilot = "AND dev.pilot = %(pilot)s" if t.pilot is not None else ""
    params["pilot"] = t.pilot
    row = conn.execute(_DEVICES + f"""
        SELECT count(*) FILTER (WHERE EXISTS (
                   SELECT 1 FROM dev WHERE dev.site_id = s.site_id AND dev.live {pilot})),
               count(*)
        FROM sites s WHERE s.kind = %(site_kind)s {city}""", params).fetchone()
    with_live, sites = int(row[0]), int(row[1])
    if t.measure == "sites_with_live":
        return float(with_live), sites
    return (100.0 * with_live / sites if sites else None), sites      # site_share


def coverage_report(conn: psycopg.Connection, targets: list[CoverageTarget], *, live_factor: float = 1.5,
                    now: datetime | None = None, city: int | None = None, pilot: str | None = None,
                    network: str | None = None) -> list[CoverageRow]:
    """Every target (optionally those of one city / pilot / network) with its measured value."""
    now = now or datetime.now(UTC)
    names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    rows = []
    for t in targets:
        if (city is not None and t.city not in (None, city)) or (pilot is not None and t.pilot not in (None, pilot)) \
                or (network is not None and t.network not in (None, network)):
            continue
        value, registered = _measure(conn, t, now, live_factor)
        if value is None:
            percent = None
        else:      # a percent target's measured value is already a share; others are counts
            percent = 100.0 * value / t.value
        rows.append(CoverageRow(
            target_id=t.target_id, source=t.source, clause_zh=t.clause_zh, clause_en=t.clause_en,
            target_zh=t.target_zh, target_en=t.target_en, measure=t.measure, city=t.city,
            city_name=names.get(t.city), pilot=t.pilot, network=t.network, site_kind=t.site_kind,
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
