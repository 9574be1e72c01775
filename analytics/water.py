"""Water: consumption per meter and local day, minimum night flow and leakage per site, per-meter alerts.

Definitions (the README's "Water" section says the same, with the thresholds):

* **Readings** are ``water_readings`` rows with a register (``flow_m3`` not NULL), per device, ordered by
  **measurement time** — the meter's clock where plausible, else the receive time
  (`analytics.rollups.measurement_times`: 7 days behind to 300 s ahead) — then by receive time.
* **A delta** is taken between consecutive readings of a device (`classify`): the register's increase;
  over a **roll-over** (a drop from at least ``REGISTER_MAX_M3 − ROLLOVER_BAND_M3`` to at most
  ``ROLLOVER_BAND_M3``) it is ``REGISTER_MAX_M3 + UNIT_M3 − old + new``; a **new series** starts at a new
  ``meter_address`` (a replacement) or at a drop not explained by roll-over nor reverse flow — its delta is
  the new register when that is at most ``NEW_METER_MAX_M3`` (a new meter counts from zero), else 0:
  never negative; a **reverse flow** is a decrease of at most ``REVERSE_MAX_M3`` on the same meter: a
  negative delta.  A delta belongs to the local day of its later reading.
* **Night flow**: the window (default 02:00–04:00 local) is cut into hourly slots; each delta whose
  readings are at most ``NIGHT_MAX_GAP_S`` apart is spread over its interval in proportion to time and
  the part inside a slot counts for it (a delta straddling the window's edge counts for the part inside).
  A meter's slot flow is that volume over the covered time (m³/h) when at least half the slot is
  covered; a meter-night counts only when every slot is (meters that report daily give none).  A
  site's **minimum night flow** (MNF) is the smallest, over the slots, of the sum of its counted meters'
  slot flows; its **leakage** is the 20th percentile (linear, as percentile_cont) of the MNF over that
  night and the six before (UKWIR 99/WM/08/21: rolling 7-day P20 of the nightly minimum).
* **Alerts** per meter, each opened and closed at the measurement time of a reading: continuous flow,
  reverse flow, stopped, battery low, valve closed, valve abnormal (rules in `alert_episodes`).

`update_water` computes all of it idempotently (a transaction-scoped advisory lock serialises runs from
any number of processes) and incrementally: its watermark is the latest receive time read; a run reads
the devices with readings received after the watermark minus ``margin_s`` and recomputes their days from
the local day of their earliest new measurement, reading ``WaterRules.context_s`` (8 days) of history before it (and the
reading before that) so a delta, a 24 h chain or a 7-day stop is seen whole; ``full=True`` recomputes
everything and gives the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
from psycopg.rows import dict_row

from analytics.fire import city_code
from analytics.incremental import advance, begin
from analytics.rollups import MEASUREMENT_AHEAD_S, MEASUREMENT_BEHIND_S, local_day, measurement_times

SHANGHAI = ZoneInfo("Asia/Shanghai")
LOCK_ID = 0x10_3A_7E                 # pg_advisory_xact_lock key serialising update_water
MARGIN_S = 3600.0                    # re-read rows received this long before the watermark

UNIT_M3 = 0.01                       # CJ/T 188 XXXXXX.XX: the register's resolution
REGISTER_MAX_M3 = 999_999.99         # …and its maximum
ROLLOVER_BAND_M3 = 1000.0            # a roll-over drops from within this of the maximum to within this of 0
REVERSE_MAX_M3 = 1.0                 # a decrease up to this on the same meter is reverse flow
NEW_METER_MAX_M3 = 10.0              # a new series' first register counts as consumption up to this

NIGHT_WINDOW = (2, 4)                # local hours [start, end): the minimum-night-flow window
NIGHT_MAX_GAP_S = 7200.0             # deltas over longer intervals say nothing about the night
NIGHT_MIN_COVER = 0.5                # share of a slot a meter's deltas must cover
LEAKAGE_DAYS = 7                     # UKWIR: rolling 7-day …
LEAKAGE_PERCENTILE = 0.2             # … 20th percentile of the nightly minimum

CONTINUOUS_FLOW_S = 24 * 3600.0      # a positive delta in every interval for this long opens it
CONTINUOUS_MAX_GAP_S = 5400.0        # intervals longer than this break the chain (daily meters never open)
# A zero delta over a shorter interval says nothing about a leak at the register's 0.01 m³ resolution (a
# reading minutes after a freeze record): it neither extends nor breaks the chain.
CONTINUOUS_MIN_ZERO_GAP_S = 1800.0
STOPPED_DAYS = 7                     # no consumption this long with the valve open: stopped meter
CONTEXT_S = (STOPPED_DAYS + 1) * 86400.0    # history re-read before the first recomputed day (default rules)

ALERT_KINDS = ("continuous_flow", "reverse_flow", "stopped", "battery_low", "valve_closed", "valve_abnormal")
FLOW, ROLLOVER, REVERSE, NEW_SERIES = "flow", "rollover", "reverse", "new_series"


@dataclass(frozen=True, slots=True)
class WaterRules:
    """The thresholds of the deltas, alerts and leakage (IOTJX_WATER_* settings); the defaults are the
    module's constants.  Rows stored under other rules are recomputed by ``update_water(full=True)``."""

    reverse_max_m3: float = REVERSE_MAX_M3
    new_meter_max_m3: float = NEW_METER_MAX_M3
    stopped_days: int = STOPPED_DAYS
    continuous_flow_s: float = CONTINUOUS_FLOW_S
    leakage_days: int = LEAKAGE_DAYS
    leakage_percentile: float = LEAKAGE_PERCENTILE

    def __post_init__(self) -> None:
        if not self.reverse_max_m3 > 0:
            raise ValueError(f"reverse_max_m3 must be > 0, not {self.reverse_max_m3}")
        if not self.new_meter_max_m3 >= 0:
            raise ValueError(f"new_meter_max_m3 must be >= 0, not {self.new_meter_max_m3}")
        if not (isinstance(self.stopped_days, int) and self.stopped_days >= 1):
            raise ValueError(f"stopped_days must be a whole number >= 1, not {self.stopped_days!r}")
        if not self.continuous_flow_s > 0:
            raise ValueError(f"continuous_flow_s must be > 0, not {self.continuous_flow_s}")
        if not (isinstance(self.leakage_days, int) and self.leakage_days >= 1):
            raise ValueError(f"leakage_days must be a whole number >= 1, not {self.leakage_days!r}")
        if not 0 < self.leakage_percentile < 1:
            raise ValueError(f"leakage_percentile must be in (0, 1), not {self.leakage_percentile}")

    @property
    def context_s(self) -> float:
        """History re-read before the first recomputed day: a 7-day stop or a 24 h chain seen whole."""
        return max(self.stopped_days * 86400.0, self.continuous_flow_s) + 86400.0


