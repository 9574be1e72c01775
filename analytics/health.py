"""Device health: online rate per city × pilot × network, silent devices and those sending only
malformed frames, one normalised battery state per device, and uplink success per device.

Definitions (the README's "Device health" section says the same):

* **Online** = **live**, the coverage definition (`analytics.coverage`, README "Coverage against the
  targets"), not a second one: an active device installed by `now` whose last stored uplink lies within
  `live_factor` × its reporting interval (the device's, else its model's) before `now`.  The online rate
  of a (city, pilot, network) cell is live ÷ active, read from `coverage.cells_now` and
  `coverage.breakdown_rows` themselves (inactive devices are in no denominator; retired ones nowhere).
* **Silent**: an active device installed by `now` that is not live.  *Since* = its last stored uplink
  (``device_state.last_seen``), or ``installed_at`` when it was never heard.  A silent device with at
  least one reject carrying its device id in its live window — (`now` − `live_factor` × interval,
  `now`] in ``rejected_uplinks`` — is **sending malformed frames** instead: it is not silent, its
  recent uplinks were all rejected (none was stored in that window, or it would be live).  It is shown
  with its rejects in the window and the last one's reason and detail.  Past a source's reject rate
  the writer only *counts* rejects in ``reject_tally`` (per minute, transport, source, reason), which
  holds **no device id**: a device whose every reject was only tallied is listed as silent.
  `suppressed_rejects` says how many rejects were tallied without a row, so the reader knows.
* **Battery**: per device, the latest reading (by receive time) of its shape — water
  ``water_readings.battery_low`` (the CJ/T 188 status bit: ok/low, no value); parking
  ``parking_events.battery_low`` (the Libelium bit 6) and ``battery_mv`` (low below
  `PARKING_LOW_MV`; the bit or the voltage makes it low); GB/T 26875 smoke detectors' vendor analog
  type 0x88 in ``fire_events`` (the F9164-TD-NB's battery: the decoder passes vendor types through as
  raw ÷ 1 with no unit, the value is mV — PROTOCOLS.md §2; low below `SMOKE_LOW_MV`; searched only for
  the models in `SMOKE_BATTERY_MODELS`, a vendor type meaning what its vendor says); and the carrier
  object models' ``battery_pct`` (CTWing smoke detectors, Cat-1 JSON parking: mapped by the model's
  name_map into ``extra``; low below `LOW_PCT`; searched only for models whose name_map names it).
  A device with no such reading is ``unknown``.  Each search is one device's index, newest partition
  first: restricting it to the models that can have the reading keeps a panel's thousands of rows unread.
* **Uplink success** over [since, until): received = stored uplinks (``raw_uplinks`` rows with outcome
  ``stored``: duplicates, rejects and carrier events are not received uplinks) ÷ expected = whole
  reporting intervals from max(since, ``installed_at``) to `until`, capped at 1; no whole interval
  yet: no figure (None).  A model that sends several frames per wake-up (the NB smoke detector's state
  and analog frames) reaches 1 at half its wake-ups; the window must lie within the raw log's
  retention (``IOTJX_RAW_RETENTION_DAYS``) or it undercounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

from analytics.coverage import breakdown_rows, cells_now
from analytics.fire import city_code

SMOKE_BATTERY_ANALOG = 0x88          # F9164-TD-NB vendor analog type: battery, mV
# Models whose vendor type 0x88 is that battery (vendor types mean what each vendor says: a panel's 0x88
# may be anything); only their fire_events are searched for it.
SMOKE_BATTERY_MODELS = ("gb26875-nb-smoke",)
SMOKE_LOW_MV = 2800                  # our threshold: the one public frame reads 3575 mV, the simulator 2950–3100
PARKING_LOW_MV = 3300                # our threshold: Libelium publishes none; fresh nodes read 3400–3650
LOW_PCT = 20.0                       # carrier object models' battery_pct
STATES = ("ok", "low", "unknown")


@dataclass(frozen=True, slots=True)
class OnlineRate:
    """One city × pilot × network cell: active devices, those live, and the share."""

    city_code: int                   # 0: devices without a site
    city: str
    pilot: str
    network: str
    registered: int
    active: int
    online: int
    rate: float | None               # online / active; None without active devices


@dataclass(frozen=True, slots=True)
class SilentDevice:
    """An active device that is not live: silent, or sending malformed frames (`malformed`)."""

    device_id: str
    model: str
    family: str
    network: str
    city_code: int | None
    site_name: str | None
    interval_s: int
    last_seen: datetime | None       # None: never heard since installation
    since: datetime                  # last_seen, else installed_at
    silent_s: float                  # now − since
    malformed: bool                  # rejects with its id in its live window
    rejects: int                     # those rejects
    last_reject_at: datetime | None
    last_reason: str | None
    last_detail: str | None


@dataclass(frozen=True, slots=True)
class Battery:
    """One device's normalised battery state from its latest battery reading."""

    device_id: str
    model: str
    family: str
    city_code: int | None
    site_name: str | None
    state: str                       # ok / low / unknown
    value: float | None              # in `unit`, where the source gives one
    unit: str | None                 # mV or %
    source: str | None               # water_bit, parking, smoke_0x88, battery_pct
    at: datetime | None              # the reading's receive time


