"""Fire: alarm and fault lifecycles per component, offline devices, and the monitoring centre's KPIs.

Definitions (the README's "Fire alarms" paragraph says the same):

* **An alarm** (kind ``alarm``) or **a fault** (kind ``fault``) is one episode of a component's
  fire-alarm or fault bit in GB/T 26875.3 component-state objects (``fire_events`` rows with
  ``app_type`` 2), per component = (device, system type, system address, component type, component
  address).  Frames are ordered by their **own time label** — the object's time (``event_time``), else
  the frame's (``sent_at``), else the receive time — a label being used only where it is plausible, the
  same window as the rollups' measurement time: no more than 7 days behind and 300 s ahead of the
  receive time.  An episode starts at the first frame with the bit set after one with it clear (or
  after none) and ends at the next frame with it clear: the device's **restore**.  Frames that repeat
  the bit (an NB detector's heartbeat during an alarm) belong to the episode; so a raise that arrives
  hours after its own restore still makes one alarm, with ``raised_at`` and ``restored_at`` from the
  labels.  ``received_at`` is when the first frame showing the episode arrived (the centre could
  show it).  UITD (type 21) and system (type 1) states summarise their components and are not counted
  again; the CTWing profile detectors' ``alarm_status`` has no component and is not counted yet.
* **States** (ISA-18.2 / ThingsBoard): ``active_unacked`` → ``active_acked`` → ``cleared``;
  cleared while unacknowledged = ``cleared_unacked`` (acknowledging it makes it ``cleared``).  The
  state is derived from ``acked_at`` and ``cleared_at`` (a generated column), never stored apart.
  Cleared = restored by the device (``cleared_by`` = "device", ``cleared_at`` = ``restored_at``) or
  cleared by an operator first (`clear`, which also acknowledges).  ``false_alarm`` is the operator's
  verdict, given by `clear`, also after the device restored; NULL until given.
* **Offline**: an active fire device whose last stored uplink (``device_state.last_seen``; never seen:
  its ``installed_at``) is more than 2 × its reporting interval (the device's, else its model's: the
  UITD heartbeat 300 s → offline after 10 min) before ``now``.
* **KPIs** over alarms (kind ``alarm``) raised in [since, until), per city of the device's site (0:
  no site): acknowledgement latency = ``acked_at`` − ``received_at`` in seconds, p50/p90 over the
  acknowledged alarms (linear interpolation, as PostgreSQL's percentile_cont); the share acknowledged
  within GB 50440's 10 s display budget = acknowledged within 10 s / all alarms raised.  False-alarm
  share per site = alarms with the verdict false / alarms with a verdict (alarms without one counted
  apart).

`update_alarms` computes the rows from ``fire_events``: idempotently (a transaction-scoped advisory
lock serialises runs, from any number of processes; the unique key (component, kind, raised_at)
backs it), and incrementally: its watermark is the latest receive time (``fire_events.time``) of the component-state
rows read so far — it follows the data, not the wall clock, so a capture replayed with its original
receive times is read in its own time — and a run reads the rows received after the watermark minus a
safety margin (``margin_s``, 1 hour), so that rows committed up to an hour behind newer ones (a slow
batch, another gateway's batch, a short outage replayed from the gateway's spool) are still seen.  Rows committed later than that (a
longer outage) are seen by ``full=True``, which recomputes every component and gives the same rows as
incremental runs would have.  For each component touched, only the frames from the start of its
episode open at (or ending after) the earliest new label are re-read; episodes already stored are
matched by time (a late raise moves ``raised_at`` earlier; a late restore inside an episode splits it),
keeping the operator's acknowledgement and verdict."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from analytics.incremental import advance, begin
from analytics.rollups import MEASUREMENT_AHEAD_S, MEASUREMENT_BEHIND_S

log = logging.getLogger(__name__)

LOCK_ID = 0x10_F1_2E                 # pg_advisory_xact_lock key serialising update_alarms
MARGIN_S = 3600.0                    # re-read rows received this long before the watermark
# A time label is plausible from 7 days before the receive time to 300 s after it: the rollups' window.
LABEL_BEHIND_S = MEASUREMENT_BEHIND_S
LABEL_AHEAD_S = MEASUREMENT_AHEAD_S
OFFLINE_FACTOR = 2                   # offline after 2 × the heartbeat (reporting) interval
DISPLAY_BUDGET_S = 10.0              # GB 50440: transmission device → centre display
DEVICE = "device"                    # cleared_by of an alarm cleared by the device's restore frame
KINDS = ("alarm", "fault")
STATES = ("active_unacked", "active_acked", "cleared_unacked", "cleared")
KEY = ("device_id", "system_type", "system_address", "component_type", "component_address")


class FireAlarmError(Exception):
    """Base of this module's refusals; `status` is the HTTP code the API answers with."""

    status = 400