RULES = WaterRules()


@dataclass(frozen=True, slots=True)
class Reading:
    """One water_readings row as the analytics see it."""

    t: float                         # measurement time, epoch seconds
    received: float
    meter_address: str | None
    register_m3: float | None
    valve: str | None
    battery_low: bool | None


@dataclass(frozen=True, slots=True)
class Delta:
    """The consumption between two consecutive register readings of a device."""

    t0: float
    t1: float
    m3: float
    kind: str                        # flow / rollover / reverse / new_series


@dataclass(frozen=True, slots=True)
class MeterDay:
    day: date
    consumption_m3: float
    reverse_m3: float
    readings: int
    first_register_m3: float | None
    last_register_m3: float | None
    first_at: float
    last_at: float
    meter_address: str | None
    rollovers: int
    new_series: int
    reverse_flows: int
    night_m3h: tuple[float, ...] | None


@dataclass(frozen=True, slots=True)
class AlertEpisode:
    kind: str
    opened_at: float
    closed_at: float | None
    detail: str


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """What one update_water run did."""

    devices: int                     # devices recomputed
    days: int                        # meter-days written
    sites: int                       # sites whose nights were recomputed
    alerts: int                      # alert rows written
    read_to: datetime | None         # the watermark after this run


# --------------------------------------------------------------------------- pure functions

