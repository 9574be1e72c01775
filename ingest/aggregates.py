"""The rollups of a batch, kept in the batch's own transaction (README "Rollups").

After a batch's dedup claim, `Aggregator.write` reads what the batch stores — the family tables' rows
of its WriteSet, columnar blocks included — reduces them with the numba kernels of
`analytics.rollups` to partial aggregates per level (`analytics.rollups.LEVELS`: device × local day,
site × 15 minutes, lane × 5 minutes, cell × day), and merges them into the rollup tables: one binary
COPY into a temporary staging table and one `INSERT … ON CONFLICT DO UPDATE` per level.

What a caller can rely on:

* **Exactly once, like the readings.**  Only what the batch writes is counted, in the transaction that
  writes it: a duplicate (refused by the claim) is never counted, a batch that rolls back counts
  nothing, a spooled batch is counted when its replay commits, and a late reading touches only its
  own device's, site's, lane's or cell's bucket.
* **Buckets are local** (`tz`, IOTJX_TIMEZONE) and use the measurement time
  (`analytics.rollups.measurement_times`): a water meter's own clock (`meter_time`), a fire frame's
  time label (the object's `event_time`, else the frame's `sent_at`) where plausible, else the
  receive time; traffic, parking and radio rows carry no clock of their own and use the receive time.
* **No deadlock between replicas**: every level is merged in key order, levels in one fixed order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg

from analytics.rollups import DAY_S, LANE_BITS, LEVELS, Level, bucket_starts, measurement_times, reduce_groups
from iotjx.model import Device

from .pgbinary import PG_EPOCH_S, Column

STAGE_PREFIX = "iotjx_stage_"
_LANE_MAX = (1 << LANE_BITS) - 1


@dataclass(slots=True)
class FamilyRows:
    """One readings table's rows of a batch, as columns."""

    device_ids: list[str]
    received: np.ndarray           # float64 epoch seconds (the row's `time`)
    device_t: np.ndarray           # float64 epoch seconds of the device's own clock, NaN where none
    values: dict[str, np.ndarray]  # float64, NaN where missing
    lane: np.ndarray | None = None     # traffic: the channel (0 for a frame without lanes)
    cell: np.ndarray | None = None     # radio: the cell id, -1 where none

    def __len__(self) -> int:
        return len(self.device_ids)


def stage_tables_sql(levels: Sequence[Level] = LEVELS) -> list[str]:
    """The temporary staging tables (one per level), made once per connection."""
    return [f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_PREFIX}{level.table} (LIKE {level.table}) ON COMMIT DELETE ROWS"
            for level in levels]


class Aggregator:
    """Reduces a batch's stored rows to partials and merges them into the rollup tables."""

    def __init__(self, tz: ZoneInfo, levels: Sequence[Level] = LEVELS) -> None:
        self.tz = tz
        self.levels = tuple(levels)

    def partials(self, rows: dict[str, FamilyRows], keys_of: dict[str, tuple[int | None, int | None]]):
        """(level, Partials) for every level with rows: `rows` per readings table, `keys_of` a device's
        (device_key, site_id)."""
        out = []
        for table, fam in rows.items():
            if not len(fam):
                continue
            known = [keys_of.get(d, (None, None)) for d in fam.device_ids]
            device_key = np.fromiter((-1 if k is None else k for k, _ in known), dtype=np.int64, count=len(known))
            site = np.fromiter((-1 if s is None else s for _, s in known), dtype=np.int64, count=len(known))
            times = measurement_times(fam.device_t, fam.received)
            buckets: dict[int, np.ndarray] = {}
            for level in self.levels:
                if level.source != table:
                    continue
                key = _level_key(level, fam, device_key, site)
                ok = key >= 0
                if not ok.any():
                    continue
                if level.width_s not in buckets:
                    buckets[level.width_s] = (np.zeros(len(times), dtype=np.int64) if level.all_time
                                              else bucket_starts(times, level.width_s, self.tz))
                values = (np.column_stack([fam.values[v.name] for v in level.values]) if level.values
                          else np.empty((len(fam), 0)))
                out.append((level, reduce_groups(key[ok], buckets[level.width_s][ok], times[ok], values[ok])))
        return out

    def write(self, cur: psycopg.Cursor, partials, copy_block) -> None:
        """COPY each level's partials into its staging table and merge them (in LEVELS order)."""
        for level, p in sorted(partials, key=lambda lp: self.levels.index(lp[0])):
            stage = f"{STAGE_PREFIX}{level.table}"
            copy_block(cur, stage, level.columns, _stage_columns(level, p), len(p))
            cur.execute(level.merge_sql(stage))