class AlarmNotFound(FireAlarmError):
    status = 404


class InvalidTransition(FireAlarmError):
    """The alarm's state does not allow what was asked (acknowledged twice, a verdict given twice…)."""

    status = 409


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm or fault lifecycle, as stored in fire_alarms."""

    alarm_id: int
    device_id: str
    system_type: int
    system_address: int
    component_type: int
    component_address: int
    kind: str
    state: str
    raised_at: datetime
    received_at: datetime
    description: str | None
    restored_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    cleared_at: datetime | None
    cleared_by: str | None
    false_alarm: bool | None
    note: str
    city_code: int | None = None
    site_name: str | None = None


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """What one update_alarms run did."""

    components: int                  # (component, kind) pairs re-read
    inserted: int
    updated: int
    merged: int                      # rows folded into another (a late frame joined two episodes)
    read_to: datetime | None         # the watermark after this run (None: no state row read yet)


@dataclass(frozen=True, slots=True)
class OfflineDevice:
    device_id: str
    model: str
    city_code: int | None
    site_name: str | None
    last_seen: datetime | None       # None: never heard since installation
    interval_s: int
    silent_s: float                  # now − (last_seen or installed_at)


@dataclass(frozen=True, slots=True)
class CityAckKpi:
    city_code: int                   # 0: devices without a site
    city: str
    alarms: int                      # alarms raised in the period
    acked: int
    ack_p50_s: float | None
    ack_p90_s: float | None
    within_budget: int               # acknowledged within DISPLAY_BUDGET_S of received_at
    share_within_budget: float | None


@dataclass(frozen=True, slots=True)
class SiteFalseAlarms:
    site_id: int | None
    site_name: str | None
    city_code: int
    alarms: int
    with_verdict: int
    false_alarms: int
    false_share: float | None        # false / with a verdict


@dataclass(frozen=True, slots=True)
class FireKpis:
    since: datetime
    until: datetime
    cities: tuple[CityAckKpi, ...]
    sites: tuple[SiteFalseAlarms, ...]


# --------------------------------------------------------------------------- the lifecycle from fire_events

def _label_sql(e: str = "e") -> str:
    """SQL of a fire_events row's ordering time: its plausible time label, else its receive time."""
    def plausible(col: str) -> str:
        return (f"{e}.{col} BETWEEN {e}.time - interval '{LABEL_BEHIND_S} seconds' "
                f"AND {e}.time + interval '{LABEL_AHEAD_S} seconds'")
    return (f"CASE WHEN {plausible('event_time')} THEN {e}.event_time "
            f"WHEN {plausible('sent_at')} THEN {e}.sent_at ELSE {e}.time END")


_STATE_ROWS = """
    FROM fire_events e
    CROSS JOIN LATERAL (VALUES ('alarm', e.fire_alarm), ('fault', e.fault)) AS f(kind, flag)
    WHERE e.app_type = 2 AND e.component_address IS NOT NULL AND f.flag IS NOT NULL"""

_KEYS = ", ".join(KEY)


@dataclass(slots=True)
class _Episode:
    raised_at: datetime
    received_at: datetime
    description: str | None
    restored_at: datetime | None = None
    restore_received_at: datetime | None = None


def episodes(frames: Iterable[tuple[datetime, datetime, bool, str | None]]) -> list[_Episode]:
    """The episodes of one component's flag from its frames (label, received, flag set, description),
    sorted by (label, received): each from a set frame after a clear one (or none) to the next clear."""
    out: list[_Episode] = []
    current: _Episode | None = None
    for label, received, flag, description in frames:
        if flag:
            if current is None:
                current = _Episode(label, received, description)
                out.append(current)
            elif received < current.received_at:
                current.received_at = received
        elif current is not None:
            current.restored_at, current.restore_received_at = label, received
            current = None
    return out