def classify(prev_address: str | None, prev_m3: float, address: str | None, m3: float, *,
             rules: WaterRules = RULES) -> tuple[float, str]:
    """(consumption m³, kind) between two consecutive register readings (module docstring)."""
    if prev_address is not None and address is not None and prev_address != address:
        return (m3 if 0 <= m3 <= rules.new_meter_max_m3 else 0.0), NEW_SERIES
    d = m3 - prev_m3
    if d >= 0:
        return d, FLOW
    if prev_m3 >= REGISTER_MAX_M3 - ROLLOVER_BAND_M3 and m3 <= ROLLOVER_BAND_M3:
        return REGISTER_MAX_M3 + UNIT_M3 - prev_m3 + m3, ROLLOVER
    if -d <= rules.reverse_max_m3:
        return d, REVERSE
    return (m3 if 0 <= m3 <= rules.new_meter_max_m3 else 0.0), NEW_SERIES


def deltas(readings: Sequence[Reading], *, rules: WaterRules = RULES) -> list[Delta]:
    """The deltas between consecutive readings with a register (sorted by measurement time)."""
    out: list[Delta] = []
    prev: Reading | None = None
    for r in readings:
        if r.register_m3 is None:
            continue
        if prev is not None:
            m3, kind = classify(prev.meter_address, prev.register_m3, r.meter_address, r.register_m3, rules=rules)
            out.append(Delta(prev.t, r.t, m3, kind))
        prev = r
    return out


def _slot_starts(day: int, tz: ZoneInfo, window: tuple[int, int]) -> list[float]:
    d = date.fromordinal(date(1970, 1, 1).toordinal() + day)
    return [datetime.combine(d, time(h), tzinfo=tz).timestamp() for h in range(window[0], window[1])]


def night_slots(ds: Sequence[Delta], tz: ZoneInfo = SHANGHAI,
                window: tuple[int, int] = NIGHT_WINDOW) -> dict[int, tuple[float, ...]]:
    """Per local day (days since 1970-01-01), the meter's flow in m³/h in each hourly slot of the night
    window, for the nights where every slot is covered (module docstring)."""
    if not 0 <= window[0] < window[1] <= 24:
        raise ValueError(f"the night window must be local hours 0 <= start < end <= 24, not {window}")
    usable = [d for d in ds if d.kind != NEW_SERIES and 0 < d.t1 - d.t0 <= NIGHT_MAX_GAP_S]
    if not usable:
        return {}
    days = {int(x) for x in local_day(np.array([t for d in usable for t in (d.t0, d.t1)]), tz)}
    out: dict[int, tuple[float, ...]] = {}
    for day in sorted(days):
        flows = []
        for start in _slot_starts(day, tz, window):
            end = start + 3600.0
            volume = covered = 0.0
            for d in usable:
                overlap = min(end, d.t1) - max(start, d.t0)
                if overlap > 0:
                    covered += overlap
                    volume += d.m3 * overlap / (d.t1 - d.t0)
            if covered < NIGHT_MIN_COVER * 3600.0:
                break
            flows.append(volume / covered * 3600.0)
        else:
            out[day] = tuple(flows)
    return out


