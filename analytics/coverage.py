"""Coverage: every target's value, the breakdown by city × pilot × network, daily snapshots, as-of
reports and pace.  The definitions are the README's ("Coverage"); this module is their one place.

How a figure is made, for "now" and for any past day alike:

1. **Cells** — one pass over the registry reduces every device to a cell (site, model, network,
   active?) holding two counts: devices registered, devices live at the instant described.  `cells_now`
   reads the live state the writer keeps (`device_state`); `cells_at` rebuilds the state at the end of a
   past local day from the status history and the stored uplinks (a missed day is filled later).
2. **Evaluation** — `measure` computes every target from the cells with numpy (a mask and a
   `bincount` per target), so a hundred targets cost a hundred passes over the cells (a site × model ×
   active each: ~160,000 for a million devices at 10,000 sites),
   not a hundred scans of a million devices.

Device rules, the same in every figure: a retired device (or one installed after the instant) counts
nowhere; an inactive one is `registered` but never `active` nor `live` and is in no denominator; a device
is live when it is active and its last stored uplink lies within `live_factor` × its reporting interval
(the device's, else its model's) of the instant.  Plan targets count catalogue sites only: devices at
an unverified (free-text) site are reported apart and never counted toward them."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg

from iotjx.targets import A_GRADES, FAMILY_PILOT, CoverageTarget

log = logging.getLogger(__name__)

PACE_WINDOW_DAYS = 30
SNAPSHOT_LOCK = 0x10_7A_5D          # advisory lock: one process fills missed days at a time

_CELLS_NOW = """
    SELECT coalesce(d.site_id, 0), d.model, d.network, d.status = 'active', count(*),
           count(*) FILTER (WHERE d.status = 'active' AND st.last_seen >= %(t)s - make_interval(
               secs => %(f)s * coalesce(d.reporting_interval_s, m.reporting_interval_s)))
    FROM devices d
    JOIN device_models m ON m.model = d.model
    LEFT JOIN device_state st ON st.device_id = d.device_id
    WHERE d.status <> 'retired' AND d.installed_at <= %(t)s
    GROUP BY 1, 2, 3, 4"""

# The state at a past instant T: the status each device had then (its history; before its first entry,
# its first status), and whether a stored uplink arrived within its window before T.  device_state
# answers for a device last seen by T; one seen since is looked up in the raw log, else in the readings.
_UPLINK_TABLES = ("raw_uplinks", "water_readings", "fire_events", "traffic_flow", "parking_events")
_CELLS_AT = """
    WITH d AS (
        SELECT d.device_id, d.site_id, d.model, d.network,
               make_interval(secs => %(f)s * coalesce(d.reporting_interval_s, m.reporting_interval_s)) AS w,
               coalesce((SELECT l.status FROM device_status_log l WHERE l.device_id = d.device_id AND l.since <= %(t)s
                         ORDER BY l.since DESC LIMIT 1),
                        (SELECT l.status FROM device_status_log l WHERE l.device_id = d.device_id
                         ORDER BY l.since LIMIT 1),
                        d.status) AS status
        FROM devices d JOIN device_models m ON m.model = d.model
        WHERE d.installed_at <= %(t)s)
    SELECT coalesce(d.site_id, 0), d.model, d.network, d.status = 'active', count(*),
           count(*) FILTER (WHERE d.status = 'active' AND st.first_seen <= %(t)s AND (
               st.last_seen BETWEEN %(t)s - d.w AND %(t)s
               OR (st.last_seen > %(t)s AND ({probes}))))
    FROM d LEFT JOIN device_state st ON st.device_id = d.device_id
    WHERE d.status <> 'retired'
    GROUP BY 1, 2, 3, 4"""
_PROBE = ("EXISTS (SELECT 1 FROM {table} r WHERE r.device_id = d.device_id AND r.{col} > %(t)s - d.w "
          "AND r.{col} <= %(t)s{extra})")
CELLS_AT = _CELLS_AT.format(probes=" OR ".join(
    _PROBE.format(table=t, col="received_at" if t == "raw_uplinks" else "time",
                  extra=" AND r.outcome = 'stored'" if t == "raw_uplinks" else "") for t in _UPLINK_TABLES))


# --------------------------------------------------------------------------- the state: cells and sites

@dataclass(frozen=True, slots=True)
class Sites:
    """Every site, as arrays indexed by position (`index` maps site_id → position)."""

    site_id: np.ndarray
    city: np.ndarray
    kind: np.ndarray              # object (str)
    grade_rank: np.ndarray        # 1..5 for 1A..5A, 0 otherwise
    grade: np.ndarray             # object (str or None)
    verified: np.ndarray          # bool: a catalogue site
    model_site: np.ndarray        # bool: a model site on the day described
    open: np.ndarray              # bool: in the catalogue on the day described
    index: dict[int, int]

    @classmethod
    def load(cls, conn: psycopg.Connection, day: date) -> Sites:
        rows = conn.execute("""
            SELECT site_id, city_code, kind, grade, code IS NOT NULL,
                   model_site AND coalesce(model_site_since <= %(d)s, true),
                   coalesce(opened_on <= %(d)s, true) AND coalesce(closed_on > %(d)s, true)
            FROM sites ORDER BY site_id""", {"d": day}).fetchall()
        # position 0 stands for "no site" (devices registered without one)
        rows.insert(0, (0, 0, "", None, False, False, False))
        ids, city, kind, grade, verified, model, open_ = zip(*rows, strict=True)
        ranks = {g: i + 1 for i, g in enumerate(A_GRADES)}
        return cls(site_id=np.array(ids, dtype=np.int64), city=np.array(city, dtype=np.int64),
                   kind=np.array(kind, dtype=object), grade=np.array(grade, dtype=object),
                   grade_rank=np.array([ranks.get(g, 0) for g in grade], dtype=np.int8),
                   verified=np.array(verified, dtype=bool), model_site=np.array(model, dtype=bool),
                   open=np.array(open_, dtype=bool), index={int(s): i for i, s in enumerate(ids)})


@dataclass(frozen=True, slots=True)
class Cells:
    """Devices reduced to (site, model, network, active) cells with registered and live counts."""

    site: np.ndarray              # position in Sites
    model: np.ndarray             # object (str)
    family: np.ndarray            # object (str)
    network: np.ndarray           # object (str)
    active: np.ndarray            # bool
    registered: np.ndarray        # int64
    live: np.ndarray              # int64
    sites: Sites
    state_at: datetime
    day: date

    @classmethod
    def build(cls, rows: list[tuple], sites: Sites, families: dict[str, str], state_at: datetime, day: date) -> Cells:
        if rows:
            site, model, network, active, registered, live = zip(*rows, strict=True)
        else:
            site = model = network = active = registered = live = ()
        index = sites.index
        return cls(site=np.array([index.get(s, 0) for s in site], dtype=np.int64),
                   model=np.array(model, dtype=object),
                   family=np.array([families.get(m, "") for m in model], dtype=object),
                   network=np.array(network, dtype=object), active=np.array(active, dtype=bool),
                   registered=np.array(registered, dtype=np.int64), live=np.array(live, dtype=np.int64),
                   sites=sites, state_at=state_at, day=day)

    @property
    def city(self) -> np.ndarray:
        return self.sites.city[self.site]

    @property
    def verified(self) -> np.ndarray:
        return self.sites.verified[self.site]


def _families(conn: psycopg.Connection) -> dict[str, str]:
    return {m: f or p for m, f, p in conn.execute("SELECT model, family, pilot FROM device_models")}


def _one_pass(conn: psycopg.Connection, sql: str, params: dict[str, Any], day: date) -> tuple[list[tuple], Sites, dict[str, str]]:
    """The cells' rows, the sites and the models' families, read from one snapshot of the database (a
    site absorbed or a model added meanwhile cannot make the cells and the sites disagree)."""
    outer = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if outer:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # One hash aggregate in memory: no spill to disk, and no JIT compile for a query run every minute.
        conn.execute("SET LOCAL work_mem = '64MB'")
        conn.execute("SET LOCAL jit = off")
        rows = conn.execute(sql, params).fetchall()
        return rows, Sites.load(conn, day), _families(conn)


def local_day(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def day_end(day: date, tz: ZoneInfo) -> datetime:
    """The instant a local day ends (the next day's midnight), which its snapshot describes."""
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)