def update_alarms(conn: psycopg.Connection, *, margin_s: float = MARGIN_S, full: bool = False) -> UpdateResult:
    """Bring fire_alarms up to date with fire_events (see the module docstring); safe to run twice and
    from several processes at once."""
    inserted = updated = merged = 0
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        run = begin(cur, lock_id=LOCK_ID, progress_table="fire_alarm_progress", touched_table="fire_touched",
                    margin_s=margin_s, full=full)
        # Each (component, kind) with rows received since the watermark, and the earliest new label.
        cur.execute(f"""
            CREATE TEMP TABLE fire_touched ON COMMIT DROP AS
            SELECT {_KEYS}, f.kind, min({_label_sql()}) AS t_new, max(e.time) AS seen_to
            {_STATE_ROWS} AND (%(since)s::timestamptz IS NULL OR e.time > %(since)s)
            GROUP BY {_KEYS}, f.kind""", {"since": run.since})
        read_to = cur.execute("SELECT max(seen_to) AS m FROM fire_touched").fetchone()["m"]
        # Re-read from the start of the episode open at t_new (or ending after it): the state before
        # that point is "clear" by construction.
        cur.execute(f"""
            ALTER TABLE fire_touched ADD COLUMN t_start timestamptz;
            UPDATE fire_touched t SET t_start = least(t.t_new, (
                SELECT min(a.raised_at) FROM fire_alarms a
                WHERE ({', '.join('a.' + k for k in KEY)}, a.kind) = ({', '.join('t.' + k for k in KEY)}, t.kind)
                  AND (a.restored_at IS NULL OR a.restored_at >= t.t_new)))""")
        join = " AND ".join(f"x.{k} = t.{k}" for k in (*KEY, "kind"))
        cur.execute(f"""
            SELECT t.{', t.'.join(KEY)}, t.kind, x.label, x.time, x.flag, x.description
            FROM fire_touched t
            JOIN LATERAL (
                SELECT {_KEYS}, f.kind, {_label_sql()} AS label, e.time, f.flag, e.description
                {_STATE_ROWS} AND e.device_id = t.device_id
                  AND e.time >= t.t_start - interval '{LABEL_AHEAD_S} seconds') x ON {join}
            WHERE x.label >= t.t_start
            ORDER BY t.{', t.'.join(KEY)}, t.kind, x.label, x.time, x.flag""")
        frames: dict[tuple, list[tuple]] = {}
        for r in cur:
            frames.setdefault(tuple(r[k] for k in (*KEY, "kind")), []).append(
                (r["label"], r["time"], r["flag"], r["description"]))
        cur.execute(f"""
            SELECT a.* FROM fire_alarms a JOIN fire_touched t
              ON ({', '.join('a.' + k for k in KEY)}, a.kind) = ({', '.join('t.' + k for k in KEY)}, t.kind)
            WHERE a.raised_at >= t.t_start ORDER BY a.raised_at, a.alarm_id FOR UPDATE OF a""")
        stored: dict[tuple, list[dict[str, Any]]] = {}
        for r in cur.fetchall():
            stored.setdefault(tuple(r[k] for k in (*KEY, "kind")), []).append(r)
        for key, rows in frames.items():
            i, u, m = _reconcile(cur, key, episodes(rows), stored.pop(key, []))
            inserted, updated, merged = inserted + i, updated + u, merged + m
        components = len(frames)
        read_to = advance(cur, run, read_to)
        left = sum(len(v) for v in stored.values())
        if left:
            log.warning("fire_alarms: %d stored episode(s) have no frames left in fire_events; kept", left)
    return UpdateResult(components, inserted, updated, merged, read_to)