def meter_days(readings: Sequence[Reading], tz: ZoneInfo = SHANGHAI,
               window: tuple[int, int] = NIGHT_WINDOW, *, rules: WaterRules = RULES) -> list[MeterDay]:
    """One row per local day with a register reading: the day's deltas (each on its later reading's day)."""
    regs = [r for r in readings if r.register_m3 is not None]
    if not regs:
        return []
    days = local_day(np.array([r.t for r in regs]), tz)
    ds = deltas(regs, rules=rules)
    nights = night_slots(ds, tz, window)
    rows: list[MeterDay] = []
    i = 0
    while i < len(regs):
        j = i
        while j < len(regs) and days[j] == days[i]:
            j += 1
        mine = ds[max(i - 1, 0):j - 1]          # delta k ends at reading k + 1
        rows.append(MeterDay(
            day=date.fromordinal(date(1970, 1, 1).toordinal() + int(days[i])),
            consumption_m3=sum(d.m3 for d in mine), reverse_m3=sum(d.m3 for d in mine if d.kind == REVERSE),
            readings=j - i, first_register_m3=regs[i].register_m3, last_register_m3=regs[j - 1].register_m3,
            first_at=regs[i].t, last_at=regs[j - 1].t, meter_address=regs[j - 1].meter_address,
            rollovers=sum(d.kind == ROLLOVER for d in mine), new_series=sum(d.kind == NEW_SERIES for d in mine),
            reverse_flows=sum(d.kind == REVERSE for d in mine), night_m3h=nights.get(int(days[i]))))
        i = j
    return rows


def alert_episodes(readings: Sequence[Reading], tz: ZoneInfo = SHANGHAI, *,
                   rules: WaterRules = RULES) -> list[AlertEpisode]:
    """The meter's alert episodes from its readings (sorted by measurement time).  Rules, each opened
    and closed at a reading's measurement time (24 h, 7 days: `rules`' defaults):

    * continuous_flow: opens when every delta over the last 24 h was positive, each over an interval of
      at most 90 min (so only meters reporting at least hourly, or sending hourly freeze records, can
      open it); closes at the first delta that is not positive, spans a longer interval, or starts a new
      series — except that a zero delta over less than 30 min (below the register's 0.01 m³ resolution
      for a leak) neither extends nor closes it.
    * reverse_flow: opens at a reverse-flow delta; closes at the next positive delta.
    * stopped: opens at the first reading 7 days or more after the register last rose (or the series
      began, or the valve was last seen not open) with the valve open at every reading since; closes at
      the next rise, a new series, or a reading with the valve not open (a closed valve explains the stop).
    * battery_low / valve_closed / valve_abnormal: open at the first reading with the bit set (valve
      ``closed``; valve ``abnormal``, ST bits 11), close at the first with it clear; a reading without the
      field (NULL, valve ``unknown``) changes nothing.
    """
    out: list[AlertEpisode] = []
    open_: dict[str, AlertEpisode] = {}

    def start(kind: str, t: float, detail: str = "") -> None:
        if kind not in open_:
            open_[kind] = AlertEpisode(kind, t, None, detail)

    def stop(kind: str, t: float) -> None:
        ep = open_.pop(kind, None)
        if ep is not None:
            out.append(AlertEpisode(kind, ep.opened_at, t, ep.detail))

    prev: Reading | None = None
    chain_from: float | None = None
    rose_at: float | None = None         # since when the register has not risen with the valve open
    for r in readings:
        for kind, flag in (("battery_low", r.battery_low),
                           ("valve_closed", None if r.valve in (None, "unknown") else r.valve == "closed"),
                           ("valve_abnormal", None if r.valve in (None, "unknown") else r.valve == "abnormal")):
            if flag is True:
                start(kind, r.t)
            elif flag is False:
                stop(kind, r.t)
        if r.register_m3 is None:
            continue
        if prev is None:
            rose_at = r.t if r.valve == "open" else None
            prev = r
            continue
        m3, kind = classify(prev.meter_address, prev.register_m3, r.meter_address, r.register_m3, rules=rules)
        gap = r.t - prev.t
        # continuous flow
        if kind != NEW_SERIES and m3 > 0 and gap <= CONTINUOUS_MAX_GAP_S:
            chain_from = prev.t if chain_from is None else chain_from
            if r.t - chain_from >= rules.continuous_flow_s:
                start("continuous_flow", r.t, f"positive deltas since {_iso(chain_from, tz)}")
        elif kind != NEW_SERIES and m3 == 0 and gap < CONTINUOUS_MIN_ZERO_GAP_S:
            pass
        else:
            chain_from = None
            stop("continuous_flow", r.t)
        # reverse flow
        if kind == REVERSE:
            start("reverse_flow", r.t, f"{m3:.2f} m³")
        elif m3 > 0:
            stop("reverse_flow", r.t)
        # stopped meter
        if r.valve != "open":
            rose_at = None
            stop("stopped", r.t)
        elif m3 > 0 or kind == NEW_SERIES or rose_at is None:
            rose_at = r.t
            stop("stopped", r.t)
        elif r.t - rose_at >= rules.stopped_days * 86400.0:
            start("stopped", r.t, f"no consumption since {_iso(rose_at, tz)}")
        prev = r
    out.extend(open_.values())
    return sorted(out, key=lambda e: (e.opened_at, e.kind))


