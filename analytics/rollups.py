"""Rollup kernels: a batch's readings reduced to partial aggregates per (key, local-time bucket), and
those partials merged — in memory or into a rollup table — with the same result as reducing all the
readings at once.

What a caller gets, and what it can rely on:

* **Partials are mergeable, never averaged.** Per (key, bucket): `count` (rows) and per value column
  `n` (non-NaN values), `sum`, `min`, `max`, `last` and `last_t` (the value with the greatest measurement
  time, ties to the later row).  A mean is `sum / n` at read time.  `merge(reduce(x), reduce(y))` equals
  `reduce(x + y)` (sums to rounding), whatever the split, and `merge_sql` does the same inside
  PostgreSQL, so a late reading touches only its own bucket and a batch may be merged in pieces.
* **Buckets are local time** (`bucket_starts`, `local_day`): a 5- or 15-minute bucket is aligned on the
  local clock and a day starts at local midnight, in any IANA zone, DST included.
* **Buckets use the measurement time** (`measurement_times`): the device's clock where the frame has one
  and it is plausible, else the receive time.

Mechanism: the numba kernels are private (`_reduce_sorted`, `_merge_sorted`); the public functions check
dtypes and shapes and explain a refusal.  Grouping is a stable `np.lexsort` by (key, bucket) then one
linear pass.  Each kernel has a plain-Python reference written apart (`reduce_groups_reference`,
`merge_reference`) and `reduce_groups_numpy` is the numpy-only way (sort + `reduceat`), kept as a second
reference and as the benchmark's baseline (benchmarks/rollups.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numba as nb
import numpy as np

DAY_S = 86_400
MEASUREMENT_BEHIND_S = 7 * DAY_S     # see measurement_times
MEASUREMENT_AHEAD_S = 300
AGGREGATES = ("n", "sum", "min", "max", "last", "last_t")   # rollup column `{col}_{aggregate}`
_FIRST_T = -2_208_988_800            # 1900-01-01Z: times outside [1900, 2200) are refused, not bucketed
_END_T = 7_258_118_400               # 2200-01-01Z


# --- measurement time ---------------------------------------------------------------------------

def measurement_times(device_t: np.ndarray, received_t: np.ndarray, *, behind_s: float = MEASUREMENT_BEHIND_S,
                      ahead_s: float = MEASUREMENT_AHEAD_S) -> np.ndarray:
    """The time each reading was measured (float64 epoch seconds): the device's own clock where the
    frame carries one (`device_t` not NaN) and it is plausible, else the receive time.

    Plausible means `received_t - behind_s <= device_t <= received_t + ahead_s` (edges included).
    The defaults:

    * `behind_s` = 7 days: an NB-IoT meter in power saving wakes once a day or less and may hold its
      readings through coverage loss and retries, and a spooled or replayed uplink arrives late; a week
      keeps such readings in their own day, while a clock reset to its epoch (2000-01-01, 1970) or a
      stale RTC years behind falls back to the receive time.
    * `ahead_s` = 300 s: a device cannot measure after the gateway received it, so only clock skew
      explains a future time; five minutes tolerates a fast clock without letting a wrong one put a
      reading into a bucket that has not happened yet.
    """
    device = _float_column("device_t", device_t)
    received = _float_column("received_t", received_t, n=len(device))
    if not np.isfinite(received).all():
        raise ValueError(f"received_t must be finite: row {int(np.flatnonzero(~np.isfinite(received))[0])} is "
                         f"{received[~np.isfinite(received)][0]} (every uplink has a receive time)")
    if not (behind_s >= 0 and ahead_s >= 0):
        raise ValueError(f"behind_s and ahead_s must be >= 0, got {behind_s} and {ahead_s}")
    with np.errstate(invalid="ignore"):
        plausible = (device >= received - behind_s) & (device <= received + ahead_s)   # NaN: False
    return np.where(plausible, device, received)


# --- local-time buckets -------------------------------------------------------------------------

def bucket_starts(t: np.ndarray, width_s: int, tz: ZoneInfo) -> np.ndarray:
    """The epoch second (int64) at which each reading's local bucket starts.

    `width_s` divides a day (300, 900, 3600, …) or is a day (86400: the bucket starts at local
    midnight, so a DST day lasts 23 or 25 hours).  A sub-day bucket is aligned on the local clock with
    the UTC offset in force at the reading; DST moves clocks on quarter hours, so 5- and 15-minute
    buckets are exact in every zone (an hourly bucket across Lord Howe's 30-minute shift is not).
    Fractions of a second are dropped (floor)."""
    width = int(width_s)
    if width != width_s or width <= 0 or DAY_S % width:
        raise ValueError(f"width_s must divide a day (300, 900, 3600, 86400, …), got {width_s!r}")
    seconds = _epoch_seconds(t)
    if width == DAY_S:
        day = (seconds + _utc_offsets(seconds, tz)) // DAY_S
        days, index = _distinct(day)
        midnight = np.array([_local_midnight(int(d), tz) for d in days], dtype=np.int64)
        return midnight[index]
    local = seconds + _utc_offsets(seconds, tz)
    return seconds - local % width


def local_day(t: np.ndarray, tz: ZoneInfo) -> np.ndarray:
    """The local calendar day of each reading (int32 days since 1970-01-01)."""
    seconds = _epoch_seconds(t)
    return ((seconds + _utc_offsets(seconds, tz)) // DAY_S).astype(np.int32)


def _epoch_seconds(t: np.ndarray) -> np.ndarray:
    times = _float_column("t", t)
    bad = ~((times >= _FIRST_T) & (times < _END_T))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"t[{i}] = {times[i]} is not an epoch second in 1900-2200 (NaN or out of range)")
    return np.floor(times).astype(np.int64)


def _offset_at(second: int, tz: ZoneInfo) -> int:
    return int(datetime.fromtimestamp(second, tz).utcoffset().total_seconds())


def _utc_offsets(seconds: np.ndarray, tz: ZoneInfo) -> np.ndarray:
    """The UTC offset in force at each instant, asking zoneinfo only per distinct UTC day of the batch
    (its first and last second; a day whose offset changes is bisected to the second of the change).
    Assumes at most one transition per day, which holds for every zone since 1900 in practice."""
    days, index = _distinct(seconds // DAY_S)
    before = np.empty(len(days), dtype=np.int64)
    after = np.empty(len(days), dtype=np.int64)
    switch = np.empty(len(days), dtype=np.int64)
    for i, d in enumerate(days.tolist()):
        lo, hi = d * DAY_S, d * DAY_S + DAY_S - 1
        before[i], after[i] = _offset_at(lo, tz), _offset_at(hi, tz)
        if before[i] == after[i]:
            switch[i] = hi + 1
            continue
        while hi - lo > 1:                         # offset(lo) == before, offset(hi) == after
            mid = (lo + hi) // 2
            if _offset_at(mid, tz) == before[i]:
                lo = mid
            else:
                hi = mid
        switch[i] = hi
    return np.where(seconds < switch[index], before[index], after[index])


def _distinct(days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the days to ask zoneinfo about, each reading's index into them).  A batch spans a few days: then
    every day of its range, by subtraction (np.unique would sort the batch: 1.2 s at 10M readings)."""
    if len(days) == 0:
        return days, days
    first, last = int(days.min()), int(days.max())
    if last - first <= max(1_000, len(days)):
        return np.arange(first, last + 1, dtype=np.int64), days - first
    distinct, index = np.unique(days, return_inverse=True)
    return distinct, index.reshape(-1)


def _local_midnight(day: int, tz: ZoneInfo) -> int:
    d = datetime(1970, 1, 1) + timedelta(days=day)
    # fold=0: where midnight does not exist (a DST gap at 00:00) this is the instant the day begins
    return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp())


