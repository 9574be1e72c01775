"""Traffic KPIs per lane and per detector in local 5- and 15-minute buckets, and parking occupancy,
turnover, dwell and overstays per site and local hour, read from ``traffic_flow`` and ``parking_events``.

Definitions (the README's "Traffic" section says the same):

* **Time** is the stored ``time`` (the receive time: GB/T 43229 frames and parking reports carry no
  clock), bucketed on the local clock (`analytics.rollups.bucket_starts`, `Asia/Shanghai` by default).
  A range [since, until) selects rows by that time; pass bucket-aligned bounds or the first and last
  buckets are partial.
* **Volume** per class: the sum of ``count_a`` (≥ 12 m), ``count_b`` (6–12 m), ``count_c`` (< 6 m) over
  the bucket's frames; total = a + b + c (an FF-filled, NULL class counts nothing), plus, for a frame
  with no class at all, the total it reports (a Cat-1 JSON counter's ``volume``: *unclassified*).
* **Occupancy**: the plain mean of ``occupancy_pct`` over the frames that report it (every frame of a
  detector covers the same interval, so the mean is the time-weighted one).
* **Speeds**: a GB/T 43229 lane record reports *one* speed for the n = a + b + c vehicles of its interval.
  Time-mean speed v_t = Σ n·v / Σ n (the volume-weighted arithmetic mean of the reported speeds);
  space-mean speed v_s = Σ n / Σ (n / v) (the volume-weighted harmonic mean).  Only frames with n > 0
  and a speed > 0 enter either.  v_s is exact when each frame's speed is itself a space-mean (or the
  vehicles of one frame share a speed); it is the harmonic mean of frame means otherwise.
* **Flow** q = total volume × 3600 / bucket width (veh/h); **density** k = q / v_s (veh/km), for a
  detector divided by its lanes seen in the bucket (veh/km/lane).  Zero volume: q = k = 0, no speed.
* **Level of service** by density, HCM 6th ed. basic freeway segments (Exhibit 12-15: A ≤ 11, B ≤ 18,
  C ≤ 26, D ≤ 35, E ≤ 45 pc/mi/ln, F above) converted at 1.609344 km/mi: `LOS_DENSITY_VPKMPL`.  Vehicles
  are not converted to passenger cars, and HCM's density bands describe uninterrupted flow: at a
  signalised approach the band is indicative only.
* **Congestion grade** (畅通/基本畅通/轻度拥堵/中度拥堵/严重拥堵) from v_s and the lane's road class, by
  the speed bands of GB/T 33171-2016 (城市交通运行状况评价规范, road-segment grades by mean travel speed):
  `GRADE_SPEED_BANDS`, our defaults (a spot speed stands in for a travel speed).  A speed equal to a
  band's lower edge falls in the worse grade (the standard's ``a < v ≤ b``).  DB11/T 785's TPI 0–10 is a
  network index over travel times, not computed here.
* **Parking**, per site (a lot: kind ``parking_lot``; a scenic spot's sensors the same way) and local
  hour.  A sensor's state is the ``occupied`` of its latest report (info, keep-alive, any frame) ordered
  by stored time, held until its next report or for at most `hold_s` (default 2 × its reporting
  interval) — a silent sensor's hours count neither way.  Reports before `since` are read from the
  sensor's last free report in the `lookback_s` (24 h) before it, so a stay that began before the range
  and ends in it has its arrival (a longer stay ending in range is not counted), else its last report.
  Occupancy = occupied sensor-seconds ÷ known sensor-seconds.  An **arrival** is a report whose state is occupied after one that was free (a lost info frame is seen at the next
  keep-alive, late by ≤ one interval); a **departure** the reverse.  Turnover = arrivals in the hour ÷
  spaces: the site's parking sensors active and installed by `until`, or reporting in the range.  A **stay** runs from an arrival to the next
  departure; mean dwell and overstays (dwell > `overstay_s`, default 4 h) count stays ending in the hour;
  `open_overstays` lists the stays still on at a moment that have lasted longer.
* **Smart-parking coverage** of scenic spots is coverage's figure (`analytics.coverage.measure` on the
  catalogue's ``tourism-smart-parking`` target restricted to its scenic-spot criterion), not redefined."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import psycopg

from analytics.fire import city_code
from analytics.rollups import bucket_starts

WIDTHS_S = (300, 900)
KM_PER_MI = 1.609344
LOS_BANDS = ("A", "B", "C", "D", "E")          # F above the last edge
LOS_DENSITY_PCPMPL = (11.0, 18.0, 26.0, 35.0, 45.0)
LOS_DENSITY_VPKMPL = tuple(d / KM_PER_MI for d in LOS_DENSITY_PCPMPL)
GRADES = ("smooth", "basically_smooth", "light", "moderate", "severe")
GRADES_ZH = ("畅通", "基本畅通", "轻度拥堵", "中度拥堵", "严重拥堵")
# GB/T 33171-2016 lower edges (km/h) of smooth, basically smooth, light, moderate; at or below the last: severe.
GRADE_SPEED_BANDS: dict[str, tuple[float, float, float, float]] = {
    "expressway": (65.0, 50.0, 35.0, 20.0),      # 快速路
    "arterial": (40.0, 30.0, 20.0, 15.0),        # 主干路
    "secondary": (35.0, 25.0, 15.0, 10.0),       # 次干路
    "branch": (35.0, 25.0, 15.0, 10.0),          # 支路
}
DEFAULT_ROAD_CLASS = "arterial"                # the pilots' detectors sit at urban arterial intersections
OVERSTAY_S = 4 * 3600
HOLD_FACTOR = 2.0                              # a parking state is held for 2 × the sensor's interval
STAY_LOOKBACK_S = 86_400                       # a stay ending in range is seen if it began at most this before
HOUR_S = 3600


def los_band(density_vpkmpl: float | None, edges: Sequence[float] = LOS_DENSITY_VPKMPL) -> str | None:
    """The HCM level of service (A–F) of a density in veh/km/lane; an edge belongs to the better band."""
    if density_vpkmpl is None or not np.isfinite(density_vpkmpl):
        return None
    for band, edge in zip(LOS_BANDS, edges):
        if density_vpkmpl <= edge:
            return band
    return "F"


def congestion_grade(speed_kmh: float | None, road_class: str = DEFAULT_ROAD_CLASS,
                     bands: Mapping[str, Sequence[float]] = GRADE_SPEED_BANDS) -> str | None:
    """The five-level grade of a space-mean speed on a road class; an edge belongs to the worse grade."""
    if speed_kmh is None or not np.isfinite(speed_kmh):
        return None
    try:
        edges = bands[road_class]
    except KeyError:
        raise ValueError(f"unknown road class {road_class!r}; known: {', '.join(bands)}") from None
    if len(edges) != 4 or any(a <= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"speed bands of {road_class!r} must be 4 falling lower edges, got {tuple(edges)}")
    for grade, edge in zip(GRADES, edges):
        if speed_kmh > edge:
            return grade
    return GRADES[-1]


@dataclass(frozen=True, slots=True)
class FlowBucket:
    """One lane's (channel set) or one detector's (channel None) figures in one local bucket."""

    device_id: str
    channel: int | None                # None: the detector, all its lanes
    start: datetime                    # local bucket start, in the tz asked for
    width_s: int
    frames: int
    lanes: int                         # distinct channels in the bucket (1 for a lane)
    count_a: int
    count_b: int
    count_c: int
    unclassified: int                  # vehicles of frames that give only a total (JSON counters' volume)
    volume: int                        # a + b + c + unclassified
    occupancy_pct: float | None        # mean over frames (detector: over all lanes' frames)
    time_mean_kmh: float | None        # Σ n·v / Σ n
    space_mean_kmh: float | None       # Σ n / Σ (n / v)
    flow_vph: float                    # volume × 3600 / width
    density_vpkm: float | None         # q / v_s (all lanes)
    density_vpkmpl: float | None       # per lane
    los: str | None
    grade: str | None
    road_class: str


_FLOW_SQL = """
    SELECT device_id, coalesce(channel, 0), extract(epoch FROM time)::float8,
           coalesce(count_a, 0), coalesce(count_b, 0), coalesce(count_c, 0),
           occupancy_pct, speed_kmh,
           -- a JSON counter that reports only its total (name_map "flow.total" -> volume, in extra)
           CASE WHEN count_a IS NULL AND count_b IS NULL AND count_c IS NULL
                THEN coalesce(round((extra->>'volume')::numeric)::int, 0) ELSE 0 END
      FROM traffic_flow
     WHERE time >= %(since)s AND time < %(until)s {where}