@dataclass(frozen=True, slots=True)
class UplinkSuccess:
    device_id: str
    model: str
    city_code: int | None
    interval_s: int
    counted_from: datetime           # max(since, installed_at)
    received: int
    expected: int                    # whole intervals from counted_from to until
    success: float | None            # min(1, received / expected); None when nothing is expected yet


@dataclass(frozen=True, slots=True)
class HealthReport:
    now: datetime
    online: tuple[OnlineRate, ...]
    silent: tuple[SilentDevice, ...]         # silent, malformed senders excluded
    malformed: tuple[SilentDevice, ...]
    batteries: tuple[Battery, ...]
    suppressed_rejects: int                  # tallied without a row (no device id) in the longest live window


def _fetch(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one query, with JIT off: a plan over every partition of the readings is costed high
    enough to be JIT-compiled, which costs more than the query (100,000 devices: 15 s instead of 3 s)."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET LOCAL jit = off")
        return cur.execute(sql, params).fetchall()


# --------------------------------------------------------------------------- online rate

def online_rates(conn: psycopg.Connection, *, live_factor: float, tz: ZoneInfo, now: datetime | None = None,
                 city: str | int | None = None) -> list[OnlineRate]:
    """Online (live) ÷ active per city × pilot × network at `now`, from the coverage cells."""
    code = city_code(conn, city)
    cells = cells_now(conn, live_factor=live_factor, tz=tz, now=now)
    names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    return [OnlineRate(c, names.get(c, "(no site)"), p, n, r, a, lv, lv / a if a else None)
            for c, p, n, r, a, lv in breakdown_rows(cells) if code is None or c == code]


# --------------------------------------------------------------------------- silent and malformed

_ACTIVE = """
    SELECT d.device_id, d.model, coalesce(m.family, m.pilot) AS family, d.network, d.installed_at,
           s.city_code, s.name AS site_name,
           coalesce(d.reporting_interval_s, m.reporting_interval_s) AS interval_s,
           make_interval(secs => %(f)s * coalesce(d.reporting_interval_s, m.reporting_interval_s)) AS w
    FROM devices d JOIN device_models m USING (model)
    LEFT JOIN sites s ON s.site_id = d.site_id
    WHERE d.status = 'active' AND d.installed_at <= %(t)s
      AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
      AND (%(ids)s::text[] IS NULL OR d.device_id = ANY(%(ids)s::text[]))"""

# The two definitions of README "Device health", each written once: not live (no stored uplink within
# live_factor × the interval; `d` the active device, `st` its device_state) and malformed (a reject with its
# id in that window; `x` the reject, {d} the device's alias).
_NOT_SEEN = "NOT coalesce(st.last_seen >= %(t)s - d.w, false)"
_IN_WINDOW = "x.received_at > %(t)s - {d}.w AND x.received_at <= %(t)s"