# --- partial aggregates ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Partials:
    """Partial aggregates, one row per distinct (key, bucket), ordered by (key, bucket).

    `count` is rows; the other arrays are (groups, k), one column per value column: `n` non-NaN values,
    `sum` their sum (0 when n = 0), `min`/`max`/`last` NaN when n = 0, `last_t` the measurement time of
    `last` (NaN when n = 0)."""

    keys: np.ndarray        # int64[g]
    buckets: np.ndarray     # int64[g]
    count: np.ndarray       # int64[g]
    n: np.ndarray           # int64[g, k]
    sum: np.ndarray         # float64[g, k]
    min: np.ndarray
    max: np.ndarray
    last: np.ndarray
    last_t: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def columns(self) -> int:
        return self.n.shape[1]


def reduce_groups(keys: np.ndarray, buckets: np.ndarray, times: np.ndarray, values: np.ndarray) -> Partials:
    """The partial aggregates of a batch per (key, bucket) (numba: a stable lexsort, one pass).

    keys, buckets: int64[n] (e.g. a device's integer id and `bucket_starts`); times: float64[n]
    measurement times, finite; values: float64[n, k], NaN where a reading lacks that value (±inf is
    refused: it would poison sums and has no meaning for a measurement)."""
    keys, buckets, times, values = _check_batch(keys, buckets, times, values)
    order = np.lexsort((buckets, keys))
    return Partials(*_reduce_sorted(keys, buckets, times, values, order))