def cells_now(conn: psycopg.Connection, *, live_factor: float, tz: ZoneInfo, now: datetime | None = None) -> Cells:
    """The cells at `now` (default: the database's clock), from the live state the writer keeps."""
    now = now or conn.execute("SELECT now()").fetchone()[0]
    day = local_day(now, tz)
    rows, sites, families = _one_pass(conn, _CELLS_NOW, {"t": now, "f": live_factor}, day)
    return Cells.build(rows, sites, families, now, day)


def cells_at(conn: psycopg.Connection, day: date, *, live_factor: float, tz: ZoneInfo) -> Cells:
    """The cells at the end of local `day`, rebuilt from the status history and the stored uplinks."""
    at = day_end(day, tz)
    rows, sites, families = _one_pass(conn, CELLS_AT, {"t": at, "f": live_factor}, day)
    return Cells.build(rows, sites, families, at, day)


# --------------------------------------------------------------------------- evaluation

@dataclass(slots=True)
class Measured:
    """One target's figures at one instant."""

    value: float | None
    registered: int | None = None      # devices counted (at the sites in scope, for site measures)
    active: int | None = None
    live: int | None = None
    sites: int | None = None           # site measures: catalogue sites in scope
    sites_meeting: int | None = None


def _device_mask(t: CoverageTarget, cells: Cells) -> np.ndarray:
    crit = t.devices
    mask = np.zeros(len(cells.model), dtype=bool)
    if crit is None:
        return mask
    if crit.families:
        mask |= np.isin(cells.family, list(crit.families))
    if crit.models:
        mask |= np.isin(cells.model, list(crit.models))
    if crit.network:
        mask &= cells.network == crit.network
    if t.city is not None:
        mask &= cells.city == t.city
    if t.source == "plan":
        mask &= cells.verified
    return mask


