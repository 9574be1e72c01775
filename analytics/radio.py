"""Radio coverage: per province, city, site and cell the distribution of RSRP and SINR, the share of
devices in each ECL, the coverage rate, the weak-coverage devices, and uplink success beside them.

Definitions (docs/radio.md says the same; the README's "Radio coverage" section points there):

* **A device's radio** over the window [since, until) is, per figure, its **latest** value in
  ``radio_readings`` in the window (by reading time): latest RSRP, latest SINR, latest ECL, latest
  cell id — a figure a reading lacks does not hide an earlier one.  Each device counts once, however
  often it reports (a chatty device does not weigh more).  Only active devices count (``devices.status``).
* **With radio**: a device with an RSRP or a SINR in the window.  A device without one (a CJ/T 188
  meter on a transparent product, a device silent in the window) is in no figure: it is neither covered
  nor weak; `RadioGroup.without_radio` counts the active devices of a city or site that have none.
* **Distribution**: p10 / p50 / p90 of the devices' RSRP and of their SINR, linear interpolation between
  the closest ranks (PostgreSQL's ``percentile_cont``); None without a value.
* **ECL share**: devices whose latest ECL is 0, 1, 2 ÷ devices with an ECL in the window.
* **Covered**: a device with radio whose every reported figure passes: RSRP ≥ `rsrp_min_dbm` (when it
  reported one) and SINR ≥ `sinr_min_db` (when it reported one).  A device that reports only RSRP (the
  NB smoke detector's vendor analog 0x80) is judged on RSRP alone.  **Weak** = with radio and not
  covered.  **Coverage rate** = covered ÷ with radio (None with no device with radio).  The thresholds
  are the settings ``IOTJX_RADIO_RSRP_MIN_DBM`` (−105) and ``IOTJX_RADIO_SINR_MIN_DB`` (−3)
  (ANALYTICS.md "Radio": the China Mobile test criterion RSRP ≥ −105 dBm and SINR ≥ −3 dB).
* **Groups**: the province (every device); the city and site of the device's site (no site: city 0,
  "(no site)"); the cell = (city, the device's latest cell id) — devices without a cell id are in no cell.
* **Uplink success** is `analytics.health.uplink_success` (stored uplinks ÷ whole reporting intervals in
  the window), not a second definition: the report carries it per device and beside each weak device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
from psycopg.rows import dict_row

from analytics.fire import city_code
from analytics.health import UplinkSuccess, uplink_success
from analytics.rollups import whole_days

SHANGHAI = ZoneInfo("Asia/Shanghai")

LEVELS = ("province", "city", "site", "cell")
NO_SITE = "(no site)"


@dataclass(frozen=True, slots=True)
class DeviceRadio:
    """One active device's latest radio figures in the window (None: not reported in it)."""

    device_id: str
    model: str
    city_code: int                   # 0: a device without a site
    site_id: int | None
    site_name: str | None
    rsrp_dbm: float | None
    sinr_db: float | None
    ecl: int | None
    cell_id: int | None
    pci: int | None
    last_at: datetime | None         # its latest radio reading in the window

    @property
    def with_radio(self) -> bool:
        return self.rsrp_dbm is not None or self.sinr_db is not None


@dataclass(frozen=True, slots=True)
class RadioGroup:
    """The figures of one province / city / site / cell."""

    level: str                       # province, city, site, cell
    city_code: int | None            # None for the province
    city: str
    site_id: int | None              # site level only
    site_name: str | None
    cell_id: int | None              # cell level only
    with_radio: int                  # devices with an RSRP or SINR in the window
    without_radio: int | None        # active devices of the group without one (None at cell level: unknown cell)
    rsrp_p10: float | None
    rsrp_p50: float | None
    rsrp_p90: float | None
    sinr_p10: float | None
    sinr_p50: float | None
    sinr_p90: float | None
    with_ecl: int
    ecl_share: tuple[float | None, float | None, float | None]    # ECL 0, 1, 2 ÷ with_ecl
    covered: int
    weak: int
    coverage_rate: float | None      # covered ÷ with_radio


@dataclass(frozen=True, slots=True)
class WeakDevice:
    """A device with radio that fails a threshold, with its uplink success over the window."""

    device_id: str
    model: str
    city_code: int
    site_name: str | None
    cell_id: int | None
    rsrp_dbm: float | None
    sinr_db: float | None
    ecl: int | None
    last_at: datetime | None
    reason: str                      # rsrp, sinr or rsrp+sinr
    success: float | None            # analytics.health uplink success; None: nothing expected yet