def _iso(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- update_water

def measured_sql(w: str = "w") -> str:
    """SQL of a reading's measurement time (as analytics.rollups.measurement_times)."""
    return (f"CASE WHEN {w}.meter_time BETWEEN {w}.time - interval '{MEASUREMENT_BEHIND_S} seconds' "
            f"AND {w}.time + interval '{MEASUREMENT_AHEAD_S} seconds' THEN {w}.meter_time ELSE {w}.time END")


_READING_COLUMNS = "w.device_id, w.time, w.meter_time, w.meter_address, w.flow_m3, w.valve, w.battery_low"


def _readings(rows: list[dict]) -> list[Reading]:
    if not rows:
        return []
    received = np.array([r["time"].timestamp() for r in rows])
    device = np.array([r["meter_time"].timestamp() if r["meter_time"] is not None else np.nan for r in rows])
    measured = measurement_times(device, received)
    out = [Reading(float(t), float(rt), r["meter_address"], r["flow_m3"], r["valve"], r["battery_low"])
           for t, rt, r in zip(measured, received, rows)]
    return sorted(out, key=lambda x: (x.t, x.received))


def update_water(conn: psycopg.Connection, *, tz: ZoneInfo = SHANGHAI, margin_s: float = MARGIN_S,
                 full: bool = False, night_window: tuple[int, int] = NIGHT_WINDOW,
                 rules: WaterRules = RULES) -> UpdateResult:
    """Bring water_daily, water_night and water_alerts up to date with water_readings (module
    docstring); safe to run twice and from several processes at once.  Rows are computed with `rules`
    and `night_window`: after changing either, run once with ``full=True``."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        run = begin(cur, lock_id=LOCK_ID, progress_table="water_progress", touched_table="water_touched",
                    margin_s=margin_s, full=full)
        # The devices with readings received since the watermark, the local day of their earliest new
        # measurement (d0: recomputed from there), the cut below which alerts stay as stored, and lo: from
        # where readings are re-read (CONTEXT_S before the cut and before any alert still open at it).
        cur.execute(f"""
            CREATE TEMP TABLE water_touched ON COMMIT DROP AS
            SELECT w.device_id, min({measured_sql()}) AS t_new, max(w.time) AS seen_to,
                   NULL::date AS d0, NULL::timestamptz AS cut, NULL::timestamptz AS lo
            FROM water_readings w WHERE %(since)s::timestamptz IS NULL OR w.time > %(since)s
            GROUP BY w.device_id""", {"since": run.since})
        read_to = cur.execute("SELECT max(seen_to) AS m FROM water_touched").fetchone()["m"]
        if not full:
            p = {"tz": tz.key, "ctx": rules.context_s}
            cur.execute("UPDATE water_touched SET d0 = (t_new AT TIME ZONE %(tz)s)::date", p)
            cur.execute("UPDATE water_touched SET cut = (d0::timestamp AT TIME ZONE %(tz)s) - %(ctx)s * interval '1 second'",
                        p)
            cur.execute("""
                UPDATE water_touched t SET lo = least(t.cut, coalesce((
                    SELECT min(a.opened_at) FROM water_alerts a
                    WHERE a.device_id = t.device_id AND (a.closed_at IS NULL OR a.closed_at >= t.cut)), t.cut))
                    - %(ctx)s * interval '1 second'""", p)
        touched = {r["device_id"]: r for r in cur.execute(
            "SELECT t.device_id, t.d0, t.cut, d.site_id FROM water_touched t LEFT JOIN devices d USING (device_id)")}
        rows = cur.execute(f"""
            SELECT {_READING_COLUMNS} FROM water_touched t JOIN water_readings w ON w.device_id = t.device_id
            WHERE t.lo IS NULL OR w.time >= t.lo - interval '{MEASUREMENT_AHEAD_S} seconds'
            UNION ALL
            SELECT p.* FROM water_touched t CROSS JOIN LATERAL (
                SELECT {_READING_COLUMNS} FROM water_readings w
                WHERE t.lo IS NOT NULL AND w.device_id = t.device_id AND w.flow_m3 IS NOT NULL
                  AND w.time < t.lo - interval '{MEASUREMENT_AHEAD_S} seconds' ORDER BY w.time DESC LIMIT 1) p
            ORDER BY device_id""").fetchall()
        by_device: dict[str, list[dict]] = {}
        for r in rows:
            by_device.setdefault(r["device_id"], []).append(r)
        daily: list[tuple] = []
        alerts: list[tuple] = []
        sites: dict[int, date] = {}
        for device, t in sorted(touched.items()):
            readings = _readings(by_device.get(device, []))
            mdays = [m for m in meter_days(readings, tz, night_window, rules=rules) if t["d0"] is None or m.day >= t["d0"]]
            daily.extend((device, m.day, round(m.consumption_m3, 6), round(m.reverse_m3, 6), m.readings,
                          m.first_register_m3, m.last_register_m3, m.first_at, m.last_at, m.meter_address,
                          m.rollovers, m.new_series, m.reverse_flows,
                          None if m.night_m3h is None else [round(x, 9) for x in m.night_m3h]) for m in mdays)
            cut = None if t["cut"] is None else t["cut"].timestamp()
            alerts.extend((device, e.kind, e.opened_at, e.closed_at, e.detail) for e in alert_episodes(readings, tz, rules=rules)
                          if cut is None or e.closed_at is None or e.closed_at >= cut)
            if t["site_id"] is not None and mdays:
                sites[t["site_id"]] = min(sites.get(t["site_id"], mdays[0].day), mdays[0].day)
        cur.execute("""DELETE FROM water_daily w USING water_touched t
                       WHERE w.device_id = t.device_id AND (t.d0 IS NULL OR w.day >= t.d0)""")
        cur.executemany("""
            INSERT INTO water_daily (device_id, day, consumption_m3, reverse_m3, readings, first_register_m3,
                last_register_m3, first_at, last_at, meter_address, rollovers, new_series, reverse_flows, night_m3h)
            VALUES (%s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s)""", daily)
        cur.execute("""DELETE FROM water_alerts a USING water_touched t
                       WHERE a.device_id = t.device_id AND (t.cut IS NULL OR a.closed_at IS NULL OR a.closed_at >= t.cut)""")
        cur.executemany("""
            INSERT INTO water_alerts (device_id, kind, opened_at, closed_at, detail)
            VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), %s) ON CONFLICT DO NOTHING""", alerts)
        for site_id, d0 in sorted(sites.items()):
            _site_nights(cur, site_id, None if full else d0, rules)
        read_to = advance(cur, run, read_to)
    return UpdateResult(len(touched), len(daily), len(sites), len(alerts), read_to)


def _site_nights(cur: psycopg.Cursor, site_id: int, d0: date | None, rules: WaterRules = RULES) -> None:
    """Recompute a site's nights from day d0 (None: all): MNF from its meters' slots, then leakage."""
    p = {"s": site_id, "d0": d0, "k": rules.leakage_days - 1, "q": rules.leakage_percentile}
    cur.execute("DELETE FROM water_night WHERE site_id = %(s)s AND (%(d0)s::date IS NULL OR day >= %(d0)s)", p)
    cur.execute("""
        INSERT INTO water_night (site_id, day, mnf_m3h, meters)
        SELECT %(s)s, day, min(flow), max(meters) FROM (
            SELECT w.day, s.k, sum(s.f) AS flow, count(*) AS meters
            FROM water_daily w JOIN devices d USING (device_id)
            CROSS JOIN LATERAL unnest(w.night_m3h) WITH ORDINALITY AS s(f, k)
            WHERE d.site_id = %(s)s AND w.night_m3h IS NOT NULL AND (%(d0)s::date IS NULL OR w.day >= %(d0)s)
            GROUP BY w.day, s.k) slots
        GROUP BY day""", p)
    cur.execute("""
        UPDATE water_night n SET (leakage_m3h, nights) = (
            SELECT percentile_cont(%(q)s) WITHIN GROUP (ORDER BY m.mnf_m3h), count(*)
            FROM water_night m WHERE m.site_id = n.site_id AND m.day BETWEEN n.day - %(k)s AND n.day)
        WHERE n.site_id = %(s)s AND (%(d0)s::date IS NULL OR n.day >= %(d0)s)""", p)


# --------------------------------------------------------------------------- what the report and the API read

@dataclass(frozen=True, slots=True)
class CityDay:
    day: date
    city_code: int                   # 0: meters without a site
    city: str
    meters: int                      # meters with a reading that day
    consumption_m3: float
    reverse_m3: float


@dataclass(frozen=True, slots=True)
class DistrictDay:
    day: date
    city_code: int                   # 0: meters without a site
    district_code: int | None        # None: unknown district (a site without one, or no site)
    district_zh: str | None
    district_en: str | None
    meters: int                      # meters with a reading that day
    consumption_m3: float
    reverse_m3: float


@dataclass(frozen=True, slots=True)
class SiteNight:
    site_id: int
    site_name: str
    city_code: int
    day: date                        # the site's latest night up to the day asked
    mnf_m3h: float
    meters: int
    leakage_m3h: float | None
    nights: int | None


@dataclass(frozen=True, slots=True)
class WaterAlert:
    alert_id: int
    device_id: str
    kind: str
    opened_at: datetime
    closed_at: datetime | None
    detail: str
    city_code: int | None
    site_name: str | None


def consumption_by_city(conn: psycopg.Connection, since: date, until: date,
                        city: str | int | None = None) -> list[CityDay]:
    """Consumption per local day in [since, until] and city (water_daily summed), by day then city."""
    if until < since:
        raise ValueError(f"until ({until}) must not be before since ({since})")
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        # Summed per (day, city code) first, the city's name joined to the few sums: grouped by the name too,
        # PostgreSQL expected ~300,000 groups for a month (instead of ~360) and sorted every meter-day.
        rows = cur.execute("""
            SELECT x.day, x.city_code, coalesce(c.name_en, '(no site)') AS city, x.meters, x.consumption_m3,
                   x.reverse_m3
            FROM (SELECT w.day, coalesce(s.city_code, 0) AS city_code, count(*)::int AS meters,
                         sum(w.consumption_m3) AS consumption_m3, sum(w.reverse_m3) AS reverse_m3
                  FROM water_daily w LEFT JOIN devices d USING (device_id) LEFT JOIN sites s ON s.site_id = d.site_id
                  WHERE w.day BETWEEN %(a)s AND %(b)s AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
                  GROUP BY 1, 2) x
            LEFT JOIN cities c ON c.code = nullif(x.city_code, 0)
            ORDER BY 1, 2""", {"a": since, "b": until, "c": code}).fetchall()
    return [CityDay(**r) for r in rows]


def consumption_by_district(conn: psycopg.Connection, since: date, until: date,
                            city: str | int | None = None) -> list[DistrictDay]:
    """Consumption per local day in [since, until], city and district (water_daily summed, as
    `consumption_by_city`), by day, city, then district with the unknown district last.  Meters whose site
    has no district (unverified sites, catalogue sites imported without one) count under their city's
    unknown district (None); meters without a site under city 0's, as in `consumption_by_city`: the
    districts of a city and day add up to its `consumption_by_city` row."""
    if until < since:
        raise ValueError(f"until ({until}) must not be before since ({since})")
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT x.day, x.city_code, x.district_code, di.name_zh AS district_zh, di.name_en AS district_en,
                   x.meters, x.consumption_m3, x.reverse_m3
            FROM (SELECT w.day, coalesce(s.city_code, 0) AS city_code, s.district_code, count(*)::int AS meters,
                         sum(w.consumption_m3) AS consumption_m3, sum(w.reverse_m3) AS reverse_m3
                  FROM water_daily w LEFT JOIN devices d USING (device_id) LEFT JOIN sites s ON s.site_id = d.site_id
                  WHERE w.day BETWEEN %(a)s AND %(b)s AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
                  GROUP BY 1, 2, 3) x
            LEFT JOIN districts di ON di.code = x.district_code
            ORDER BY 1, 2, 3 NULLS LAST""", {"a": since, "b": until, "c": code}).fetchall()
    return [DistrictDay(**r) for r in rows]