def _candidate_sites(t: CoverageTarget, sites: Sites) -> np.ndarray:
    match = np.zeros(len(sites.site_id), dtype=bool)
    for c in t.sites:
        m = sites.kind == c.kind
        if c.min_grade:
            m &= sites.grade_rank >= A_GRADES.index(c.min_grade) + 1
        if c.grades:
            m &= np.isin(sites.grade, list(c.grades))
        if c.model_site:
            m &= sites.model_site
        match |= m
    match &= sites.verified & sites.open
    if t.city is not None:
        match &= sites.city == t.city
    return match


def measure(t: CoverageTarget, cells: Cells, entries: Entries) -> Measured:
    """One target's value from the cells (operator targets: the entered figure of the cells' day)."""
    if t.measure == "operator":
        return Measured(figure_on(entries[t.target_id], cells.day))
    mask = _device_mask(t, cells)
    if t.measure == "live_devices":
        return Measured(float(cells.live[mask].sum()), registered=int(cells.registered[mask].sum()),
                        active=int(cells.registered[mask & cells.active].sum()), live=int(cells.live[mask].sum()))
    candidates = _candidate_sites(t, cells.sites)
    n = len(cells.sites.site_id)
    at_site = mask & candidates[cells.site]
    live = np.bincount(cells.site[at_site], weights=cells.live[at_site], minlength=n)
    on = at_site & cells.active
    active = np.bincount(cells.site[on], weights=cells.registered[on], minlength=n)
    meets = candidates & (live >= t.min_live)
    if t.min_live_share is not None:
        meets &= (active > 0) & (live * 100 >= t.min_live_share * active)
    n_sites, n_meeting = int(candidates.sum()), int(meets.sum())
    if t.measure == "sites_meeting":
        value: float | None = float(n_meeting)
    else:
        value = 100.0 * n_meeting / n_sites if n_sites else None
    return Measured(value, registered=int(cells.registered[at_site].sum()), active=int(active.sum()),
                    live=int(live.sum()), sites=n_sites, sites_meeting=n_meeting)