@nb.njit(cache=True)
def _groups(keys, buckets, order, k):
    """Each sorted row's group (a run of equal key and bucket), and the empty partials of the groups."""
    rows = order.shape[0]
    group = np.empty(rows, np.int64)
    g = -1
    for i in range(rows):
        p = order[i]
        if i == 0 or keys[p] != keys[order[i - 1]] or buckets[p] != buckets[order[i - 1]]:
            g += 1
        group[i] = g
    groups = g + 1
    g_keys = np.empty(groups, np.int64)
    g_buckets = np.empty(groups, np.int64)
    for i in range(rows):
        g_keys[group[i]] = keys[order[i]]
        g_buckets[group[i]] = buckets[order[i]]
    return (group, g_keys, g_buckets, np.zeros(groups, np.int64), np.zeros((groups, k), np.int64),
            np.zeros((groups, k), np.float64), np.full((groups, k), np.nan), np.full((groups, k), np.nan),
            np.full((groups, k), np.nan), np.full((groups, k), np.nan))


@nb.njit(cache=True)
def _reduce_sorted(keys, buckets, times, values, order):
    rows, k = values.shape
    group, g_keys, g_buckets, count, n, total, low, high, last, last_t = _groups(keys, buckets, order, k)
    for i in range(rows):
        p = order[i]
        g = group[i]
        count[g] += 1
        t = times[p]
        for j in range(k):
            v = values[p, j]
            if v != v:                               # NaN: this reading lacks the value
                continue
            if n[g, j] == 0:
                low[g, j] = v
                high[g, j] = v
                last[g, j] = v
                last_t[g, j] = t
            else:
                if v < low[g, j]:
                    low[g, j] = v
                if v > high[g, j]:
                    high[g, j] = v
                if t >= last_t[g, j]:                # ties: the later row (the sort is stable)
                    last[g, j] = v
                    last_t[g, j] = t
            n[g, j] += 1
            total[g, j] += v
    return g_keys, g_buckets, count, n, total, low, high, last, last_t


def merge(a: Partials, b: Partials) -> Partials:
    """The partials of both inputs' readings together: count, n and sum add, min/max of both, `last`
    the one with the greater `last_t`, ties to `b` (b's readings count as the later rows)."""
    if a.columns != b.columns:
        raise ValueError(f"cannot merge partials of {a.columns} and {b.columns} value columns")
    both = [np.concatenate((x, y)) for x, y in zip(_fields(a), _fields(b), strict=True)]
    order = np.lexsort((both[1], both[0]))          # stable: a's row before b's in a group
    return Partials(*_merge_sorted(*both, order))


@nb.njit(cache=True)
def _merge_sorted(keys, buckets, count, n, total, low, high, last, last_t, order):
    rows, k = n.shape
    group, g_keys, g_buckets, g_count, g_n, g_total, g_low, g_high, g_last, g_last_t = _groups(keys, buckets, order, k)
    for i in range(rows):
        p = order[i]
        g = group[i]
        g_count[g] += count[p]
        for j in range(k):
            if n[p, j] == 0:
                continue
            if g_n[g, j] == 0:
                g_low[g, j] = low[p, j]
                g_high[g, j] = high[p, j]
                g_last[g, j] = last[p, j]
                g_last_t[g, j] = last_t[p, j]
            else:
                if low[p, j] < g_low[g, j]:
                    g_low[g, j] = low[p, j]
                if high[p, j] > g_high[g, j]:
                    g_high[g, j] = high[p, j]
                if last_t[p, j] >= g_last_t[g, j]:
                    g_last[g, j] = last[p, j]
                    g_last_t[g, j] = last_t[p, j]
            g_n[g, j] += n[p, j]
            g_total[g, j] += total[p, j]
    return g_keys, g_buckets, g_count, g_n, g_total, g_low, g_high, g_last, g_last_t


def _fields(p: Partials) -> list[np.ndarray]:
    return [p.keys, p.buckets, p.count, p.n, p.sum, p.min, p.max, p.last, p.last_t]


def _check_batch(keys, buckets, times, values) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    keys = _int_column("keys", keys)
    buckets = _int_column("buckets", buckets, n=len(keys))
    times = _float_column("times", times, n=len(keys))
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != len(keys):
        raise ValueError(f"values must be float64[n, k] with n = {len(keys)} rows, got shape {values.shape} "
                         "(one value column: values.reshape(-1, 1))")
    if values.dtype.kind not in "fiu":
        raise ValueError(f"values must be floating point (NaN for missing), got {values.dtype}")
    values = np.ascontiguousarray(values, dtype=np.float64)
    if not np.isfinite(times).all():
        raise ValueError(f"times must be finite (measurement_times gives every reading one): "
                         f"row {int(np.flatnonzero(~np.isfinite(times))[0])}")
    if np.isinf(values).any():
        i, j = np.argwhere(np.isinf(values))[0]
        raise ValueError(f"values[{i}, {j}] is {values[i, j]}: values must be finite or NaN (missing)")
    return keys, buckets, times, values