def site_nights(conn: psycopg.Connection, day: date, city: str | int | None = None,
                limit: int = 20, *, leakage_days: int = LEAKAGE_DAYS) -> list[SiteNight]:
    """Each site's latest night up to `day` (within the leakage window), highest leakage first (then MNF)."""
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT DISTINCT ON (n.site_id) n.site_id, s.name AS site_name, s.city_code, n.day, n.mnf_m3h, n.meters,
                   n.leakage_m3h, n.nights
            FROM water_night n JOIN sites s USING (site_id)
            WHERE n.day BETWEEN %(d)s::date - %(k)s AND %(d)s AND (%(c)s::int IS NULL OR s.city_code = %(c)s)
            ORDER BY n.site_id, n.day DESC""", {"d": day, "k": leakage_days - 1, "c": code}).fetchall()
    out = [SiteNight(**r) for r in rows]
    out.sort(key=lambda s: (-(s.leakage_m3h if s.leakage_m3h is not None else -math.inf), -s.mnf_m3h, s.site_id))
    return out[:limit]


def site_night_series(conn: psycopg.Connection, site_id: int, since: date, until: date) -> list[SiteNight]:
    """One site's nights in [since, until) as `water_night` keeps them (MNF, meters counted, leakage over
    the nights before), oldest first; nights without a figure absent."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT n.site_id, s.name AS site_name, s.city_code, n.day, n.mnf_m3h, n.meters, n.leakage_m3h, n.nights
            FROM water_night n JOIN sites s USING (site_id)
            WHERE n.site_id = %s AND n.day >= %s AND n.day < %s ORDER BY n.day""", (site_id, since, until)).fetchall()
    return [SiteNight(**r) for r in rows]


def open_alerts(conn: psycopg.Connection, city: str | int | None = None) -> list[WaterAlert]:
    """Water alerts not closed yet, oldest first."""
    code = city_code(conn, city)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT a.alert_id, a.device_id, a.kind, a.opened_at, a.closed_at, a.detail, s.city_code, s.name AS site_name
            FROM water_alerts a LEFT JOIN devices d USING (device_id) LEFT JOIN sites s ON s.site_id = d.site_id
            WHERE a.closed_at IS NULL AND (%(c)s::int IS NULL OR coalesce(s.city_code, 0) = %(c)s)
            ORDER BY a.opened_at, a.alert_id""", {"c": code}).fetchall()
    return [WaterAlert(**r) for r in rows]


def daily_consumption(conn: psycopg.Connection, device_id: str, since: date, until: date) -> list[MeterDay]:
    """A meter's days in [since, until) as `water_daily` keeps them (MeterDay: times as epoch seconds),
    oldest first; days without a reading absent."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("""
            SELECT day, consumption_m3, reverse_m3, readings, first_register_m3, last_register_m3,
                   extract(epoch FROM first_at)::float8 AS first_at, extract(epoch FROM last_at)::float8 AS last_at,
                   meter_address, rollovers, new_series, reverse_flows, night_m3h
            FROM water_daily WHERE device_id = %s AND day >= %s AND day < %s ORDER BY day""",
                           (device_id, since, until)).fetchall()
    return [MeterDay(**{**r, "night_m3h": None if r["night_m3h"] is None else tuple(r["night_m3h"])}) for r in rows]