def breakdown_rows(cells: Cells) -> list[tuple[int, str, str, int, int, int]]:
    """(city, pilot, network, registered, active, live) for every combination that has devices."""
    pilot = np.array([FAMILY_PILOT.get(f, f) for f in cells.family], dtype=object)
    out: dict[tuple[int, str, str], list[int]] = {}
    city = cells.city
    for i in range(len(cells.model)):
        key = (int(city[i]), pilot[i], cells.network[i])
        acc = out.setdefault(key, [0, 0, 0])
        acc[0] += int(cells.registered[i])
        acc[1] += int(cells.registered[i]) if cells.active[i] else 0
        acc[2] += int(cells.live[i])
    return sorted((c, p, n, *v) for (c, p, n), v in out.items())


def unverified(cells: Cells) -> dict[str, int]:
    """Devices at free-text (unverified) sites, and those sites: never counted toward a plan target."""
    mask = ~cells.verified & (cells.site > 0)
    return {"sites": int(len(np.unique(cells.site[mask]))), "devices": int(cells.registered[mask].sum()),
            "live": int(cells.live[mask].sum())}


# --------------------------------------------------------------------------- operator figures

Entries = dict[str, list[tuple[date, float]]]


def operator_entries(conn: psycopg.Connection, target_ids: list[str], last: date) -> Entries:
    """Every entry of these operator targets describing `last` or earlier, in the order they supersede
    each other (the day described, then when entered): one query for all of them."""
    out: Entries = {tid: [] for tid in target_ids}
    for tid, d, v in conn.execute("""
            SELECT target_id, as_of, value FROM target_progress_log WHERE target_id = ANY(%s) AND as_of <= %s
            ORDER BY target_id, as_of, entered_at, entry_id""", (target_ids, last)):
        out[tid].append((d, v))
    return out


def figure_on(entries: list[tuple[date, float]], day: date) -> float | None:
    """The figure of `day`: the last entry describing that day or an earlier one."""
    current = None
    for d, v in entries:
        if d > day:
            break
        current = v
    return current


def figure_series(entries: list[tuple[date, float]], first: date, last: date) -> dict[date, float]:
    """The figure of every day of [first, last] that has one."""
    out: dict[date, float] = {}
    current, k = None, 0
    day = first
    while day <= last:
        while k < len(entries) and entries[k][0] <= day:
            current = entries[k][1]
            k += 1
        if current is not None:
            out[day] = current
        day += timedelta(days=1)
    return out


# --------------------------------------------------------------------------- pace and verdicts

@dataclass(frozen=True, slots=True)
class Pace:
    """Where a target stands against its deadline, from its daily values."""

    status: str                        # met / missed / on_track / at_risk / unknown
    met_at_deadline: bool | None       # once the deadline has passed: the verdict (None: no figure that day)
    value_at_deadline: float | None
    pace_needed: float | None          # per day, to reach the target by the deadline
    pace_observed: float | None        # per day, over the last PACE_WINDOW_DAYS (or the days there are)
    observed_days: int | None
    projected_date: date | None        # when the observed pace reaches the target
    at_risk: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def pace(t: CoverageTarget, day: date, value: float | None, history: dict[date, float]) -> Pace:
    """The verdict and pace of `t` on `day`, given its value that day and its daily values before."""
    if t.deadline < day:
        at = value if t.deadline == day else history.get(t.deadline)
        met = None if at is None else at >= t.value
        return Pace("unknown" if met is None else ("met" if met else "missed"), met, at, None, None, None, None, None)
    if value is None:
        return Pace("unknown", None, None, None, None, None, None, None)
    remaining = t.value - value
    days_left = (t.deadline - day).days
    if remaining <= 0:
        return Pace("met", None, None, 0.0, None, None, None, False)
    needed = remaining / days_left if days_left > 0 else remaining
    earlier = [d for d in history if day - timedelta(days=PACE_WINDOW_DAYS) <= d < day]
    if not earlier:
        return Pace("unknown", None, None, needed, None, None, None, None)
    start = min(earlier)
    span = (day - start).days
    observed = (value - history[start]) / span
    projected = day + timedelta(days=math.ceil(remaining / observed)) if observed > 0 else None
    risk = projected is None or projected > t.deadline
    return Pace("at_risk" if risk else "on_track", None, None, needed, observed, span, projected, risk)