def _int_column(name: str, x, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (n is not None and len(a) != n):
        raise ValueError(f"{name} must be one-dimensional{'' if n is None else f' with {n} rows'}, got shape {a.shape}")
    if a.dtype.kind not in "iu" or not np.can_cast(a.dtype, np.int64):
        raise ValueError(f"{name} must be int64 (a dense integer id, e.g. a device's registry number), got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _float_column(name: str, x, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (n is not None and len(a) != n):
        raise ValueError(f"{name} must be one-dimensional{'' if n is None else f' with {n} rows'}, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be float64 epoch seconds, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float64)


# --- references ---------------------------------------------------------------------------------

def reduce_groups_reference(keys, buckets, times, values) -> Partials:
    """`reduce_groups` in plain Python (a dict per group, rows in input order)."""
    keys, buckets, times, values = _check_batch(keys, buckets, times, values)
    k = values.shape[1]
    groups: dict[tuple[int, int], dict] = {}
    for row in range(len(keys)):
        g = groups.setdefault((int(keys[row]), int(buckets[row])),
                              {"count": 0, "cols": [{"n": 0, "sum": 0.0, "values": []} for _ in range(k)]})
        g["count"] += 1
        for j, col in enumerate(g["cols"]):
            v = float(values[row, j])
            if v != v:
                continue
            col["n"] += 1
            col["sum"] += v
            col["values"].append((float(times[row]), row, v))
    ordered = sorted(groups.items())
    out = _empty_lists(k)
    for (key, bucket), g in ordered:
        out["keys"].append(key)
        out["buckets"].append(bucket)
        out["count"].append(g["count"])
        row = {"n": [], "sum": [], "min": [], "max": [], "last": [], "last_t": []}
        for col in g["cols"]:
            vs = [v for _, _, v in col["values"]]
            newest = max(col["values"], default=None, key=lambda tv: (tv[0], tv[1]))
            row["n"].append(col["n"])
            row["sum"].append(col["sum"])
            row["min"].append(min(vs) if vs else np.nan)
            row["max"].append(max(vs) if vs else np.nan)
            row["last"].append(newest[2] if newest else np.nan)
            row["last_t"].append(newest[0] if newest else np.nan)
        for name, got in row.items():
            out[name].append(got)
    return _from_lists(out, k)


def merge_reference(a: Partials, b: Partials) -> Partials:
    """`merge` in plain Python: a dict keyed by (key, bucket), `b` applied after `a`."""
    if a.columns != b.columns:
        raise ValueError(f"cannot merge partials of {a.columns} and {b.columns} value columns")
    k = a.columns
    table: dict[tuple[int, int], list] = {}
    for p in (a, b):
        for i in range(len(p)):
            key = (int(p.keys[i]), int(p.buckets[i]))
            cur = table.get(key)
            cols = [(int(p.n[i, j]), float(p.sum[i, j]), float(p.min[i, j]), float(p.max[i, j]),
                     float(p.last[i, j]), float(p.last_t[i, j])) for j in range(k)]
            if cur is None:
                table[key] = [int(p.count[i]), cols]
                continue
            cur[0] += int(p.count[i])
            for j, (n, s, lo, hi, last, last_t) in enumerate(cols):
                cn, cs, clo, chi, clast, clast_t = cur[1][j]
                if n == 0:
                    continue
                if cn == 0:
                    cur[1][j] = (n, s, lo, hi, last, last_t)
                    continue
                newer = last_t >= clast_t
                cur[1][j] = (cn + n, cs + s, min(clo, lo), max(chi, hi),
                             last if newer else clast, last_t if newer else clast_t)
    out = _empty_lists(k)
    for (key, bucket), (count, cols) in sorted(table.items()):
        out["keys"].append(key)
        out["buckets"].append(bucket)
        out["count"].append(count)
        for idx, name in enumerate(AGGREGATES):
            out[name].append([c[idx] for c in cols])
    return _from_lists(out, k)


def _empty_lists(k: int) -> dict[str, list]:
    return {name: [] for name in ("keys", "buckets", "count", *AGGREGATES)}


def _from_lists(out: dict[str, list], k: int) -> Partials:
    def grid(name: str, dtype) -> np.ndarray:
        return np.array(out[name], dtype=dtype).reshape(len(out["keys"]), k)
    return Partials(np.array(out["keys"], dtype=np.int64), np.array(out["buckets"], dtype=np.int64),
                    np.array(out["count"], dtype=np.int64), grid("n", np.int64), grid("sum", np.float64),
                    grid("min", np.float64), grid("max", np.float64), grid("last", np.float64),
                    grid("last_t", np.float64))


def reduce_groups_numpy(keys, buckets, times, values) -> Partials:
    """`reduce_groups` the numpy-only way (no numba): lexsort, gather, then `reduceat` per aggregate;
    `last` from the group's greatest time among non-NaN values and the latest such row."""
    keys, buckets, times, values = _check_batch(keys, buckets, times, values)
    rows, k = values.shape
    if rows == 0:
        return _from_lists(_empty_lists(k), k)
    order = np.lexsort((buckets, keys))
    keys, buckets, times, values = keys[order], buckets[order], times[order], values[order]
    new = np.empty(rows, dtype=bool)
    new[0] = True
    new[1:] = (keys[1:] != keys[:-1]) | (buckets[1:] != buckets[:-1])
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    present = ~np.isnan(values)
    n = np.add.reduceat(present, starts, axis=0).astype(np.int64)
    total = np.add.reduceat(np.where(present, values, 0.0), starts, axis=0)
    low = np.fmin.reduceat(values, starts, axis=0)              # fmin/fmax skip NaN
    high = np.fmax.reduceat(values, starts, axis=0)
    last = np.full((len(starts), k), np.nan)
    last_t = np.full((len(starts), k), np.nan)
    position = np.arange(rows)
    for j in range(k):
        t_j = np.where(present[:, j], times, np.nan)
        newest_t = np.fmax.reduceat(t_j, starts)
        candidate = present[:, j] & (t_j == newest_t[group])
        at = np.maximum.reduceat(np.where(candidate, position, -1), starts)
        has = at >= 0
        last[has, j] = values[at[has], j]
        last_t[has, j] = times[at[has]]
    count = np.diff(np.append(starts, rows))
    return Partials(keys[starts], buckets[starts], count.astype(np.int64), n, total, low, high, last, last_t)


# --- rollup tables --------------------------------------------------------------------------------

_IDENT = re.compile(r"[a-z_][a-z0-9_]*\Z")
_OPTIONAL = ("min", "max", "last")


@dataclass(frozen=True, slots=True)
class Value:
    """A value column of a rollup table and the aggregates kept of it: `n` and `sum` always, then any
    of `min`, `max`, `last` (`last` brings `last_t`).  A plain string in a list of value columns means
    every aggregate."""

    name: str
    keep: tuple[str, ...] = _OPTIONAL

    def __post_init__(self) -> None:
        unknown = set(self.keep) - set(_OPTIONAL)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not aggregates a rollup can keep "
                             f"(n and sum always; then any of {', '.join(_OPTIONAL)})")

    @property
    def aggregates(self) -> tuple[str, ...]:
        return tuple(a for a in AGGREGATES if a in ("n", "sum") or a in self.keep or (a == "last_t" and "last" in self.keep))


def _values(value_columns: Sequence[str | Value]) -> list[Value]:
    return [v if isinstance(v, Value) else Value(v) for v in value_columns]


def rollup_columns(value_columns: Sequence[str | Value]) -> list[str]:
    """The non-key columns of a rollup table, in row order: `count`, then per value column `{col}_n`,
    `{col}_sum`, and of `{col}_min`, `{col}_max`, `{col}_last`, `{col}_last_t` those it keeps."""
    return ["count"] + [f"{v.name}_{agg}" for v in _values(value_columns) for agg in v.aggregates]


def rollup_table_sql(table: str, key_columns: Sequence[tuple[str, str]], value_columns: Sequence[str | Value],
                     *, partition_by: str | None = None) -> str:
    """`CREATE TABLE IF NOT EXISTS` for a rollup table of the convention; `key_columns` are (name, SQL
    type) pairs, the bucket among them (e.g. `("device_key", "bigint"), ("bucket", "timestamptz")`).
    count and n are bigint, sum/min/max/last double precision, last_t timestamptz.  `partition_by`:
    the column of a `PARTITION BY RANGE` (plain PostgreSQL's daily partitions)."""
    types = {"n": "bigint NOT NULL", "sum": "double precision NOT NULL", "min": "double precision",
             "max": "double precision", "last": "double precision", "last_t": "timestamptz"}
    names = [_ident(name) for name, _ in key_columns]
    cols = [f"{name} {sqltype} NOT NULL" for name, (_, sqltype) in zip(names, key_columns, strict=True)]
    cols.append('"count" bigint NOT NULL')
    cols += [f'{_ident(f"{v.name}_{agg}")} {types[agg]}' for v in _values(value_columns) for agg in v.aggregates]
    partition = f" PARTITION BY RANGE ({_ident(partition_by)})" if partition_by else ""
    return (f"CREATE TABLE IF NOT EXISTS {_table(table)} (\n    " + ",\n    ".join(cols)
            + f",\n    PRIMARY KEY ({', '.join(names)})){partition}")


def merge_sql(table: str, key_columns: Sequence[str], value_columns: Sequence[str | Value], *,
              source: str | None = None) -> str:
    """The statement that merges partial rows into a rollup table with `merge`'s semantics:
    `INSERT … ON CONFLICT (keys) DO UPDATE`, count/n/sum added, min/max by LEAST/GREATEST (which skip
    NULL), last taken from the incoming row when its last_t is not older (ties to the incoming row).

    Without `source` it has one `%s` per column (`partial_rows` gives the values, NULL for NaN) for
    `executemany`; with `source` (a staging table filled by COPY) it is one `INSERT … SELECT`.  The
    rows must be unique per key (a Partials is) and, to keep concurrent writers from deadlocking,
    arrive in key order (a Partials is ordered by (key, bucket))."""
    keys = [_ident(k) for k in key_columns]
    values = _values(value_columns)
    cols = keys + [_ident(c) for c in rollup_columns(values)]
    target = _table(table)
    if source is None:
        rows = f"VALUES ({', '.join(['%s'] * len(cols))})"
    else:
        rows = f"SELECT {', '.join(cols)} FROM {_table(source)} ORDER BY {', '.join(keys)}"
    sets = ['"count" = r."count" + excluded."count"']
    for v in values:
        kept = v.aggregates
        n, s = _ident(f"{v.name}_n"), _ident(f"{v.name}_sum")
        sets += [f"{n} = r.{n} + excluded.{n}", f"{s} = r.{s} + excluded.{s}"]
        if "min" in kept:
            lo = _ident(f"{v.name}_min")
            sets.append(f"{lo} = LEAST(r.{lo}, excluded.{lo})")
        if "max" in kept:
            hi = _ident(f"{v.name}_max")
            sets.append(f"{hi} = GREATEST(r.{hi}, excluded.{hi})")
        if "last" in kept:
            last, last_t = _ident(f"{v.name}_last"), _ident(f"{v.name}_last_t")
            newer = f"(excluded.{last_t} >= r.{last_t} OR r.{last_t} IS NULL)"
            sets += [f"{last} = CASE WHEN {newer} THEN excluded.{last} ELSE r.{last} END",
                     f"{last_t} = CASE WHEN {newer} THEN excluded.{last_t} ELSE r.{last_t} END"]
    return (f"INSERT INTO {target} AS r ({', '.join(cols)})\n{rows}\n"
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET\n    " + ",\n    ".join(sets))


def partial_rows(p: Partials, value_columns: Sequence[str | Value] | None = None) -> Iterator[tuple]:
    """The rows of `p` in `merge_sql`'s column order, as Python values: key (int), bucket (an aware UTC
    datetime, for a timestamptz column), count, then per value column n, sum, min, max, last, last_t
    (datetime) — those the column keeps (every one without `value_columns`) — None where the partial
    holds NaN (a column with n = 0)."""
    k = p.columns
    kept = [v.aggregates for v in _values(value_columns)] if value_columns is not None else [AGGREGATES] * k
    if len(kept) != k:
        raise ValueError(f"{len(kept)} value columns for partials of {k} columns")
    for i in range(len(p)):
        row: list = [int(p.keys[i]), _timestamp(float(p.buckets[i])), int(p.count[i])]
        for j in range(k):
            for agg in kept[j]:
                x = getattr(p, agg)[i, j]
                row.append(int(x) if agg == "n" else float(x) if agg == "sum"
                           else _timestamp(float(x)) if agg == "last_t" else _nullable(x))
        yield tuple(row)


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _timestamp(t: float) -> datetime | None:
    # Rounded to the microsecond as ingest/pgbinary rounds the readings' times (round((t - 2000-01-01)
    # * 1e6), half to even), so `last_t` equals the stored time of the reading it came from.
    # datetime.fromtimestamp rounds the float's exact value instead and differs by 1 µs on ~6 % of
    # random sub-microsecond times of 2024 (measured over 200,000).
    if t != t:
        return None
    return _PG_EPOCH + timedelta(microseconds=int(np.round((t - 946_684_800.0) * 1e6)))


def partial_columns(p: Partials, value_columns: Sequence[str | Value]) -> list[tuple[str, np.ndarray]]:
    """(name, array) per column of `p` in `merge_sql`'s order after the key columns (which come first,
    named "key" and "bucket"), for a columnar binary COPY: key and bucket int64 (bucket in epoch
    seconds), count, then per value column `{col}_n`, `_sum` and the aggregates it keeps of `_min`,
    `_max`, `_last`, `_last_t` (float64, last_t in epoch seconds); NaN is to be written as NULL."""
    values = _values(value_columns)
    if len(values) != p.columns:
        raise ValueError(f"{len(values)} value column names for partials of {p.columns} columns")
    out = [("key", p.keys), ("bucket", p.buckets), ("count", p.count)]
    for j, v in enumerate(values):
        out += [(f"{v.name}_{agg}", np.ascontiguousarray(getattr(p, agg)[:, j])) for agg in v.aggregates]
    return out


def _nullable(v: float) -> float | None:
    v = float(v)
    return None if v != v else v


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"{name!r} is not a plain lower-case SQL identifier ([a-z_][a-z0-9_]*)")
    return f'"{name}"'


def _table(name: str) -> str:
    return ".".join(_ident(part) for part in name.split(".", 1))


# --- the rollup levels the writer keeps -----------------------------------------------------------

KEY_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "device": (("device_key", "bigint"),),                         # devices.device_key
    "site": (("site_id", "bigint"),),                              # the device's site (district metered area, lot…)
    "lane": (("device_key", "bigint"), ("lane", "integer")),       # a detector's channel
    "cell": (("cell_id", "bigint"),),                              # the serving cell (E-UTRAN cell identity)
}
LANE_BITS = 16          # a lane level's kernel key: device_key << LANE_BITS | lane


@dataclass(frozen=True, slots=True)
class Level:
    """One rollup table: the readings of `source` (a family table) per `key` × local bucket of `width_s`
    (0: one bucket for all time, `bucket` = 1970-01-01: the key's running totals and latest values — a
    state table, not partitioned)."""

    table: str
    source: str
    key: str                      # device | site | lane | cell (KEY_COLUMNS)
    width_s: int
    values: tuple[Value, ...]

    @property
    def key_columns(self) -> tuple[tuple[str, str], ...]:
        return KEY_COLUMNS[self.key] + (("bucket", "timestamptz"),)

    @property
    def columns(self) -> list[str]:
        """Every column in `merge_sql`'s order: keys, bucket, then `rollup_columns`."""
        return [name for name, _ in self.key_columns] + rollup_columns(self.values)

    @property
    def all_time(self) -> bool:
        return self.width_s == 0

    def create_sql(self, partitioned: bool) -> str:
        return rollup_table_sql(self.table, self.key_columns, self.values,
                                partition_by="bucket" if partitioned and not self.all_time else None)

    def merge_sql(self, source: str) -> str:
        return merge_sql(self.table, [name for name, _ in self.key_columns], self.values, source=source)


_SUMS: tuple[str, ...] = ()             # n and sum only
_RANGE = ("min", "max")
_ALL = ("min", "max", "last")
# README "Rollups" documents every table; a change here is a new migration (iotjx/db/migrations.py).
LEVELS: tuple[Level, ...] = (
    Level("rollup_water_day", "water_readings", "device", DAY_S, (
        Value("flow_m3", _ALL), Value("settlement_flow_m3", _ALL), Value("battery_low", ("last",)),
        Value("valve_closed", ("last",)))),
    Level("rollup_water_site_15m", "water_readings", "site", 900, (
        Value("battery_low", _SUMS), Value("valve_closed", _SUMS))),
    Level("rollup_fire_day", "fire_events", "device", DAY_S, (
        Value("fire_alarm", _SUMS), Value("fault", _SUMS))),
    Level("rollup_fire_site_15m", "fire_events", "site", 900, (
        Value("fire_alarm", _SUMS), Value("fault", _SUMS))),
    Level("rollup_traffic_day", "traffic_flow", "device", DAY_S, (
        Value("count_a", _SUMS), Value("count_b", _SUMS), Value("count_c", _SUMS), Value("unclassified", _SUMS))),
    Level("rollup_traffic_lane_5m", "traffic_flow", "lane", 300, (
        Value("count_a", _SUMS), Value("count_b", _SUMS), Value("count_c", _SUMS), Value("unclassified", _SUMS),
        Value("occupancy_pct", ("max",)), Value("timed_n", _SUMS), Value("speed_n", _SUMS),
        Value("n_per_speed", _SUMS))),
    Level("rollup_parking_day", "parking_events", "device", DAY_S, (
        Value("occupied", ("last",)), Value("occupancy_changed", _SUMS), Value("battery_mv", ("min", "last")))),
    Level("rollup_parking_site_15m", "parking_events", "site", 900, (
        Value("occupied", _SUMS), Value("occupancy_changed", _SUMS))),
    Level("rollup_radio_day", "radio_readings", "device", DAY_S, (
        Value("rsrp_dbm", _ALL), Value("sinr_db", _ALL), Value("rsrq_db", _ALL), Value("ecl", ("max", "last")),
        Value("cell_id", ("last",)), Value("pci", ("last",)))),
    Level("rollup_radio_cell_day", "radio_readings", "cell", DAY_S, (
        Value("rsrp_dbm", _RANGE), Value("sinr_db", _RANGE), Value("ecl_0", _SUMS), Value("ecl_1", _SUMS),
        Value("ecl_2", _SUMS))),
    # Each device's latest radio figures (all time): a window open to now reads them in one probe per device.
    Level("rollup_radio_latest", "radio_readings", "device", 0, (
        Value("rsrp_dbm", ("last",)), Value("sinr_db", ("last",)), Value("rsrq_db", ("last",)),
        Value("ecl", ("last",)), Value("cell_id", ("last",)), Value("pci", ("last",)))),
)


# --- reading a rollup ---------------------------------------------------------------------------------

LEVEL_BY_TABLE = {level.table: level for level in LEVELS}


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of a rollup series: `count` rows, and per value column its aggregates (`values[name]`:
    n, sum, mean = sum / n (None when n = 0), and min, max, last, last_t where the level keeps them)."""

    start: datetime
    count: int
    values: dict[str, dict[str, object]]


def rollup_series(conn, table: str, key: dict[str, int], since: datetime, until: datetime, *,
                  width_s: int | None = None, tz: ZoneInfo = ZoneInfo("Asia/Shanghai")) -> list[Bucket]:
    """The buckets of one key of a rollup table (`LEVELS`) starting in [since, until), oldest first.

    `key` names every key column of the level (e.g. `{"site_id": 7}`, `{"device_key": 3, "lane": 1}`).
    `width_s` coarser than the level's bucket (a multiple of it that divides a day, or a day) merges
    the level's buckets by their local start (`tz` must be the writer's IOTJX_TIMEZONE): counts, n and
    sums add, min/max of the parts, `last` the newest by `last_t` — never an average of averages."""
    level = LEVEL_BY_TABLE.get(table)
    if level is None or level.all_time:
        raise ValueError(f"{table!r} is not a bucketed rollup table "
                         f"({', '.join(t for t, lv in LEVEL_BY_TABLE.items() if not lv.all_time)})")
    names = [name for name, _ in KEY_COLUMNS[level.key]]
    if sorted(key) != sorted(names):
        raise ValueError(f"{table} is keyed by {', '.join(names)}; got {', '.join(sorted(key)) or 'nothing'}")
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")
    width = level.width_s if width_s is None else int(width_s)
    if width < level.width_s or width % level.width_s or DAY_S % width:
        raise ValueError(f"width_s must be a multiple of {table}'s {level.width_s} s that divides a day, got {width_s!r}")
    where = " AND ".join(f"{_ident(k)} = %({k})s" for k in names)
    cur = conn.execute(f"SELECT * FROM {_table(table)} WHERE {where} AND bucket >= %(since)s AND bucket < %(until)s "
                       "ORDER BY bucket", {**key, "since": since, "until": until})
    cols = [d.name for d in cur.description]
    rows = cur.fetchall()
    at = {c: i for i, c in enumerate(cols)}
    merged: dict[int, dict[str, object]] = {}
    starts = np.array([r[at["bucket"]].timestamp() for r in rows], dtype=np.float64)
    target = bucket_starts(starts, width, tz) if width != level.width_s and len(rows) else starts.astype(np.int64)
    for r, start in zip(rows, target.tolist(), strict=True):
        m = merged.get(start)
        if m is None:
            merged[start] = {c: r[at[c]] for c in cols}
            continue
        m["count"] += r[at["count"]]
        for v in level.values:
            _merge_value(m, v, {a: r[at[f"{v.name}_{a}"]] for a in v.aggregates})
    out = []
    for start, m in merged.items():
        values = {}
        for v in level.values:
            agg = {a: m[f"{v.name}_{a}"] for a in v.aggregates}
            agg["mean"] = agg["sum"] / agg["n"] if agg["n"] else None
            values[v.name] = agg
        out.append(Bucket(datetime.fromtimestamp(start, tz), int(m["count"]), values))
    return out


def _merge_value(m: dict, v: Value, part: dict) -> None:
    name = v.name
    m[f"{name}_n"] += part["n"]
    m[f"{name}_sum"] += part["sum"]
    for agg, pick in (("min", min), ("max", max)):
        if agg in part and part[agg] is not None:
            cur = m[f"{name}_{agg}"]
            m[f"{name}_{agg}"] = part[agg] if cur is None else pick(cur, part[agg])
    if "last" in part and part["last_t"] is not None:
        cur_t = m[f"{name}_last_t"]
        if cur_t is None or part["last_t"] >= cur_t:
            m[f"{name}_last"], m[f"{name}_last_t"] = part["last"], part["last_t"]


def whole_days(since: datetime, until: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The whole local days inside [since, until), as [first local midnight ≥ since, last local midnight
    ≤ until): the part of a window a day rollup answers exactly (the edges come from the readings).
    (until, until) when the window holds no whole day."""
    def midnight(t: datetime, after: bool) -> datetime:
        local = t.astimezone(tz)
        day = local.date()
        m = datetime.fromtimestamp(_local_midnight((day - datetime(1970, 1, 1).date()).days, tz), tz)
        if after and m < t:
            m = datetime.fromtimestamp(_local_midnight((day - datetime(1970, 1, 1).date()).days + 1, tz), tz)
        return m
    first, last = midnight(since, True), midnight(until, False)
    return (first, last) if first < last else (until, until)