def bucket_days(partials) -> set[date]:
    """The UTC days the partials' buckets fall on (the rollup tables' daily partitions)."""
    days: set[date] = set()
    for level, p in partials:
        if len(p) and not level.all_time:
            for d in np.unique(p.buckets // DAY_S).tolist():
                days.add(datetime.fromtimestamp(d * DAY_S, UTC).date())
    return days


def _level_key(level: Level, fam: FamilyRows, device_key: np.ndarray, site: np.ndarray) -> np.ndarray:
    if level.key == "device":
        return device_key
    if level.key == "site":
        return site
    if level.key == "lane":
        lane = fam.lane if fam.lane is not None else np.zeros(len(fam), dtype=np.int64)
        good = (device_key >= 0) & (lane >= 0) & (lane <= _LANE_MAX)
        return np.where(good, (device_key << LANE_BITS) | np.clip(lane, 0, _LANE_MAX), -1)
    if level.key == "cell":
        return fam.cell if fam.cell is not None else np.full(len(fam), -1, dtype=np.int64)
    raise ValueError(f"unknown rollup key {level.key!r}")


def _stage_columns(level: Level, p) -> list[Column]:
    if level.key == "lane":
        keys = [Column("bigint", p.keys >> LANE_BITS), Column("integer", p.keys & _LANE_MAX)]
    else:
        keys = [Column("bigint", p.keys)]
    cols = keys + [Column("timestamp with time zone", (p.buckets - PG_EPOCH_S) * 1_000_000, micros=True),
                   Column("bigint", p.count)]
    for j, v in enumerate(level.values):
        for agg in v.aggregates:
            a = np.ascontiguousarray(getattr(p, agg)[:, j])
            cols.append(Column("bigint" if agg == "n" else "timestamp with time zone" if agg == "last_t"
                               else "double precision", a))
    return cols


# --------------------------------------------------------------------------- a batch's rows as columns

def batch_rows(readings: dict[str, tuple[tuple[str, ...], list[tuple]]],
               blocks: Iterable[tuple[str, tuple[str, ...], list[Column], int]]) -> dict[str, FamilyRows]:
    """Each readings table's rows of a WriteSet (its tuples and its columnar blocks) as FamilyRows."""
    parts: dict[str, list[FamilyRows]] = {}
    for table, (columns, rows) in readings.items():
        make = _FROM_ROWS.get(table)
        if make is not None and rows:
            idx = {c: i for i, c in enumerate(columns)}
            parts.setdefault(table, []).append(make(lambda c: [r[idx[c]] for r in rows] if c in idx
                                                    else [None] * len(rows), len(rows)))
    for table, columns, values, n in blocks:
        make = _FROM_ROWS.get(table)
        if make is not None and n:
            by_name = dict(zip(columns, values, strict=True))
            parts.setdefault(table, []).append(make(lambda c: _block_values(by_name.get(c), n), n))
    return {table: _concat(p) for table, p in parts.items()}


def _block_values(col: Column | None, n: int) -> list | np.ndarray:
    """A block column's values as a sequence with None for NULL (timestamps: epoch seconds)."""
    if col is None:
        return [None] * n
    if col.pgtype == "timestamp with time zone":
        v = np.asarray(col.values, dtype=np.float64)
        v = v / 1e6 + PG_EPOCH_S if col.micros else v
        return np.where(np.asarray(col.null, dtype=bool), np.nan, v) if col.null is not None else v
    if isinstance(col.values, np.ndarray):
        v = col.values.astype(np.float64)
        return np.where(np.asarray(col.null, dtype=bool), np.nan, v) if col.null is not None else v
    return list(col.values)


def _concat(parts: list[FamilyRows]) -> FamilyRows:
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        got = [getattr(p, name) for p in parts]
        return None if all(g is None for g in got) else np.concatenate(
            [g if g is not None else np.full(len(p), 0 if name == "lane" else -1, dtype=np.int64)
             for g, p in zip(got, parts, strict=True)])
    return FamilyRows(device_ids=[d for p in parts for d in p.device_ids],
                      received=np.concatenate([p.received for p in parts]),
                      device_t=np.concatenate([p.device_t for p in parts]),
                      values={k: np.concatenate([p.values[k] for p in parts]) for k in parts[0].values},
                      lane=cat("lane"), cell=cat("cell"))


def _floats(xs) -> np.ndarray:
    """float64 with NaN for None (booleans 1/0); a numpy column passes through."""
    if isinstance(xs, np.ndarray):
        return xs.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in xs], dtype=np.float64)


def _epochs(xs) -> np.ndarray:
    if isinstance(xs, np.ndarray):
        return xs.astype(np.float64)
    return np.array([np.nan if v is None else v.timestamp() if isinstance(v, datetime) else float(v)
                     for v in xs], dtype=np.float64)


def _ints(xs, missing: int) -> np.ndarray:
    if isinstance(xs, np.ndarray):
        return np.where(np.isnan(xs), missing, xs).astype(np.int64) if xs.dtype.kind == "f" else xs.astype(np.int64)
    return np.array([missing if v is None else int(v) for v in xs], dtype=np.int64)