# --------------------------------------------------------------------------- reports

@dataclass(slots=True)
class Report:
    """Every target and the breakdown at one instant (now, or the end of a past day)."""

    generated_at: datetime
    state_at: datetime
    day: date
    source: str                                    # live / snapshot
    targets: list[dict[str, Any]]
    breakdown: list[dict[str, Any]]
    unverified: dict[str, int] = field(default_factory=dict)
    compute_s: float = 0.0


def _history(conn: psycopg.Connection, targets: list[CoverageTarget], first: date, last: date,
             entries: Entries) -> dict[str, dict[date, float]]:
    """Daily values of every target over [first, last]: snapshots for measured targets, the entries
    for operator targets (a figure entered late still counts for the day it describes)."""
    out: dict[str, dict[date, float]] = {t.target_id: {} for t in targets}
    ids = [t.target_id for t in targets if t.measure != "operator"]
    for tid, d, v in conn.execute("""SELECT target_id, day, value FROM coverage_snapshots
                                     WHERE target_id = ANY(%s) AND day BETWEEN %s AND %s AND value IS NOT NULL""",
                                  (ids, first, last)):
        out[tid][d] = v
    for t in targets:
        if t.measure == "operator":
            out[t.target_id] = figure_series(entries[t.target_id], first, last)
    return out


def daily_values(conn: psycopg.Connection, targets: list[CoverageTarget], day: date,
                 days: int) -> dict[str, list[dict[str, Any]]]:
    """Each target's daily values over the `days` days before `day`, as a report row's `history`."""
    entries = operator_entries(conn, _operator_ids(targets), day)
    history = _history(conn, targets, day - timedelta(days=days), day - timedelta(days=1), entries)
    return {tid: [{"day": d, "value": v} for d, v in sorted(h.items())] for tid, h in history.items()}


def _deadline_values(conn: psycopg.Connection, targets: list[CoverageTarget], day: date,
                     entries: Entries) -> dict[str, dict[date, float]]:
    """Each passed deadline's value (its day's snapshot, or the operator figure for that day)."""
    out: dict[str, dict[date, float]] = {}
    passed = [t for t in targets if t.deadline < day]
    pairs = [(t.target_id, t.deadline) for t in passed if t.measure != "operator"]
    if pairs:
        ids, days = zip(*pairs, strict=True)
        for tid, d, v in conn.execute("""
                SELECT s.target_id, s.day, s.value FROM coverage_snapshots s
                JOIN unnest(%s::text[], %s::date[]) AS p(target_id, day) USING (target_id, day)
                WHERE s.value IS NOT NULL""", (list(ids), list(days))):
            out.setdefault(tid, {})[d] = v
    for t in passed:
        if t.measure == "operator":
            v = figure_on(entries[t.target_id], t.deadline)
            if v is not None:
                out.setdefault(t.target_id, {})[t.deadline] = v
    return out


def _operator_ids(targets: list[CoverageTarget]) -> list[str]:
    return [t.target_id for t in targets if t.measure == "operator"]