"""


def flow_buckets(conn: psycopg.Connection, since: datetime, until: datetime, *, width_s: int = 900,
                 tz: ZoneInfo = ZoneInfo("Asia/Shanghai"), per: str = "lane", city: str | int | None = None,
                 device_ids: Sequence[str] | None = None,
                 road_class: Callable[[str], str] | Mapping[str, str] | None = None,
                 bands: Mapping[str, Sequence[float]] = GRADE_SPEED_BANDS) -> list[FlowBucket]:
    """Each lane's (`per="lane"`) or detector's (`per="detector"`) figures per local bucket of `width_s`
    (300 or 900) over [since, until), ordered by device, channel, start, from the readings
    (`flow_buckets_from_rollups`: the same from the writer's rollup).  `road_class` gives a device's
    road class (a mapping or a function; default `DEFAULT_ROAD_CLASS`); `bands` the congestion grade's
    speed bands per road class."""
    _check_flow_args(since, until, width_s, per)
    where, params = _flow_filter(conn, city, device_ids, "device_id")
    rows = conn.execute(_FLOW_SQL.format(where=where), {"since": since, "until": until, **params}).fetchall()
    if not rows:
        return []
    device = np.array([r[0] for r in rows], dtype=object)
    channel = np.array([r[1] for r in rows], dtype=np.int64)
    t = np.array([r[2] for r in rows], dtype=np.float64)
    counts = np.array([(*r[3:6], r[8]) for r in rows], dtype=np.int64)     # a, b, c, unclassified
    occ = np.array([np.nan if r[6] is None else r[6] for r in rows], dtype=np.float64)
    speed = np.array([np.nan if r[7] is None else r[7] for r in rows], dtype=np.float64)
    return _flow_buckets(device, channel, t, counts, occ, speed, width_s, tz, per, _road_class_of(road_class), bands)


def _check_flow_args(since: datetime, until: datetime, width_s: int, per: str) -> None:
    if width_s not in WIDTHS_S:
        raise ValueError(f"width_s must be one of {WIDTHS_S}, got {width_s!r}")
    if per not in ("lane", "detector"):
        raise ValueError(f"per must be 'lane' or 'detector', got {per!r}")
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")


def _flow_filter(conn: psycopg.Connection, city: str | int | None, device_ids: Sequence[str] | None,
                 column: str) -> tuple[str, dict]:
    where, params = "", {}
    code = city_code(conn, city)
    if code is not None:
        where += (f" AND {column} IN (SELECT d.device_id FROM devices d LEFT JOIN sites s USING (site_id)"
                  " WHERE coalesce(s.city_code, 0) = %(code)s)")
        params["code"] = code
    if device_ids is not None:
        where += f" AND {column} = ANY(%(ids)s)"
        params["ids"] = list(device_ids)
    return where, params


def _road_class_of(road_class: Callable[[str], str] | Mapping[str, str] | None) -> Callable[[str], str]:
    if road_class is None:
        return lambda _device: DEFAULT_ROAD_CLASS
    if isinstance(road_class, Mapping):
        return lambda device: road_class.get(device, DEFAULT_ROAD_CLASS)
    return road_class


def _flow_buckets(device: np.ndarray, channel: np.ndarray, t: np.ndarray, counts: np.ndarray, occ: np.ndarray,
                  speed: np.ndarray, width_s: int, tz: ZoneInfo, per: str,
                  road_class: Callable[[str], str],
                  bands: Mapping[str, Sequence[float]] = GRADE_SPEED_BANDS) -> list[FlowBucket]:
    """Group rows by (device, [channel,] bucket) into dense labels once, then one bincount per sum."""
    start = bucket_starts(t, width_s, tz)
    devices, device_label = np.unique(device.astype(str), return_inverse=True)
    lane_key = channel if per == "lane" else np.zeros_like(channel)
    keys = np.stack([device_label, lane_key, start], axis=1)
    groups, label = np.unique(keys, axis=0, return_inverse=True)
    label = label.ravel()
    m = len(groups)

    def total(weights: np.ndarray) -> np.ndarray:
        return np.bincount(label, weights=weights, minlength=m)

    n = counts.sum(axis=1).astype(np.float64)
    has_occ = ~np.isnan(occ)
    with np.errstate(divide="ignore", invalid="ignore"):
        timed = (n > 0) & (speed > 0)          # NaN speed: False
    sums = [total(counts[:, k].astype(np.float64)) for k in range(4)]
    with np.errstate(over="ignore"):           # a subnormal speed: n / v = inf, v_s = 0, no density
        nv = total(np.where(timed, n * np.where(timed, speed, 1.0), 0.0))
        n_over_v = total(np.where(timed, n / np.where(timed, speed, 1.0), 0.0))
    lane_pairs = np.unique(np.stack([label, channel], axis=1), axis=0)
    sums_of = _GroupSums(frames=np.bincount(label, minlength=m), lanes=np.bincount(lane_pairs[:, 0], minlength=m),
                         classes=sums, occ_n=total(has_occ.astype(np.float64)),
                         occ_sum=total(np.where(has_occ, occ, 0.0)), n_timed=total(np.where(timed, n, 0.0)),
                         nv=nv, n_over_v=n_over_v)
    return _figures([str(devices[g]) for g in groups[:, 0]], groups[:, 1] if per == "lane" else None, groups[:, 2],
                    sums_of, width_s, tz, road_class, bands)


@dataclass(frozen=True, slots=True)
class _GroupSums:
    """The sums a bucket's figures are made of (arrays over the buckets), from the readings or the rollups."""

    frames: np.ndarray
    lanes: np.ndarray
    classes: list[np.ndarray]        # a, b, c, unclassified
    occ_n: np.ndarray
    occ_sum: np.ndarray
    n_timed: np.ndarray
    nv: np.ndarray
    n_over_v: np.ndarray


def _figures(devices: Sequence[str], channels: np.ndarray | None, starts: np.ndarray, s: _GroupSums, width_s: int,
             tz: ZoneInfo, road_class: Callable[[str], str],
             bands: Mapping[str, Sequence[float]] = GRADE_SPEED_BANDS) -> list[FlowBucket]:
    """The one definition of a bucket's figures from its sums (module docstring)."""
    out = []
    for g, dev in enumerate(devices):
        a, b, c, u = (int(x[g]) for x in s.classes)
        volume = a + b + c + u
        flow = volume * 3600.0 / width_s
        v_t = s.nv[g] / s.n_timed[g] if s.n_timed[g] > 0 else None
        v_s = s.n_timed[g] / s.n_over_v[g] if s.n_timed[g] > 0 else None
        k = 0.0 if volume == 0 else (flow / v_s if v_s else None)
        k_lane = None if k is None else k / int(s.lanes[g])
        rc = road_class(dev)
        out.append(FlowBucket(
            device_id=dev, channel=None if channels is None else int(channels[g]),
            start=datetime.fromtimestamp(int(starts[g]), tz), width_s=width_s, frames=int(s.frames[g]),
            lanes=int(s.lanes[g]), count_a=a, count_b=b, count_c=c, unclassified=u, volume=volume,
            occupancy_pct=s.occ_sum[g] / s.occ_n[g] if s.occ_n[g] else None, time_mean_kmh=v_t, space_mean_kmh=v_s,
            flow_vph=flow, density_vpkm=k, density_vpkmpl=k_lane, los=los_band(k_lane),
            grade=congestion_grade(v_s, rc, bands), road_class=rc))
    return out


_LANE_ROLLUP_SQL = """
    SELECT d.device_id, r.lane, extract(epoch FROM r.bucket)::bigint, r.count,
           r.count_a_sum, r.count_b_sum, r.count_c_sum, r.unclassified_sum, r.occupancy_pct_n, r.occupancy_pct_sum,
           r.timed_n_sum, r.speed_n_sum, r.n_per_speed_sum
      FROM rollup_traffic_lane_5m r JOIN devices d USING (device_key)
     WHERE r.bucket >= %(since)s AND r.bucket < %(until)s {where}
"""


def flow_buckets_from_rollups(conn: psycopg.Connection, since: datetime, until: datetime, *, width_s: int = 900,
                              tz: ZoneInfo = ZoneInfo("Asia/Shanghai"), per: str = "lane",
                              city: str | int | None = None, device_ids: Sequence[str] | None = None,
                              road_class: Callable[[str], str] | Mapping[str, str] | None = None,
                              bands: Mapping[str, Sequence[float]] = GRADE_SPEED_BANDS) -> list[FlowBucket]:
    """`flow_buckets` read from the writer's lane × 5-minute rollup (README "Rollups") instead of the
    readings: the same figures, each 5- or 15-minute bucket made of the 5-minute buckets that start in
    it.  `tz` must be the writer's IOTJX_TIMEZONE (the rollup's buckets are aligned on it); a range
    selects whole 5-minute buckets by their start (bounds on 5-minute edges give what `flow_buckets`
    gives)."""
    _check_flow_args(since, until, width_s, per)
    where, params = _flow_filter(conn, city, device_ids, "d.device_id")
    rows = conn.execute(_LANE_ROLLUP_SQL.format(where=where), {"since": since, "until": until, **params}).fetchall()
    if not rows:
        return []
    r = np.array([row[1:] for row in rows], dtype=np.float64)
    device = np.array([row[0] for row in rows], dtype=object)
    lane = r[:, 0].astype(np.int64)
    start = r[:, 1].astype(np.int64)
    start = bucket_starts(start.astype(np.float64), width_s, tz) if width_s != 300 else start
    devices, device_label = np.unique(device.astype(str), return_inverse=True)
    keys = np.stack([device_label, lane if per == "lane" else np.zeros_like(lane), start], axis=1)
    groups, label = np.unique(keys, axis=0, return_inverse=True)
    label = label.ravel()
    m = len(groups)

    def total(col: int) -> np.ndarray:
        return np.bincount(label, weights=r[:, col], minlength=m)
    lane_pairs = np.unique(np.stack([label, lane], axis=1), axis=0)
    sums_of = _GroupSums(frames=total(2).astype(np.int64), lanes=np.bincount(lane_pairs[:, 0], minlength=m),
                         classes=[total(k) for k in (3, 4, 5, 6)], occ_n=total(7), occ_sum=total(8),
                         n_timed=total(9), nv=total(10), n_over_v=total(11))
    return _figures([str(devices[g]) for g in groups[:, 0]], groups[:, 1] if per == "lane" else None, groups[:, 2],
                    sums_of, width_s, tz, _road_class_of(road_class), bands)


# --------------------------------------------------------------------------- parking

@dataclass(frozen=True, slots=True)
class ParkingHour:
    """One site's parking figures in one local hour."""

    site_id: int
    site_name: str
    site_kind: str
    city_code: int
    hour: datetime                     # local hour start
    spaces: int                        # the site's active parking sensors installed by `until`, or reporting
    known_s: float                     # sensor-seconds with a known state
    occupied_s: float
    occupancy: float | None            # occupied_s / known_s
    arrivals: int
    turnover: float | None             # arrivals / spaces
    stays_ended: int
    mean_dwell_s: float | None         # over the stays that ended in the hour
    overstays: int                     # of those, dwell > overstay_s


@dataclass(frozen=True, slots=True)
class Stay:
    device_id: str
    arrived: float                     # epoch s
    departed: float


_PARKING_SQL = """
    WITH sensors AS (
        SELECT d.device_id, d.site_id,
               %(hold)s * coalesce(d.reporting_interval_s, m.reporting_interval_s) AS hold_s
          FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
         WHERE coalesce(m.family, m.pilot) = 'parking' {where}),
    origin AS (     -- where each sensor's reading starts: its last free report before since (within the
                    -- lookback: a stay ending in range is seen from its arrival), else its last report
        SELECT s.*, coalesce(
                 (SELECT max(time) FROM parking_events e WHERE e.device_id = s.device_id AND e.occupied = false
                     AND e.time < %(since)s AND e.time >= %(since)s - make_interval(secs => %(lookback)s)),
                 (SELECT max(time) FROM parking_events e WHERE e.device_id = s.device_id
                     AND e.occupied IS NOT NULL AND e.time < %(since)s
                     AND e.time >= %(since)s - make_interval(secs => greatest(s.hold_s, %(lookback)s))),
                 %(since)s) AS from_t
          FROM sensors s)
    SELECT e.device_id, extract(epoch FROM e.time)::float8, e.occupied, o.hold_s
      FROM origin o JOIN parking_events e
        ON e.device_id = o.device_id AND e.occupied IS NOT NULL AND e.time >= o.from_t AND e.time < %(until)s
     ORDER BY e.device_id, e.time
"""


def parking_hours(conn: psycopg.Connection, since: datetime, until: datetime, *,
                  tz: ZoneInfo = ZoneInfo("Asia/Shanghai"), city: str | int | None = None,
                  overstay_s: float = OVERSTAY_S, hold_factor: float = HOLD_FACTOR,
                  lookback_s: float = STAY_LOOKBACK_S) -> list[ParkingHour]:
    """Occupancy, arrivals, turnover, mean dwell and overstays per site with parking sensors and per
    local hour over [since, until) (hours overlapping the range; pass hour-aligned bounds)."""
    if since.tzinfo is None or until.tzinfo is None or until <= since:
        raise ValueError("since and until must be timezone-aware with since < until")
    where, params = "", {"since": since, "until": until, "hold": hold_factor, "lookback": lookback_s}
    code = city_code(conn, city)
    if code is not None:
        where, params["code"] = " AND s.city_code = %(code)s", code
    with conn.transaction():
        sites = conn.execute(f"""
            SELECT DISTINCT s.site_id, s.name, s.kind, s.city_code
              FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
             WHERE coalesce(m.family, m.pilot) = 'parking' {where}""", params).fetchall()
        sensors = conn.execute(f"""
            SELECT d.device_id, d.site_id, d.status = 'active' AND d.installed_at < %(until)s
              FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
             WHERE coalesce(m.family, m.pilot) = 'parking' {where}""", params).fetchall()
        rows = conn.execute(_PARKING_SQL.format(where=where), params).fetchall()
    sensor_site = {device_id: site_id for device_id, site_id, _ in sensors}
    # Spaces: the site's sensors active and installed by `until`, and any that reported in the range (a
    # sensor registered after a replayed day still had its bay then).
    reported = {r[0] for r in rows if since.timestamp() <= r[1] < until.timestamp()}
    spaces_at: dict[int, int] = {}
    for device_id, site_id, counted in sensors:
        if counted or device_id in reported:
            spaces_at[site_id] = spaces_at.get(site_id, 0) + 1
    t0, t1 = since.timestamp(), until.timestamp()
    first_hour = int(bucket_starts(np.array([t0]), HOUR_S, tz)[0])
    n_hours = int(np.ceil((t1 - first_hour) / HOUR_S))
    site_index = {s[0]: k for k, s in enumerate(sites)}
    known = np.zeros((len(sites), n_hours))
    occupied = np.zeros((len(sites), n_hours))
    arrivals = np.zeros((len(sites), n_hours), dtype=np.int64)
    ended = np.zeros((len(sites), n_hours), dtype=np.int64)
    dwell = np.zeros((len(sites), n_hours))
    over = np.zeros((len(sites), n_hours), dtype=np.int64)

    def hour_of(x: float) -> int:
        return int((x - first_hour) // HOUR_S)

    def add_interval(grid: np.ndarray, row: int, a: float, b: float) -> None:
        a, b = max(a, t0), min(b, t1)
        while a < b:
            h = hour_of(a)
            end = min(b, first_hour + (h + 1) * HOUR_S)
            grid[row, h] += end - a
            a = end

    for device_id, events in _by_device(rows):
        row = site_index[sensor_site[device_id]]
        hold = events[0][2]
        for k, (t, state, _) in enumerate(events):
            end = min(events[k + 1][0] if k + 1 < len(events) else t1, t + hold)
            add_interval(known, row, t, end)
            if state:
                add_interval(occupied, row, t, end)
        for k in range(1, len(events)):
            t, state = events[k][0], events[k][1]
            if state and not events[k - 1][1] and t0 <= t < t1:
                arrivals[row, hour_of(t)] += 1
        for stay in stays([(t, s) for t, s, _ in events], device_id):
            if t0 <= stay.departed < t1:
                h = hour_of(stay.departed)
                ended[row, h] += 1
                dwell[row, h] += stay.departed - stay.arrived
                over[row, h] += int(stay.departed - stay.arrived > overstay_s)
    out = []
    for r, (site_id, name, kind, code_) in enumerate(sites):
        spaces = spaces_at.get(site_id, 0)
        for h in range(n_hours):
            if known[r, h] == 0 and arrivals[r, h] == 0 and ended[r, h] == 0:
                continue
            out.append(ParkingHour(
                site_id=site_id, site_name=name, site_kind=kind, city_code=code_,
                hour=datetime.fromtimestamp(first_hour + h * HOUR_S, tz), spaces=int(spaces),
                known_s=float(known[r, h]), occupied_s=float(occupied[r, h]),
                occupancy=occupied[r, h] / known[r, h] if known[r, h] else None, arrivals=int(arrivals[r, h]),
                turnover=arrivals[r, h] / spaces if spaces else None, stays_ended=int(ended[r, h]),
                mean_dwell_s=dwell[r, h] / ended[r, h] if ended[r, h] else None, overstays=int(over[r, h])))
    out.sort(key=lambda p: (p.city_code, p.site_id, p.hour))
    return out


@dataclass(frozen=True, slots=True)
class OpenOverstay:
    """A bay taken longer than the overstay threshold and still taken at `at`."""

    device_id: str
    site_id: int
    site_name: str
    city_code: int
    arrived: datetime                  # in the tz asked for
    parked_s: float                    # at − arrived


def open_overstays(conn: psycopg.Connection, at: datetime, *, tz: ZoneInfo = ZoneInfo("Asia/Shanghai"),
                   city: str | int | None = None, overstay_s: float = OVERSTAY_S, hold_factor: float = HOLD_FACTOR,
                   lookback_s: float = STAY_LOOKBACK_S) -> list[OpenOverstay]:
    """Sensors whose current stay (an arrival seen in the `lookback_s` before `at`, no departure since, the
    last report within `hold_factor` × the interval) has lasted more than `overstay_s`, longest first."""
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    since = datetime.fromtimestamp(at.timestamp() - lookback_s, at.tzinfo)
    where, params = "", {"since": since, "until": at, "hold": hold_factor, "lookback": lookback_s}
    code = city_code(conn, city)
    if code is not None:
        where, params["code"] = " AND s.city_code = %(code)s", code
    with conn.transaction():
        rows = conn.execute(_PARKING_SQL.format(where=where), params).fetchall()
        sites = {r[0]: r[1:] for r in conn.execute(f"""
            SELECT d.device_id, s.site_id, s.name, s.city_code
              FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
             WHERE coalesce(m.family, m.pilot) = 'parking' {where}""", params)}
    out = []
    now = at.timestamp()
    for device_id, events in _by_device(rows):
        last_t, last_state, hold = events[-1]
        if not last_state or now - last_t > hold:
            continue
        arrived = None
        for k in range(1, len(events)):
            if events[k][1] and not events[k - 1][1]:
                arrived = events[k][0]
        if arrived is not None and now - arrived > overstay_s:
            site_id, name, code_ = sites[device_id]
            out.append(OpenOverstay(device_id, site_id, name, code_, datetime.fromtimestamp(arrived, tz),
                                    now - arrived))
    out.sort(key=lambda o: (-o.parked_s, o.device_id))
    return out


def _by_device(rows: list[tuple]) -> list[tuple[str, list[tuple[float, bool, float]]]]:
    out: list[tuple[str, list[tuple[float, bool, float]]]] = []
    for device_id, t, state, hold in rows:
        if not out or out[-1][0] != device_id:
            out.append((device_id, []))
        out[-1][1].append((float(t), bool(state), float(hold)))
    return out


def stays(events: Sequence[tuple[float, bool]], device_id: str = "") -> list[Stay]:
    """A sensor's completed stays from its (time, occupied) reports in time order: from each report
    occupied after a free one to the next free report.  A stay already on at the first report has no
    known arrival and is not returned; one still on at the last report is not complete."""
    out, arrived, previous = [], None, None
    for t, state in events:
        if state and previous is False:
            arrived = t
        elif not state and arrived is not None:
            out.append(Stay(device_id, arrived, t))
            arrived = None
        previous = state
    return out


# --------------------------------------------------------------------------- smart-parking coverage

def scenic_smart_parking(conn: psycopg.Connection, *, live_factor: float, tz: ZoneInfo,
                         now: datetime | None = None, city: str | int | None = None,
                         target_id: str = "tourism-smart-parking"):
    """Coverage's Measured figure for the catalogue's smart-parking target restricted to scenic spots:
    value = % of catalogued scenic spots (its grade floor) with at least `min_live` live parking sensors."""
    from analytics.coverage import cells_now, measure
    from iotjx.targets import load_catalogue

    target = next((t for t in load_catalogue() if t.target_id == target_id), None)
    if target is None:
        raise ValueError(f"no coverage target {target_id!r} in the catalogue")
    code = city_code(conn, city)
    scenic = replace(target, sites=tuple(c for c in target.sites if c.kind == "scenic_spot"),
                     city=target.city if code is None else code)
    return measure(scenic, cells_now(conn, live_factor=live_factor, tz=tz, now=now), {})


__all__ = ["FlowBucket", "GRADES", "GRADES_ZH", "GRADE_SPEED_BANDS", "LOS_DENSITY_VPKMPL", "OpenOverstay", "ParkingHour",
           "Stay", "congestion_grade", "flow_buckets", "flow_buckets_from_rollups", "los_band", "open_overstays", "parking_hours",
           "scenic_smart_parking", "stays"]