def _water(col, n: int) -> FamilyRows:
    valve = {"closed": 1.0, "open": 0.0, "abnormal": 0.0}
    return FamilyRows(list(col("device_id")), _epochs(col("time")), _epochs(col("meter_time")), {
        "flow_m3": _floats(col("flow_m3")), "settlement_flow_m3": _floats(col("settlement_flow_m3")),
        "battery_low": _floats(col("battery_low")),
        "valve_closed": np.array([valve.get(v, np.nan) for v in col("valve")], dtype=np.float64)})


def _fire(col, n: int) -> FamilyRows:
    event_t, sent_t = _epochs(col("event_time")), _epochs(col("sent_at"))
    return FamilyRows(list(col("device_id")), _epochs(col("time")), np.where(np.isnan(event_t), sent_t, event_t), {
        "fire_alarm": _floats(col("fire_alarm")), "fault": _floats(col("fault"))})


def _extra_volume(extra: Any) -> float:
    obj = getattr(extra, "obj", extra)
    try:
        v = float((obj or {}).get("volume"))
    except (TypeError, ValueError, AttributeError):
        return 0.0
    # PostgreSQL's round(numeric): half away from zero (Python's round() is half to even)
    return float(np.sign(v) * np.floor(abs(v) + 0.5)) if np.isfinite(v) else 0.0


def _traffic(col, n: int) -> FamilyRows:
    a, b, c = _floats(col("count_a")), _floats(col("count_b")), _floats(col("count_c"))
    none = np.isnan(a) & np.isnan(b) & np.isnan(c)
    extra = col("extra")
    unclassified = np.array([_extra_volume(e) if k else 0.0 for e, k in zip(extra, none.tolist(), strict=True)],
                            dtype=np.float64)
    volume = np.nan_to_num(a) + np.nan_to_num(b) + np.nan_to_num(c) + unclassified
    speed = _floats(col("speed_kmh"))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        timed = (volume > 0) & (speed > 0)                      # NaN speed: False
        safe = np.where(timed, speed, 1.0)
        n_per_speed = np.where(timed, volume / safe, np.nan)
    n_per_speed[~np.isfinite(n_per_speed)] = np.nan             # a subnormal speed: no figure, not inf
    return FamilyRows(list(col("device_id")), _epochs(col("time")), np.full(n, np.nan), {
        "count_a": a, "count_b": b, "count_c": c, "unclassified": unclassified,
        "occupancy_pct": _floats(col("occupancy_pct")),
        "timed_n": np.where(timed, volume, np.nan), "speed_n": np.where(timed, volume * safe, np.nan),
        "n_per_speed": n_per_speed}, lane=_ints(col("channel"), 0))


def _parking(col, n: int) -> FamilyRows:
    return FamilyRows(list(col("device_id")), _epochs(col("time")), np.full(n, np.nan), {
        "occupied": _floats(col("occupied")), "occupancy_changed": _floats(col("occupancy_changed")),
        "battery_mv": _floats(col("battery_mv"))})


def _radio(col, n: int) -> FamilyRows:
    ecl = _floats(col("ecl"))
    with np.errstate(invalid="ignore"):
        levels = {f"ecl_{k}": np.where(np.isnan(ecl), np.nan, (ecl == k).astype(np.float64)) for k in range(3)}
    # cell ids (28 bits) and PCIs are exact in float64: kept as the device-day's last serving cell
    return FamilyRows(list(col("device_id")), _epochs(col("time")), np.full(n, np.nan), {
        "rsrp_dbm": _floats(col("rsrp_dbm")), "sinr_db": _floats(col("sinr_db")), "rsrq_db": _floats(col("rsrq_db")),
        "ecl": ecl, "cell_id": _floats(col("cell_id")), "pci": _floats(col("pci")), **levels},
        cell=_ints(col("cell_id"), -1))


_FROM_ROWS: dict = {"water_readings": _water, "fire_events": _fire, "traffic_flow": _traffic,
              "parking_events": _parking, "radio_readings": _radio}


def device_keys(conn: psycopg.Connection, rows: dict[str, FamilyRows],
                devices: dict[str, Device]) -> dict[str, tuple[int | None, int | None]]:
    """(device_key, site_id) of every device with rows: from the batch's registry lookup, the rest
    (a writer used without one) from the devices table."""
    wanted = {d for fam in rows.values() for d in fam.device_ids}
    out = {d: (devices[d].key, devices[d].site_id) for d in wanted if d in devices and devices[d].key is not None}
    missing = sorted(wanted - out.keys())
    if missing:
        for device_id, key, site in conn.execute(
                "SELECT device_id, device_key, site_id FROM devices WHERE device_id = ANY(%s)", (missing,)):
            out[device_id] = (key, site)
    return out