@dataclass(frozen=True, slots=True)
class RadioReport:
    since: datetime
    until: datetime
    rsrp_min_dbm: float
    sinr_min_db: float
    groups: tuple[RadioGroup, ...]           # province first, then cities, sites, cells
    weak: tuple[WeakDevice, ...]             # weakest RSRP first
    success: tuple[UplinkSuccess, ...]       # every active device (analytics.health)
    devices: tuple[DeviceRadio, ...]

    def level(self, level: str) -> list[RadioGroup]:
        """The groups of one level (province, city, site, cell)."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
        return [g for g in self.groups if g.level == level]


# Per active device, each figure's latest value in the window: one scan of the window's readings.
# The active devices installed by `until` (of one city, %(c)s, or all).
_DEV = """dev AS (
        SELECT d.device_id, d.device_key, d.model, coalesce(s.city_code, 0) AS city_code, s.site_id,
               s.name AS site_name
        FROM devices d LEFT JOIN sites s ON s.site_id = d.site_id
        WHERE d.status = 'active' AND d.installed_at <= %(until)s
          AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s))"""

# Each active device's latest radio figures in [since, until): the whole local days of the window from the
# writer's device-day rollup (each value's `last` and its time), the edges before the first and after the
# last local midnight from radio_readings; per figure the newer of the two.  (%(ff)s, %(ft)s) are the whole
# days (analytics.rollups.whole_days; empty: (until, until), all from the readings.)
_DEVICES = f"""
    WITH {_DEV},
    e AS (
        SELECT r.device_id,
               (array_agg(rsrp_dbm ORDER BY time DESC) FILTER (WHERE rsrp_dbm IS NOT NULL))[1] AS rsrp_dbm,
               max(time) FILTER (WHERE rsrp_dbm IS NOT NULL) AS rsrp_dbm_t,
               (array_agg(sinr_db ORDER BY time DESC) FILTER (WHERE sinr_db IS NOT NULL))[1] AS sinr_db,
               max(time) FILTER (WHERE sinr_db IS NOT NULL) AS sinr_db_t,
               (array_agg(ecl ORDER BY time DESC) FILTER (WHERE ecl IS NOT NULL))[1] AS ecl,
               max(time) FILTER (WHERE ecl IS NOT NULL) AS ecl_t,
               (array_agg(cell_id ORDER BY time DESC) FILTER (WHERE cell_id IS NOT NULL))[1] AS cell_id,
               max(time) FILTER (WHERE cell_id IS NOT NULL) AS cell_id_t,
               (array_agg(pci ORDER BY time DESC) FILTER (WHERE pci IS NOT NULL))[1] AS pci,
               max(time) FILTER (WHERE pci IS NOT NULL) AS pci_t,
               max(time) AS last_at
        FROM radio_readings r JOIN dev USING (device_id)
        WHERE (r.time >= %(since)s AND r.time < %(ff)s) OR (r.time >= %(ft)s AND r.time < %(until)s)
        GROUP BY r.device_id),
    o AS (
        SELECT dev.device_id,
               (array_agg(rsrp_dbm_last ORDER BY rsrp_dbm_last_t DESC) FILTER (WHERE rsrp_dbm_last_t IS NOT NULL))[1] AS rsrp_dbm,
               max(rsrp_dbm_last_t) AS rsrp_dbm_t,
               (array_agg(sinr_db_last ORDER BY sinr_db_last_t DESC) FILTER (WHERE sinr_db_last_t IS NOT NULL))[1] AS sinr_db,
               max(sinr_db_last_t) AS sinr_db_t,
               (array_agg(ecl_last ORDER BY ecl_last_t DESC) FILTER (WHERE ecl_last_t IS NOT NULL))[1] AS ecl,
               max(ecl_last_t) AS ecl_t,
               (array_agg(cell_id_last ORDER BY cell_id_last_t DESC) FILTER (WHERE cell_id_last_t IS NOT NULL))[1] AS cell_id,
               max(cell_id_last_t) AS cell_id_t,
               (array_agg(pci_last ORDER BY pci_last_t DESC) FILTER (WHERE pci_last_t IS NOT NULL))[1] AS pci,
               max(pci_last_t) AS pci_t,
               greatest(max(rsrp_dbm_last_t), max(sinr_db_last_t), max(rsrq_db_last_t), max(ecl_last_t),
                        max(cell_id_last_t), max(pci_last_t)) AS last_at
        FROM rollup_radio_day r JOIN dev USING (device_key)
        WHERE r.bucket >= %(ff)s AND r.bucket < %(ft)s
        GROUP BY dev.device_id)
    SELECT dev.device_id, dev.model, dev.city_code, dev.site_id, dev.site_name,
           (CASE WHEN e.rsrp_dbm_t IS NOT NULL AND (o.rsrp_dbm_t IS NULL OR e.rsrp_dbm_t >= o.rsrp_dbm_t) THEN e.rsrp_dbm ELSE o.rsrp_dbm END) AS rsrp_dbm,
           (CASE WHEN e.sinr_db_t IS NOT NULL AND (o.sinr_db_t IS NULL OR e.sinr_db_t >= o.sinr_db_t) THEN e.sinr_db ELSE o.sinr_db END) AS sinr_db,
           (CASE WHEN e.ecl_t IS NOT NULL AND (o.ecl_t IS NULL OR e.ecl_t >= o.ecl_t) THEN e.ecl ELSE o.ecl END)::smallint AS ecl,
           (CASE WHEN e.cell_id_t IS NOT NULL AND (o.cell_id_t IS NULL OR e.cell_id_t >= o.cell_id_t) THEN e.cell_id ELSE o.cell_id END)::bigint AS cell_id,
           (CASE WHEN e.pci_t IS NOT NULL AND (o.pci_t IS NULL OR e.pci_t >= o.pci_t) THEN e.pci ELSE o.pci END)::integer AS pci,
           greatest(e.last_at, o.last_at) AS last_at
    FROM dev LEFT JOIN e USING (device_id) LEFT JOIN o USING (device_id)
    ORDER BY dev.device_id"""


# A window open to now: each device's latest figures are the writer's all-time rollup_radio_latest, those
# measured at or after `since` (nothing has been received after now).
_LATEST = f"""
    WITH {_DEV}
    SELECT dev.device_id, dev.model, dev.city_code, dev.site_id, dev.site_name,
           CASE WHEN l.rsrp_dbm_last_t >= %(since)s THEN l.rsrp_dbm_last END AS rsrp_dbm,
           CASE WHEN l.sinr_db_last_t >= %(since)s THEN l.sinr_db_last END AS sinr_db,
           (CASE WHEN l.ecl_last_t >= %(since)s THEN l.ecl_last END)::smallint AS ecl,
           (CASE WHEN l.cell_id_last_t >= %(since)s THEN l.cell_id_last END)::bigint AS cell_id,
           (CASE WHEN l.pci_last_t >= %(since)s THEN l.pci_last END)::integer AS pci,
           greatest(CASE WHEN l.rsrp_dbm_last_t >= %(since)s THEN l.rsrp_dbm_last_t END,
                    CASE WHEN l.sinr_db_last_t >= %(since)s THEN l.sinr_db_last_t END,
                    CASE WHEN l.rsrq_db_last_t >= %(since)s THEN l.rsrq_db_last_t END,
                    CASE WHEN l.ecl_last_t >= %(since)s THEN l.ecl_last_t END,
                    CASE WHEN l.cell_id_last_t >= %(since)s THEN l.cell_id_last_t END,
                    CASE WHEN l.pci_last_t >= %(since)s THEN l.pci_last_t END) AS last_at
    FROM dev LEFT JOIN rollup_radio_latest l ON l.device_key = dev.device_key
    ORDER BY dev.device_id"""


# A window [since, until) ending at or after a device's newest figures (the usual: a report up to now): each
# figure's latest value in the window is the writer's all-time latest (rollup_radio_latest) when that one
# was measured in the window, and there is none when it was measured before `since`; only a device with a
# figure measured at or after `until` (`rescan`) needs the window's rollups and readings (`_DEVICES_OF`).
_WITHIN = _LATEST.replace(
    " AS last_at\n    FROM dev LEFT JOIN rollup_radio_latest",
    """ AS last_at,
           coalesce(greatest(l.rsrp_dbm_last_t, l.sinr_db_last_t, l.rsrq_db_last_t, l.ecl_last_t, l.cell_id_last_t,
                             l.pci_last_t) >= %(until)s, false) AS rescan
    FROM dev LEFT JOIN rollup_radio_latest""")
_DEVICES_OF = _DEVICES.replace(_DEV, _DEV[:-1] + "\n          AND d.device_id = ANY(%(ids)s::text[]))")
assert _WITHIN != _LATEST and _DEVICES_OF != _DEVICES


def device_radio(conn: psycopg.Connection, since: datetime, until: datetime | None,
                 city: str | int | None = None, *, tz: ZoneInfo = SHANGHAI, rollups: bool = True) -> list[DeviceRadio]:
    """Every active device installed by `until` (in the city, if given) with its latest radio figures in
    [since, until); ValueError for an unknown city or an empty window.  The whole local days (`tz`: the
    writer's IOTJX_TIMEZONE) are read from the device-day rollup, the rest from the readings
    (`rollups=False`: all from the readings, for a system whose writer keeps none).  `until` None: now,
    and each device's latest figures are read from the writer's rollup_radio_latest (`_LATEST`)."""
    open_end, until = until is None, until or datetime.now(UTC)
    _check_window(since, until)
    code = city_code(conn, city)
    sql = _LATEST if open_end and rollups else _DEVICES
    ff, ft = whole_days(since, until, tz) if rollups and sql is _DEVICES else (until, until)
    params = {"since": since, "until": until, "c": code, "ff": ff, "ft": ft}
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET LOCAL jit = off")
        if rollups and not open_end:
            rows = cur.execute(_WITHIN, params).fetchall()
            again = [r["device_id"] for r in rows if r.pop("rescan")]
            if len(again) > len(rows) // 2:          # a window well in the past: one scan of it for all
                rows = cur.execute(_DEVICES, params).fetchall()
            elif again:
                redo = {r["device_id"]: r for r in cur.execute(_DEVICES_OF, {**params, "ids": again}).fetchall()}
                rows = [redo.get(r["device_id"], r) for r in rows]
        else:
            rows = cur.execute(sql, params).fetchall()
    return [DeviceRadio(**r) for r in rows]


def _check_window(since: datetime, until: datetime) -> None:
    if until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")


def _covered(d: DeviceRadio, rsrp_min_dbm: float, sinr_min_db: float) -> bool:
    return ((d.rsrp_dbm is None or d.rsrp_dbm >= rsrp_min_dbm)
            and (d.sinr_db is None or d.sinr_db >= sinr_min_db))


def _percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    p10, p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])   # linear: percentile_cont
    return float(p10), float(p50), float(p90)


def _group(level: str, key: dict[str, Any], members: list[DeviceRadio], rsrp_min_dbm: float,
           sinr_min_db: float, without_radio: int | None) -> RadioGroup:
    radio = [d for d in members if d.with_radio]
    ecls = [d.ecl for d in members if d.ecl is not None]
    covered = sum(_covered(d, rsrp_min_dbm, sinr_min_db) for d in radio)
    share = tuple((ecls.count(e) / len(ecls)) if ecls else None for e in (0, 1, 2))
    rsrp = _percentiles([d.rsrp_dbm for d in radio if d.rsrp_dbm is not None])
    sinr = _percentiles([d.sinr_db for d in radio if d.sinr_db is not None])
    return RadioGroup(level=level, **key, with_radio=len(radio), without_radio=without_radio,
                      rsrp_p10=rsrp[0], rsrp_p50=rsrp[1], rsrp_p90=rsrp[2],
                      sinr_p10=sinr[0], sinr_p50=sinr[1], sinr_p90=sinr[2], with_ecl=len(ecls),
                      ecl_share=share, covered=covered, weak=len(radio) - covered,
                      coverage_rate=covered / len(radio) if radio else None)


def coverage_groups(devices: list[DeviceRadio], names: dict[int, str], *, rsrp_min_dbm: float,
                    sinr_min_db: float) -> list[RadioGroup]:
    """The province, city, site and cell groups of these devices (pure: no database)."""
    def without(members: list[DeviceRadio]) -> int:
        return sum(not d.with_radio for d in members)

    out = [_group("province", {"city_code": None, "city": "Jiangxi", "site_id": None, "site_name": None,
                               "cell_id": None}, devices, rsrp_min_dbm, sinr_min_db, without(devices))]
    cities: dict[int, list[DeviceRadio]] = {}
    sites: dict[tuple[int, int | None], list[DeviceRadio]] = {}
    cells: dict[tuple[int, int], list[DeviceRadio]] = {}
    for d in devices:
        cities.setdefault(d.city_code, []).append(d)
        sites.setdefault((d.city_code, d.site_id), []).append(d)
        if d.cell_id is not None:
            cells.setdefault((d.city_code, d.cell_id), []).append(d)
    for code in sorted(cities):
        members = cities[code]
        out.append(_group("city", {"city_code": code, "city": names.get(code, NO_SITE), "site_id": None,
                                   "site_name": None, "cell_id": None}, members, rsrp_min_dbm, sinr_min_db,
                          without(members)))
    for (code, site_id) in sorted(sites, key=lambda k: (k[0], k[1] if k[1] is not None else -1)):
        members = sites[(code, site_id)]
        out.append(_group("site", {"city_code": code, "city": names.get(code, NO_SITE), "site_id": site_id,
                                   "site_name": members[0].site_name if site_id is not None else NO_SITE,
                                   "cell_id": None}, members, rsrp_min_dbm, sinr_min_db, without(members)))
    for (code, cell) in sorted(cells):
        out.append(_group("cell", {"city_code": code, "city": names.get(code, NO_SITE), "site_id": None,
                                   "site_name": None, "cell_id": cell}, cells[(code, cell)], rsrp_min_dbm,
                          sinr_min_db, None))
    return out


def weak_devices(devices: list[DeviceRadio], success: list[UplinkSuccess], *, rsrp_min_dbm: float,
                 sinr_min_db: float) -> list[WeakDevice]:
    """Devices with radio failing a threshold, weakest RSRP first (SINR-only devices last), with their
    uplink success (pure: no database)."""
    by_device = {s.device_id: s.success for s in success}
    out = []
    for d in devices:
        if not d.with_radio or _covered(d, rsrp_min_dbm, sinr_min_db):
            continue
        reasons = [name for name, value, floor in (("rsrp", d.rsrp_dbm, rsrp_min_dbm), ("sinr", d.sinr_db, sinr_min_db))
                   if value is not None and value < floor]
        out.append(WeakDevice(d.device_id, d.model, d.city_code, d.site_name, d.cell_id, d.rsrp_dbm, d.sinr_db,
                              d.ecl, d.last_at, "+".join(reasons), by_device.get(d.device_id)))
    out.sort(key=lambda w: (w.rsrp_dbm is None, w.rsrp_dbm if w.rsrp_dbm is not None else 0.0,
                            w.sinr_db if w.sinr_db is not None else 0.0, w.device_id))
    return out


def radio_report(conn: psycopg.Connection, since: datetime, until: datetime | None, *, rsrp_min_dbm: float,
                 sinr_min_db: float, city: str | int | None = None, tz: ZoneInfo = SHANGHAI,
                 rollups: bool = True, weak_success_only: bool = False) -> RadioReport:
    """Radio coverage over [since, until): groups, weak devices and uplink success, from one snapshot
    (the function the API exposes; thresholds from Settings.radio_rsrp_min_dbm / radio_sinr_min_db; `tz`
    and `rollups` from IOTJX_TIMEZONE and IOTJX_ROLLUPS; `until` None: now — see `device_radio`).
    `weak_success_only`: uplink success is counted for the weak devices only (what `weak` shows; the raw
    log of the window is then read for those devices, not the whole fleet) and `success` holds only theirs."""
    open_end = until is None
    until = until or datetime.now(UTC)
    _check_window(since, until)
    outer = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if outer:           # one snapshot: a device's radio and its uplink success from the same data
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        devices = device_radio(conn, since, None if open_end else until, city, tz=tz, rollups=rollups)
        ids = None
        if weak_success_only:
            ids = [d.device_id for d in devices if d.with_radio and not _covered(d, rsrp_min_dbm, sinr_min_db)]
        success = uplink_success(conn, since, until, city, ids=ids) if ids is None or ids else []
        names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    groups = coverage_groups(devices, names, rsrp_min_dbm=rsrp_min_dbm, sinr_min_db=sinr_min_db)
    weak = weak_devices(devices, success, rsrp_min_dbm=rsrp_min_dbm, sinr_min_db=sinr_min_db)
    return RadioReport(since, until, rsrp_min_dbm, sinr_min_db, tuple(groups), tuple(weak), tuple(success),
                       tuple(devices))


_SUMMARY = """
    WITH x AS ({devices}),
    y AS (SELECT x.*, (rsrp_dbm IS NOT NULL OR sinr_db IS NOT NULL) AS radio,
                 (rsrp_dbm IS NOT NULL OR sinr_db IS NOT NULL)
                 AND (rsrp_dbm IS NULL OR rsrp_dbm >= %(rsrp_min)s) AND (sinr_db IS NULL OR sinr_db >= %(sinr_min)s)
                 AS covered
          FROM x)
    SELECT CASE WHEN grouping(city_code) = 1 THEN 'province' WHEN grouping(site_id) = 0 THEN 'site'
                WHEN grouping(cell_id) = 0 THEN 'cell' ELSE 'city' END AS level,
           city_code, site_id, min(site_name) AS site_name, cell_id,
           count(*) FILTER (WHERE radio) AS with_radio, count(*) FILTER (WHERE NOT radio) AS without_radio,
           percentile_cont(0.1) WITHIN GROUP (ORDER BY rsrp_dbm) AS rsrp_p10,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY rsrp_dbm) AS rsrp_p50,
           percentile_cont(0.9) WITHIN GROUP (ORDER BY rsrp_dbm) AS rsrp_p90,
           percentile_cont(0.1) WITHIN GROUP (ORDER BY sinr_db) AS sinr_p10,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY sinr_db) AS sinr_p50,
           percentile_cont(0.9) WITHIN GROUP (ORDER BY sinr_db) AS sinr_p90,
           count(ecl) AS with_ecl, count(*) FILTER (WHERE ecl = 0) AS ecl0, count(*) FILTER (WHERE ecl = 1) AS ecl1,
           count(*) FILTER (WHERE ecl = 2) AS ecl2, count(*) FILTER (WHERE covered) AS covered
    FROM y
    GROUP BY GROUPING SETS ((), (city_code), (city_code, site_id), (city_code, cell_id))
    HAVING grouping(cell_id) = 1 OR cell_id IS NOT NULL"""
_LEVEL_ORDER = {"province": 0, "city": 1, "site": 2, "cell": 3}


def radio_summary(conn: psycopg.Connection, since: datetime, *, rsrp_min_dbm: float, sinr_min_db: float,
                  city: str | int | None = None) -> list[RadioGroup]:
    """The groups of `radio_report` (province unless a city is asked, cities, sites, cells) over the window
    from `since` to now, computed in one SQL statement over each device's latest figures (the writer's
    rollup_radio_latest): the figure a board or a summary call reads, without the per-device lists."""
    until = datetime.now(UTC)
    _check_window(since, until)
    code = city_code(conn, city)
    names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    params = {"since": since, "until": until, "c": code, "rsrp_min": rsrp_min_dbm, "sinr_min": sinr_min_db}
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET LOCAL jit = off")
        rows = cur.execute(_SUMMARY.format(devices=_LATEST.replace("ORDER BY dev.device_id", "")), params).fetchall()
    out = []
    for r in rows:
        level = r["level"]
        with_radio, with_ecl = r["with_radio"], r["with_ecl"]
        out.append(RadioGroup(
            level=level, city_code=r["city_code"],
            city="Jiangxi" if level == "province" else names.get(r["city_code"], NO_SITE),
            site_id=r["site_id"] if level == "site" else None,
            site_name=(r["site_name"] if r["site_id"] is not None else NO_SITE) if level == "site" else None,
            cell_id=r["cell_id"] if level == "cell" else None, with_radio=with_radio,
            without_radio=None if level == "cell" else r["without_radio"],
            rsrp_p10=r["rsrp_p10"], rsrp_p50=r["rsrp_p50"], rsrp_p90=r["rsrp_p90"], sinr_p10=r["sinr_p10"],
            sinr_p50=r["sinr_p50"], sinr_p90=r["sinr_p90"], with_ecl=with_ecl,
            ecl_share=tuple((r[f"ecl{e}"] / with_ecl) if with_ecl else None for e in (0, 1, 2)),
            covered=r["covered"], weak=with_radio - r["covered"],
            coverage_rate=r["covered"] / with_radio if with_radio else None))
    out.sort(key=lambda g: (_LEVEL_ORDER[g.level], g.city_code if g.city_code is not None else -1,
                            g.site_id if g.site_id is not None else -1, g.cell_id if g.cell_id is not None else -1))
    return out


__all__ = ["LEVELS", "DeviceRadio", "RadioGroup", "RadioReport", "WeakDevice", "coverage_groups", "device_radio",
           "radio_report", "radio_summary", "weak_devices"]