_NOT_LIVE = f"""
    WITH d AS ({_ACTIVE}),
    q AS (SELECT d.*, st.last_seen FROM d LEFT JOIN device_state st USING (device_id)
          WHERE {_NOT_SEEN}),
    r AS (SELECT x.device_id, count(*) AS rejects, max(x.received_at) AS last_reject_at,
                 (array_agg(x.reason ORDER BY x.received_at DESC, x.reject_id DESC))[1] AS last_reason,
                 (array_agg(x.detail ORDER BY x.received_at DESC, x.reject_id DESC))[1] AS last_detail
          FROM rejected_uplinks x JOIN q ON q.device_id = x.device_id
          WHERE {_IN_WINDOW.format(d="q")}
            AND x.received_at > %(t)s - (SELECT max(w) FROM q)      -- a bound the time index can use
          GROUP BY x.device_id)
    SELECT q.device_id, q.model, q.family, q.network, q.city_code, q.site_name, q.interval_s, q.last_seen,
           coalesce(q.last_seen, q.installed_at) AS since,
           extract(epoch FROM %(t)s - coalesce(q.last_seen, q.installed_at))::float8 AS silent_s,
           r.device_id IS NOT NULL AS malformed, coalesce(r.rejects, 0) AS rejects, r.last_reject_at,
           r.last_reason, r.last_detail
    FROM q LEFT JOIN r USING (device_id)
    ORDER BY silent_s DESC, q.device_id"""


def not_live(conn: psycopg.Connection, now: datetime, *, live_factor: float,
             city: str | int | None = None) -> tuple[list[SilentDevice], list[SilentDevice]]:
    """(silent devices, devices sending only malformed frames) at `now`, longest silent first."""
    code = city_code(conn, city)
    rows = _fetch(conn, _NOT_LIVE, {"t": now, "f": live_factor, "c": code, "ids": None})
    devices = [SilentDevice(**r) for r in rows]
    return [d for d in devices if not d.malformed], [d for d in devices if d.malformed]


def silent_page(conn: psycopg.Connection, now: datetime, *, live_factor: float, city: str | int | None = None,
                family: str | None = None, after: str | None = None, limit: int | None = None) -> list[SilentDevice]:
    """The silent devices of `not_live` (malformed senders excluded) of `family` (None: every family), by
    device id: those after device id `after`, the first `limit` (None: all) — one keyset page computed for
    its devices only (an index walk along the device ids that stops after `limit` silent ones), not the
    whole fleet's list; `_NOT_LIVE`'s definitions (`_NOT_SEEN`, `_IN_WINDOW`)."""
    code = city_code(conn, city)
    # Conditions only when given: a generic plan of a prepared statement keeps every `… IS NULL OR` branch.
    extra = (" AND coalesce(m.family, m.pilot) = %(fam)s" if family is not None else "") + (
        " AND d.device_id > %(after)s" if after is not None else "")
    sql = f"""
        WITH d AS ({_ACTIVE}{extra})
        SELECT d.device_id, d.model, d.family, d.network, d.city_code, d.site_name, d.interval_s, st.last_seen,
               coalesce(st.last_seen, d.installed_at) AS since,
               extract(epoch FROM %(t)s - coalesce(st.last_seen, d.installed_at))::float8 AS silent_s,
               false AS malformed, 0 AS rejects, NULL::timestamptz AS last_reject_at, NULL::text AS last_reason,
               NULL::text AS last_detail
        FROM d LEFT JOIN device_state st USING (device_id)
        WHERE {_NOT_SEEN}
          AND NOT EXISTS (SELECT 1 FROM rejected_uplinks x WHERE x.device_id = d.device_id
                          AND {_IN_WINDOW.format(d="d")})
        ORDER BY d.device_id{" LIMIT %(n)s" if limit is not None else ""}"""
    rows = _fetch(conn, sql, {"t": now, "f": live_factor, "c": code, "ids": None, "fam": family, "after": after,
                              "n": limit})
    return [SilentDevice(**r) for r in rows]


def suppressed_rejects(conn: psycopg.Connection, since: datetime, until: datetime) -> int:
    """Rejects counted in reject_tally without a rejected_uplinks row (so with no device id) in the
    minutes from `since` to `until`."""
    return int(conn.execute("""SELECT coalesce(sum(suppressed), 0) FROM reject_tally
                               WHERE minute >= date_trunc('minute', %s::timestamptz) AND minute <= %s""",
                            (since, until)).fetchone()[0])


# --------------------------------------------------------------------------- battery