def _reconcile(cur: psycopg.Cursor, key: tuple, found: list[_Episode],
               stored: list[dict[str, Any]]) -> tuple[int, int, int]:
    """Write the episodes found for one (component, kind) over the rows stored from the same point:
    a stored row whose raised_at falls inside an episode is that episode (the first such keeps its id
    and takes the others' acknowledgement and verdict); an episode without one is inserted."""
    inserted = updated = merged = 0
    pending = list(stored)
    for ep in found:
        inside = [r for r in pending if r["raised_at"] >= ep.raised_at
                  and (ep.restored_at is None or r["raised_at"] < ep.restored_at)]
        values = {"raised_at": ep.raised_at, "received_at": ep.received_at, "description": ep.description,
                  "restored_at": ep.restored_at, "restore_received_at": ep.restore_received_at}
        if not inside:
            cur.execute(f"""
                INSERT INTO fire_alarms ({_KEYS}, kind, raised_at, received_at, description, restored_at,
                                         restore_received_at, cleared_at, cleared_by)
                VALUES ({', '.join(['%s'] * len(KEY))}, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT DO NOTHING""",
                        (*key, ep.raised_at, ep.received_at, ep.description, ep.restored_at,
                         ep.restore_received_at, ep.restored_at, None if ep.restored_at is None else DEVICE))
            inserted += cur.rowcount
            continue
        keep, *fold = inside
        for r in inside:
            pending.remove(r)
        operator = _operator_fields(inside)
        if fold:
            cur.execute("DELETE FROM fire_alarms WHERE alarm_id = ANY(%s)", ([r["alarm_id"] for r in fold],))
            merged += len(fold)
        new = {**values, **operator}
        if new["cleared_by"] in (None, DEVICE):
            new["cleared_at"] = ep.restored_at
            new["cleared_by"] = None if ep.restored_at is None else DEVICE
        if any(keep[k] != v for k, v in new.items()):
            sets = ", ".join(f"{k} = %({k})s" for k in new)
            cur.execute(f"UPDATE fire_alarms SET {sets}, updated_at = now() WHERE alarm_id = %(alarm_id)s",
                        {**new, "alarm_id": keep["alarm_id"]})
            updated += 1
    return inserted, updated, merged