def _target_row(t: CoverageTarget, m: Measured, p: Pace, names: dict[int, str], history: dict[date, float],
                history_days: int, day: date) -> dict[str, Any]:
    percent = None if m.value is None else round(100.0 * m.value / t.value, 2)
    first = day - timedelta(days=history_days)
    return {**t.as_dict(), "city_name": names.get(t.city) if t.city else None, "target": t.value,
            "value": m.value, "percent": percent, "registered": m.registered, "active": m.active, "live": m.live,
            "sites_in_scope": m.sites, "sites_meeting": m.sites_meeting, **p.as_dict(),
            "history": [{"day": d, "value": v} for d, v in sorted(history.items()) if d >= first]}


def _city_names(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT code, name_en FROM cities").fetchall())


def _breakdown_dicts(conn: psycopg.Connection, rows: Iterable[tuple]) -> list[dict[str, Any]]:
    names = {c: (zh, en) for c, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities")}
    return [{"city": c or None, "city_zh": names.get(c, (None, None))[0], "city_en": names.get(c, (None, None))[1],
             "pilot": p, "network": n, "registered": r, "active": a, "live": lv} for c, p, n, r, a, lv in rows]


def _standings(conn: psycopg.Connection, catalogue: list[CoverageTarget], day: date, history_days: int,
               measured: Callable[[CoverageTarget, Entries], Measured]) -> list[dict[str, Any]]:
    """Every target's row on `day`: its figures (`measured`), its daily values before, its verdict and pace."""
    entries = operator_entries(conn, _operator_ids(catalogue), day)
    window = max(history_days, PACE_WINDOW_DAYS)
    history = _history(conn, catalogue, day - timedelta(days=window), day - timedelta(days=1), entries)
    deadlines = _deadline_values(conn, catalogue, day, entries)
    names = _city_names(conn)
    rows = []
    for t in catalogue:
        m = measured(t, entries)
        h = {**history[t.target_id], **deadlines.get(t.target_id, {})}
        rows.append(_target_row(t, m, pace(t, day, m.value, h), names, history[t.target_id], history_days, day))
    return rows


def compute_now(conn: psycopg.Connection, catalogue: list[CoverageTarget], *, live_factor: float, tz: ZoneInfo,
                history_days: int = PACE_WINDOW_DAYS, now: datetime | None = None) -> Report:
    """The whole report at `now` in one pass over the registry (what `/coverage` answers from)."""
    started = time.perf_counter()
    cells = cells_now(conn, live_factor=live_factor, tz=tz, now=now)
    day = cells.day

    rows = _standings(conn, catalogue, day, history_days, lambda t, entries: measure(t, cells, entries))
    return Report(generated_at=datetime.now(UTC), state_at=cells.state_at, day=day, source="live", targets=rows,
                  breakdown=_breakdown_dicts(conn, breakdown_rows(cells)), unverified=unverified(cells),
                  compute_s=time.perf_counter() - started)


class NoSnapshot(LookupError):
    """No snapshot of the day asked for."""


def snapshot_range(conn: psycopg.Connection) -> tuple[date | None, date | None, int]:
    return conn.execute("SELECT min(day), max(day), count(*) FROM coverage_snapshot_days").fetchone()


def report_as_of(conn: psycopg.Connection, catalogue: list[CoverageTarget], day: date, *,
                 history_days: int = PACE_WINDOW_DAYS) -> Report:
    """The report at the end of local `day`, from its snapshot (NoSnapshot when there is none)."""
    started = time.perf_counter()
    row = conn.execute("SELECT state_at FROM coverage_snapshot_days WHERE day = %s", (day,)).fetchone()
    if row is None:
        first, last, n = snapshot_range(conn)
        where = f"snapshots exist for {n} day(s), {first} to {last}" if n else "no snapshot has been taken yet"
        raise NoSnapshot(f"no coverage snapshot of {day} ({where}); take it with `iotjx coverage snapshot --day {day}`")
    stored = {r[0]: r[1:] for r in conn.execute("""
        SELECT target_id, value, registered, active, live, sites, sites_meeting FROM coverage_snapshots
        WHERE day = %s""", (day,))}

    def measured(t: CoverageTarget, entries: Entries) -> Measured:
        if t.measure == "operator":
            return Measured(figure_on(entries[t.target_id], day))
        if t.target_id in stored:
            return Measured(*stored[t.target_id])
        return Measured(None)        # a target added to the catalogue after this day: nothing was measured

    rows = _standings(conn, catalogue, day, history_days, measured)
    breakdown = conn.execute("""SELECT city_code, pilot, network, registered, active, live FROM coverage_breakdown_daily
                                WHERE day = %s ORDER BY 1, 2, 3""", (day,)).fetchall()
    return Report(generated_at=datetime.now(UTC), state_at=row[0], day=day, source="snapshot", targets=rows,
                  breakdown=_breakdown_dicts(conn, breakdown), compute_s=time.perf_counter() - started)


# --------------------------------------------------------------------------- snapshots

def take_snapshot(conn: psycopg.Connection, day: date, catalogue: list[CoverageTarget], settings, *,
                  how: str = "scheduled", retake: bool = False) -> bool:
    """Store the end of local `day`: every target's figures and the breakdown, in one transaction.
    Idempotent: a day already taken is left alone (False) unless `retake`; two processes taking the same
    day at once write it once (the second waits on the first's row, then finds it)."""
    tz = settings.tz
    if day_end(day, tz) > conn.execute("SELECT now()").fetchone()[0]:
        raise ValueError(f"{day} has not ended yet in {settings.timezone}: only a past day has a snapshot")
    started = time.perf_counter()
    with conn.transaction():
        if retake:
            conn.execute("DELETE FROM coverage_snapshot_days WHERE day = %s", (day,))
            how = "retaken"
        claimed = conn.execute("""
            INSERT INTO coverage_snapshot_days (day, state_at, how, devices, duration_s) VALUES (%s, %s, %s, 0, 0)
            ON CONFLICT (day) DO NOTHING RETURNING day""", (day, day_end(day, tz), how)).fetchone()
        if claimed is None:
            return False
        cells = cells_at(conn, day, live_factor=settings.live_factor, tz=tz)
        entries = operator_entries(conn, _operator_ids(catalogue), day)
        rows = []
        for t in catalogue:
            m = measure(t, cells, entries)
            rows.append((day, t.target_id, m.value, t.value, m.registered, m.active, m.live, m.sites, m.sites_meeting))
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO coverage_snapshots (day, target_id, value, target_value, registered, active,
                                                               live, sites, sites_meeting)
                               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""", rows)
            cur.executemany("""INSERT INTO coverage_breakdown_daily (day, city_code, pilot, network, registered, active, live)
                               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                            [(day, *r) for r in breakdown_rows(cells)])
        conn.execute("UPDATE coverage_snapshot_days SET devices = %s, duration_s = %s WHERE day = %s",
                     (int(cells.registered.sum()), time.perf_counter() - started, day))
    return True


def days_to_take(conn: psycopg.Connection, settings, *, first: date | None = None,
                 now: datetime | None = None) -> list[date]:
    """Past days without a snapshot: every missing day from `first` (default: the first day ever taken,
    else yesterday) to the last day that ended at least `coverage_snapshot_delay_s` ago."""
    tz = settings.tz
    now = now or datetime.now(UTC)
    last = local_day(now - timedelta(seconds=settings.coverage_snapshot_delay_s), tz) - timedelta(days=1)
    taken_first = conn.execute("SELECT min(day) FROM coverage_snapshot_days").fetchone()[0]
    start = first or taken_first or last
    if start > last:
        return []
    taken = {r[0] for r in conn.execute("SELECT day FROM coverage_snapshot_days WHERE day BETWEEN %s AND %s",
                                        (start, last))}
    return [start + timedelta(days=k) for k in range((last - start).days + 1)
            if start + timedelta(days=k) not in taken]


def fill_snapshots(connect: Callable[[], psycopg.Connection], catalogue: list[CoverageTarget], settings, *,
                   first: date | None = None, now: datetime | None = None,
                   on_day: Callable[[date, bool], None] | None = None) -> list[date]:
    """Take every missing past day's snapshot (oldest first); returns the days taken now.  One process
    at a time fills (others skip); each day is its own transaction, so an interruption keeps what was done."""
    taken = []
    with connect() as conn:
        conn.autocommit = True
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (SNAPSHOT_LOCK,)).fetchone()[0]:
            return []
        try:
            days = days_to_take(conn, settings, first=first, now=now)
            latest = days[-1] if days else None
            for day in days:
                done = take_snapshot(conn, day, catalogue, settings, how="scheduled" if day == latest else "filled")
                if done:
                    taken.append(day)
                if on_day:
                    on_day(day, done)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SNAPSHOT_LOCK,))
    return taken