# The latest battery reading of each shape at or before %(t)s; a device has readings of one shape only
# (its family's table), so the newest of the arms is its state.
_BATTERY = f"""
    WITH d AS (SELECT a.*, EXISTS (SELECT 1 FROM device_models m, jsonb_each_text(m.settings->'name_map') k
                                   WHERE m.model = a.model AND k.value = 'battery_pct') AS has_pct
               FROM ({_ACTIVE}) a)
    SELECT d.device_id, d.model, d.family, d.city_code, d.site_name, b.low, b.value, b.unit, b.source, b.at
    FROM d LEFT JOIN LATERAL (
        SELECT * FROM (
            (SELECT r.time AS at, r.battery_low AS low, NULL::float8 AS value, NULL::text AS unit,
                    'water_bit' AS source
             FROM water_readings r
             WHERE d.family = 'water' AND r.device_id = d.device_id AND r.time <= %(t)s AND r.battery_low IS NOT NULL
             ORDER BY r.time DESC LIMIT 1)
            UNION ALL
            (SELECT r.time, coalesce(r.battery_low, false) OR coalesce(r.battery_mv < %(park_mv)s, false),
                    r.battery_mv::float8, CASE WHEN r.battery_mv IS NOT NULL THEN 'mV' END, 'parking'
             FROM parking_events r
             WHERE d.family = 'parking' AND r.device_id = d.device_id AND r.time <= %(t)s
               AND (r.battery_low IS NOT NULL OR r.battery_mv IS NOT NULL)
             ORDER BY r.time DESC LIMIT 1)
            UNION ALL
            (SELECT r.time, r.analog_value < %(smoke_mv)s, r.analog_value, 'mV', 'smoke_0x88'
             FROM fire_events r
             WHERE d.model = ANY(%(smoke_models)s) AND r.device_id = d.device_id AND r.time <= %(t)s
               AND r.analog_type = %(smoke_type)s AND r.analog_value IS NOT NULL
             ORDER BY r.time DESC LIMIT 1)
            UNION ALL
            (SELECT r.time, (r.extra->>'battery_pct')::float8 < %(pct)s, (r.extra->>'battery_pct')::float8, '%%',
                    'battery_pct'
             FROM fire_events r
             WHERE d.family = 'fire' AND d.has_pct AND r.device_id = d.device_id AND r.time <= %(t)s
               AND jsonb_typeof(r.extra->'battery_pct') = 'number'
             ORDER BY r.time DESC LIMIT 1)
            UNION ALL
            (SELECT r.time, (r.extra->>'battery_pct')::float8 < %(pct)s, (r.extra->>'battery_pct')::float8, '%%',
                    'battery_pct'
             FROM parking_events r
             WHERE d.family = 'parking' AND d.has_pct AND r.device_id = d.device_id AND r.time <= %(t)s
               AND jsonb_typeof(r.extra->'battery_pct') = 'number'
             ORDER BY r.time DESC LIMIT 1)) x
        ORDER BY x.at DESC LIMIT 1) b ON true
    ORDER BY d.device_id"""


def battery_params(now: datetime, code: int | None, ids: list[str] | None = None, *,
                   smoke_low_mv: float = SMOKE_LOW_MV, parking_low_mv: float = PARKING_LOW_MV,
                   low_pct: float = LOW_PCT) -> dict[str, Any]:
    """The parameters of `BATTERY_SQL` for the devices of city `code` (0: without a site; None: all),
    and among `ids` when given, at `now`, with the low thresholds given (by default the module's)."""
    return {"t": now, "f": 1.0, "c": code, "ids": ids, "park_mv": parking_low_mv, "smoke_mv": smoke_low_mv,
            "smoke_type": SMOKE_BATTERY_ANALOG, "smoke_models": list(SMOKE_BATTERY_MODELS), "pct": low_pct}


def batteries(conn: psycopg.Connection, now: datetime, city: str | int | None = None, *,
              smoke_low_mv: float = SMOKE_LOW_MV, parking_low_mv: float = PARKING_LOW_MV,
              low_pct: float = LOW_PCT) -> list[Battery]:
    """Every active device's battery state (ok / low / unknown) from its latest reading at or before `now`
    (low: below the thresholds given, by default the module's)."""
    rows = _fetch(conn, _BATTERY, battery_params(now, city_code(conn, city), smoke_low_mv=smoke_low_mv,
                                                 parking_low_mv=parking_low_mv, low_pct=low_pct))
    out = []
    for r in rows:
        low = r.pop("low")
        out.append(Battery(**r, state="unknown" if low is None else "low" if low else "ok"))
    return out