def _operator_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's part of rows folded into one: the earliest acknowledgement, the earliest
    operator clear, the first verdict."""
    acked = min((r for r in rows if r["acked_at"] is not None), key=lambda r: r["acked_at"], default=None)
    cleared = min((r for r in rows if r["cleared_by"] not in (None, DEVICE)), key=lambda r: r["cleared_at"],
                  default=None)
    verdict = min((r for r in rows if r["verdict_at"] is not None), key=lambda r: r["verdict_at"], default=None)
    return {"acked_at": acked and acked["acked_at"], "acked_by": acked and acked["acked_by"],
            "cleared_at": cleared and cleared["cleared_at"], "cleared_by": cleared and cleared["cleared_by"],
            "false_alarm": verdict and verdict["false_alarm"], "verdict_by": verdict and verdict["verdict_by"],
            "verdict_at": verdict and verdict["verdict_at"], "note": verdict["note"] if verdict else rows[0]["note"]}


# --------------------------------------------------------------------------- what operators do

_ALARM_SELECT = """
    SELECT a.alarm_id, a.device_id, a.system_type, a.system_address, a.component_type, a.component_address,
           a.kind, a.state, a.raised_at, a.received_at, a.description, a.restored_at, a.acked_at, a.acked_by,
           a.cleared_at, a.cleared_by, a.false_alarm, a.note, s.city_code, s.name AS site_name
    FROM fire_alarms a LEFT JOIN devices d USING (device_id) LEFT JOIN sites s ON s.site_id = d.site_id"""


def _locked(cur: psycopg.Cursor, alarm_id: int) -> dict[str, Any]:
    row = cur.execute("SELECT * FROM fire_alarms WHERE alarm_id = %s FOR UPDATE", (alarm_id,)).fetchone()
    if row is None:
        raise AlarmNotFound(f"no fire alarm {alarm_id}")
    return row


def _actor(actor: str) -> str:
    if not actor or not actor.strip() or actor == DEVICE:
        raise ValueError(f"an operator must be named (not {actor!r})")
    return actor


def _when(cur: psycopg.Cursor, row: dict[str, Any], at: datetime | None, what: str) -> datetime:
    when = at if at is not None else cur.execute("SELECT now() AS t").fetchone()["t"]
    if when < row["received_at"]:
        raise InvalidTransition(f"fire alarm {row['alarm_id']} cannot be {what} at {when.isoformat()}: "
                                f"the centre received it at {row['received_at'].isoformat()}")
    return when


def acknowledge(conn: psycopg.Connection, alarm_id: int, actor: str, *, at: datetime | None = None) -> Alarm:
    """The alarm acknowledged by `actor` (now, or `at`): active_unacked → active_acked, cleared_unacked
    → cleared.  InvalidTransition when it is already acknowledged, AlarmNotFound when there is none."""
    actor = _actor(actor)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = _locked(cur, alarm_id)
        if row["acked_at"] is not None:
            raise InvalidTransition(f"fire alarm {alarm_id} is {row['state']}: acknowledged by {row['acked_by']} "
                                    f"at {row['acked_at'].isoformat()}")
        when = _when(cur, row, at, "acknowledged")
        cur.execute("UPDATE fire_alarms SET acked_at = %s, acked_by = %s, updated_at = now() WHERE alarm_id = %s",
                    (when, actor, alarm_id))
    return get_alarm(conn, alarm_id)


def clear(conn: psycopg.Connection, alarm_id: int, actor: str, false_alarm: bool, note: str = "", *,
          at: datetime | None = None) -> Alarm:
    """The alarm cleared by `actor` with the verdict `false_alarm` and a note: an active alarm becomes
    cleared (and acknowledged, if it was not: clearing is acting on it); one the device already restored
    keeps its cleared_at and takes the verdict (and the acknowledgement if it had none).
    InvalidTransition when a verdict was already given, AlarmNotFound when there is no such alarm."""
    actor = _actor(actor)
    if not isinstance(false_alarm, bool):
        raise ValueError(f"false_alarm must be True or False, not {false_alarm!r}")
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = _locked(cur, alarm_id)
        if row["verdict_by"] is not None:
            raise InvalidTransition(
                f"fire alarm {alarm_id} was already cleared by {row['verdict_by']} at {row['verdict_at'].isoformat()} "
                f"({'false alarm' if row['false_alarm'] else 'real'})")
        when = _when(cur, row, at, "cleared")
        cur.execute("""
            UPDATE fire_alarms SET
                acked_at = coalesce(acked_at, %(t)s), acked_by = coalesce(acked_by, %(who)s),
                cleared_at = coalesce(cleared_at, %(t)s), cleared_by = coalesce(cleared_by, %(who)s),
                false_alarm = %(false)s, note = %(note)s, verdict_by = %(who)s, verdict_at = %(t)s,
                updated_at = now()
            WHERE alarm_id = %(id)s""", {"t": when, "who": actor, "false": false_alarm, "note": note or "",
                                         "id": alarm_id})
    return get_alarm(conn, alarm_id)


def get_alarm(conn: psycopg.Connection, alarm_id: int) -> Alarm:
    """One alarm; AlarmNotFound when there is none."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_ALARM_SELECT + " WHERE a.alarm_id = %s", (alarm_id,)).fetchone()
    if row is None:
        raise AlarmNotFound(f"no fire alarm {alarm_id}")
    return Alarm(**row)


def open_alarms(conn: psycopg.Connection, city: str | int | None = None) -> list[Alarm]:
    """Alarms and faults that still need someone: every state but cleared (an alarm the device restored
    stays open until acknowledged), oldest first."""
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_ALARM_SELECT + """ WHERE a.state <> 'cleared'
                           AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
                           ORDER BY a.raised_at, a.alarm_id""", {"c": code}).fetchall()
    return [Alarm(**r) for r in rows]


def city_code(conn: psycopg.Connection, city: str | int | None) -> int | None:
    """The division code of a city given by code, English or Chinese name (0: no site); None for None."""
    if city is None:
        return None
    text = str(city).strip()
    if text == "0":
        return 0
    row = conn.execute("SELECT code FROM cities WHERE code::text = %s OR lower(name_en) = lower(%s) OR name_zh = %s",
                       (text, text, text)).fetchone()
    if row is None:
        names = ", ".join(r[0] for r in conn.execute("SELECT name_en FROM cities ORDER BY code"))
        raise ValueError(f"unknown city {city!r}; known: {names}")
    return row[0]