def catalogue_problems(conn: psycopg.Connection, catalogue: list[CoverageTarget]) -> list[str]:
    """What the targets catalogue asks of the site catalogue that it lacks: a site target no catalogue
    site can count toward (its figure would be an empty 0 or no percent at all), said at start-up."""
    today = datetime.now(UTC).date()
    sites = Sites.load(conn, today)
    out = []
    for t in catalogue:
        if t.measure in ("site_share", "sites_meeting") and not _candidate_sites(t, sites).any():
            what = " or ".join(c.describe() for c in t.sites)
            where = f" in city {t.city}" if t.city else ""
            out.append(f"target {t.target_id}: no open catalogue site is a {what}{where}; import the site catalogue "
                       "(`iotjx sites import FILE`) or its figure stays empty")
    return out


# --------------------------------------------------------------------------- the service behind /coverage

class CoverageService:
    """Keeps the current report: recomputed in one pass every `coverage_refresh_s` by a background
    thread (0: for every request), and fills missed snapshots every `snapshot_every_s`."""

    def __init__(self, connect: Callable[[], psycopg.Connection], catalogue: list[CoverageTarget], settings, *,
                 snapshot_every_s: float = 300.0) -> None:
        self._connect = connect
        self.catalogue = catalogue
        self.settings = settings
        self.snapshot_every_s = snapshot_every_s
        self._report: Report | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _compute(self) -> Report:
        with self._connect() as conn:
            return compute_now(conn, self.catalogue, live_factor=self.settings.live_factor, tz=self.settings.tz)

    def report(self) -> Report:
        refresh = self.settings.coverage_refresh_s
        if refresh <= 0:
            return self._compute()
        current = self._report
        # Stale beyond three periods (the refresher is failing): recompute here, so the caller gets the
        # truth or the database's error.
        if current is None or time.time() - current.generated_at.timestamp() > 3 * refresh + current.compute_s:
            with self._lock:
                current = self._report
                if current is None or time.time() - current.generated_at.timestamp() > 3 * refresh + current.compute_s:
                    current = self._report = self._compute()
        return current

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coverage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        refresh = self.settings.coverage_refresh_s
        try:
            with self._connect() as conn:
                for problem in catalogue_problems(conn, self.catalogue):
                    log.warning("coverage: %s", problem)
        except (psycopg.Error, OSError):
            pass                        # the database is away: the loop below says so
        next_snapshot = time.monotonic()
        failing = False
        while not self._stop.is_set():
            try:
                if refresh > 0:
                    report = self._compute()
                    with self._lock:
                        self._report = report
                if time.monotonic() >= next_snapshot:
                    next_snapshot = time.monotonic() + self.snapshot_every_s
                    for day in fill_snapshots(self._connect, self.catalogue, self.settings):
                        log.info("coverage snapshot of %s taken", day)
                if failing:
                    log.info("coverage: the report is computed again")
                failing = False
            except (psycopg.Error, OSError) as exc:
                if not failing:
                    log.warning("coverage: cannot compute the report (%s); retrying", exc)
                failing = True
            self._stop.wait(refresh if refresh > 0 else self.snapshot_every_s)