# The definitions as SQL, for a query that filters or pages by them (api/routes/devices.py) rather than
# restating them.  NOT_LIVE_SQL: the active devices installed by %(t)s that are not live, with
# `malformed` (params t, f = live_factor, c = city code or None, ids = device ids or None).  BATTERY_SQL: each active device's
# latest battery reading, `low` true/false/NULL (params: `battery_params`).  A device counts as live when
# it is active, installed by %(t)s and not in NOT_LIVE_SQL.
NOT_LIVE_SQL = _NOT_LIVE
BATTERY_SQL = _BATTERY


# --------------------------------------------------------------------------- uplink success

# Stored uplinks of each device in [counted_from, until): the raw log's `stored` rows, joined over the
# window's constant range (only its partitions are read) rather than counted device by device.  {page}:
# empty, or a keyset page of the devices (uplink_success's `after` / `limit`).
_SUCCESS_PAGED = f"""
    WITH d AS ({_ACTIVE}{{page}}),
    c AS (SELECT d.*, greatest(%(since)s::timestamptz, d.installed_at) AS counted_from FROM d),
    n AS (SELECT r.device_id, count(*) AS n FROM raw_uplinks r JOIN c USING (device_id)
          WHERE r.outcome = 'stored' AND r.received_at >= %(since)s AND r.received_at < %(until)s
            AND r.received_at >= c.counted_from
          GROUP BY r.device_id)
    SELECT c.device_id, c.model, c.city_code, c.interval_s, c.counted_from,
           floor(extract(epoch FROM %(until)s - c.counted_from) / c.interval_s)::bigint AS expected,
           coalesce(n.n, 0)::bigint AS received
    FROM c LEFT JOIN n USING (device_id)
    ORDER BY c.device_id"""
_SUCCESS = _SUCCESS_PAGED.format(page="")


def uplink_success(conn: psycopg.Connection, since: datetime, until: datetime | None,
                   city: str | int | None = None, *, ids: list[str] | None = None, after: str | None = None,
                   limit: int | None = None) -> list[UplinkSuccess]:
    """Per active device installed before `until` (None: now): stored uplinks in [since, until) ÷ whole
    reporting intervals expected in it (from installed_at when later than since), capped at 1; by device id.
    `ids`: only these devices; `after` / `limit`: only the devices after device id `after`, the first
    `limit` (a keyset page: the raw log is counted for those devices only)."""
    until = until or datetime.now(UTC)
    if until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    code = city_code(conn, city)
    page = (" AND d.device_id > %(after)s" if after is not None else "") + (
        " ORDER BY d.device_id LIMIT %(n)s" if limit is not None else "")
    sql = _SUCCESS_PAGED.format(page=page) if page else _SUCCESS
    rows = _fetch(conn, sql, {"t": until, "f": 1.0, "c": code, "ids": ids, "since": since, "until": until,
                              "after": after, "n": limit})
    return [UplinkSuccess(**r, success=min(1.0, r["received"] / r["expected"]) if r["expected"] > 0 else None)
            for r in rows]


# --------------------------------------------------------------------------- the report

def health_report(conn: psycopg.Connection, *, live_factor: float, tz: ZoneInfo, now: datetime | None = None,
                  city: str | int | None = None, battery_thresholds: dict[str, float] | None = None) -> HealthReport:
    """Online rates, silent and malformed-only devices and batteries at `now` (default: the database's clock);
    `battery_thresholds` are `batteries`' keyword thresholds (default: the module's)."""
    outer = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if outer:           # one snapshot: a device cannot be online in one list and silent in another
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        now = now or conn.execute("SELECT now()").fetchone()[0]
        online = online_rates(conn, live_factor=live_factor, tz=tz, now=now, city=city)
        silent, malformed = not_live(conn, now, live_factor=live_factor, city=city)
        longest = conn.execute("""SELECT coalesce(max(coalesce(d.reporting_interval_s, m.reporting_interval_s)), 0)
                                  FROM devices d JOIN device_models m USING (model)
                                  WHERE d.status = 'active'""").fetchone()[0]
        suppressed = suppressed_rejects(conn, now - timedelta(seconds=live_factor * longest), now)
        return HealthReport(now=now, online=tuple(online), silent=tuple(silent), malformed=tuple(malformed),
                            batteries=tuple(batteries(conn, now, city, **(battery_thresholds or {}))), suppressed_rejects=suppressed)