# --------------------------------------------------------------------------- offline devices

def offline_devices(conn: psycopg.Connection, now: datetime, city: str | int | None = None, *,
                    offline_factor: float = OFFLINE_FACTOR, after: str | None = None,
                    limit: int | None = None) -> list[OfflineDevice]:
    """Active fire devices silent for more than `offline_factor` (2) × their reporting interval at `now`,
    longest silent first (installed after `now`: not yet expected).  With `after` or `limit`: by device id
    instead, those after device id `after`, the first `limit` (a keyset page, computed for its devices only)."""
    if not offline_factor > 0:
        raise ValueError(f"offline_factor must be > 0, not {offline_factor}")
    code = city_code(conn, city)
    paged = after is not None or limit is not None
    order = ("ORDER BY d.device_id" + (" LIMIT %(n)s" if limit is not None else "")) if paged \
        else "ORDER BY silent_s DESC, d.device_id"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT d.device_id, d.model, s.city_code, s.name AS site_name, st.last_seen,
                   coalesce(d.reporting_interval_s, m.reporting_interval_s) AS interval_s,
                   extract(epoch FROM %(now)s - coalesce(st.last_seen, d.installed_at))::float8 AS silent_s
            FROM devices d JOIN device_models m USING (model)
            LEFT JOIN device_state st USING (device_id)
            LEFT JOIN sites s ON s.site_id = d.site_id
            WHERE d.pilot = 'fire' AND d.status = 'active' AND d.installed_at <= %(now)s
              AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
              AND coalesce(st.last_seen, d.installed_at)
                  < %(now)s - %(k)s * coalesce(d.reporting_interval_s, m.reporting_interval_s) * interval '1 second'
            """ + (" AND d.device_id > %(after)s " if after is not None else "") + order,
                           {"now": now, "c": code, "k": offline_factor, "after": after, "n": limit}).fetchall()
    return [OfflineDevice(**r) for r in rows]


# --------------------------------------------------------------------------- KPIs

def fire_kpis(conn: psycopg.Connection, since: datetime, until: datetime,
              city: str | int | None = None) -> FireKpis:
    """Acknowledgement latency per city and false-alarm share per site, over alarms raised in
    [since, until) (definitions in the module docstring)."""
    if until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT coalesce(s.city_code, 0) AS city_code, coalesce(c.name_en, '(no site)') AS city,
                   d.site_id, s.name AS site_name,
                   extract(epoch FROM a.acked_at - a.received_at)::float8 AS ack_s, a.false_alarm
            FROM fire_alarms a LEFT JOIN devices d USING (device_id)
            LEFT JOIN sites s ON s.site_id = d.site_id LEFT JOIN cities c ON c.code = s.city_code
            WHERE a.kind = 'alarm' AND a.raised_at >= %(since)s AND a.raised_at < %(until)s
              AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)""",
                           {"since": since, "until": until, "c": code}).fetchall()
    by_city: dict[tuple[int, str], list[float | None]] = {}
    by_site: dict[tuple[int | None, str | None, int], list[bool | None]] = {}
    for r in rows:
        by_city.setdefault((r["city_code"], r["city"]), []).append(r["ack_s"])
        by_site.setdefault((r["site_id"], r["site_name"], r["city_code"]), []).append(r["false_alarm"])
    cities = []
    for (code_, name), acks in sorted(by_city.items()):
        lat = np.array([a for a in acks if a is not None], dtype=np.float64)
        within = int((lat <= DISPLAY_BUDGET_S).sum())
        p50, p90 = (np.percentile(lat, [50, 90]).tolist() if lat.size else (None, None))
        cities.append(CityAckKpi(code_, name, len(acks), int(lat.size), p50, p90, within, within / len(acks)))
    sites = []
    for (site_id, site_name, code_), verdicts in sorted(by_site.items(), key=lambda kv: (kv[0][2], kv[0][0] or 0)):
        given = [v for v in verdicts if v is not None]
        false = sum(given)
        sites.append(SiteFalseAlarms(site_id, site_name, code_, len(verdicts), len(given), false,
                                     false / len(given) if given else None))
    return FireKpis(since, until, tuple(cities), tuple(sites))
