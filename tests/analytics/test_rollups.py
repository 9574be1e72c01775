"""analytics.rollups: the numba kernels held equal to their plain references (hypothesis), merging
equal to reducing the whole, local-time buckets equal to datetime's field arithmetic in several zones,
the measurement-time window's edges, and merge_sql inside the real PostgreSQL against the reference and
against a plain GROUP BY over the raw rows.  No timing is asserted."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from analytics import rollups as R
from ingest import pgbinary

SHANGHAI = ZoneInfo("Asia/Shanghai")
EXACT = ("keys", "buckets", "count", "n", "min", "max", "last", "last_t")
I64 = (-(2**63), 2**63 - 1)


# --- strategies -------------------------------------------------------------------------------------

VALUE = st.one_of(st.just(math.nan), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e300, -1e300]),
                  st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False))


@st.composite
def batches(draw, max_rows: int = 60):
    """(keys, buckets, times, values): few distinct keys, buckets and times, so groups and ties are common."""
    k = draw(st.integers(1, 3))
    rows = draw(st.integers(0, max_rows))
    key_pool = draw(st.lists(st.integers(*I64), min_size=1, max_size=4))
    bucket_pool = draw(st.lists(st.integers(*I64), min_size=1, max_size=3))
    time_pool = draw(st.lists(st.floats(-1e10, 1e10, allow_nan=False), min_size=1, max_size=4))
    keys = draw(st.lists(st.sampled_from(key_pool), min_size=rows, max_size=rows))
    buckets = draw(st.lists(st.sampled_from(bucket_pool), min_size=rows, max_size=rows))
    times = draw(st.lists(st.sampled_from(time_pool), min_size=rows, max_size=rows))
    values = draw(st.lists(st.lists(VALUE, min_size=k, max_size=k), min_size=rows, max_size=rows))
    return (np.array(keys, dtype=np.int64), np.array(buckets, dtype=np.int64), np.array(times, dtype=np.float64),
            np.array(values, dtype=np.float64).reshape(rows, k))


def assert_partials_equal(got: R.Partials, want: R.Partials, *, sums_exact: bool = True, scale=None) -> None:
    for name in EXACT:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    if sums_exact:
        np.testing.assert_array_equal(got.sum, want.sum, err_msg="sum")
    else:
        # summation order differs: equal to rounding, relative to the magnitudes added
        assert np.all(np.abs(got.sum - want.sum) <= 1e-12 * scale), (got.sum, want.sum)


def magnitude(keys, buckets, times, values) -> np.ndarray:
    return R.reduce_groups_reference(keys, buckets, times, np.abs(values)).sum


# --- reduce_groups ----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_kernel_equals_reference(batch):
    assert_partials_equal(R.reduce_groups(*batch), R.reduce_groups_reference(*batch))


@settings(max_examples=200, deadline=None)
@given(batches())
def test_numpy_way_equals_reference(batch):
    assert_partials_equal(R.reduce_groups_numpy(*batch), R.reduce_groups_reference(*batch),
                          sums_exact=False, scale=magnitude(*batch))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 50, 5_000]), st.floats(0.0, 1.0))
def test_many_groups(seed, keys_n, nan_share):
    rng = np.random.default_rng(seed)
    rows = 20_000
    keys = rng.integers(0, keys_n, rows)
    buckets = rng.integers(0, 7, rows) * 900
    times = rng.integers(0, 500, rows).astype(np.float64)            # many ties
    values = rng.standard_normal((rows, 3)) * 1e6
    values[rng.random(values.shape) < nan_share] = np.nan
    want = R.reduce_groups_reference(keys, buckets, times, values)
    assert_partials_equal(R.reduce_groups(keys, buckets, times, values), want)
    assert_partials_equal(R.reduce_groups_numpy(keys, buckets, times, values), want,
                          sums_exact=False, scale=magnitude(keys, buckets, times, values))


def test_the_documented_cases():
    nan = math.nan
    keys = np.array([7, 7, 7, 7, 3], dtype=np.int64)
    buckets = np.zeros(5, dtype=np.int64)
    times = np.array([10.0, 30.0, 30.0, 20.0, 5.0])
    values = np.array([[1.0, nan], [2.0, nan], [4.0, nan], [nan, nan], [-1.0, 8.0]])
    p = R.reduce_groups(keys, buckets, times, values)
    assert p.keys.tolist() == [3, 7] and p.count.tolist() == [1, 4]
    assert p.n.tolist() == [[1, 1], [3, 0]]
    assert p.sum.tolist() == [[-1.0, 8.0], [7.0, 0.0]]                  # all-NaN column: n 0, sum 0
    assert p.min[1, 0] == 1.0 and p.max[1, 0] == 4.0
    assert p.last[1, 0] == 4.0 and p.last_t[1, 0] == 30.0               # tie at t=30: the later row
    assert np.isnan([p.min[1, 1], p.max[1, 1], p.last[1, 1], p.last_t[1, 1]]).all()
    empty = R.reduce_groups(keys[:0], buckets[:0], times[:0], values[:0])
    assert len(empty) == 0 and empty.n.shape == (0, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: R.reduce_groups([1], [0], [0.0], np.array([1.0])), "values.reshape"),
    (lambda: R.reduce_groups([1.5], [0], [0.0], [[1.0]]), "keys must be int64"),
    (lambda: R.reduce_groups([1, 2], [0], [0.0, 0.0], [[1.0], [2.0]]), "buckets must be one-dimensional with 2"),
    (lambda: R.reduce_groups([1], [0], [math.nan], [[1.0]]), "times must be finite"),
    (lambda: R.reduce_groups([1], [0], [0.0], [[math.inf]]), "finite or NaN"),
    (lambda: R.reduce_groups(np.array([2**63], dtype=np.uint64), [0], [0.0], [[1.0]]), "int64"),
])
def test_refusals_explain_themselves(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- merge ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(batches(), st.data())
def test_merge_of_two_halves_equals_the_whole(batch, data):
    rows = len(batch[0])
    cut = data.draw(st.integers(0, rows))
    first = R.reduce_groups(*(a[:cut] for a in batch))
    second = R.reduce_groups(*(a[cut:] for a in batch))
    merged = R.merge(first, second)
    assert_partials_equal(merged, R.reduce_groups(*batch), sums_exact=False, scale=magnitude(*batch))
    assert_partials_equal(merged, R.merge_reference(first, second))


def test_merge_refuses_different_columns():
    one = R.reduce_groups([1], [0], [0.0], [[1.0]])
    two = R.reduce_groups([1], [0], [0.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="1 and 2 value columns"):
        R.merge(one, two)


# --- local-time buckets -----------------------------------------------------------------------------

ZONES = ["Asia/Shanghai", "Europe/Berlin", "America/New_York", "America/Santiago",   # DST at midnight
         "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Chatham", "UTC"]          # 30-min DST, +5:45, +12:45
START, END = int(datetime(2019, 1, 1, tzinfo=UTC).timestamp()), int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())


def _transitions(tz: ZoneInfo) -> list[int]:
    out, prev = [], R._offset_at(START, tz)
    for s in range(START, END, 1800):
        off = R._offset_at(s, tz)
        if off != prev:
            lo, hi = s - 1800, s
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if R._offset_at(mid, tz) == prev else (lo, mid)
            out.append(hi)
        prev = off
    return out


TRANSITIONS = {name: _transitions(ZoneInfo(name)) for name in ZONES}


def reference_bucket(t: float, width: int, tz: ZoneInfo) -> int:
    dt = datetime.fromtimestamp(math.floor(t), tz)
    if width == 86_400:
        return int(dt.replace(hour=0, minute=0, second=0, fold=0).timestamp())
    into = dt.hour * 3600 + dt.minute * 60 + dt.second
    start = into - into % width
    return int(dt.replace(hour=start // 3600, minute=start % 3600 // 60, second=start % 60).timestamp())


def reference_day(t: float, tz: ZoneInfo) -> int:
    return (datetime.fromtimestamp(math.floor(t), tz).date() - date(1970, 1, 1)).days


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ZONES), st.sampled_from([300, 900, 86_400]), st.data())
def test_bucket_starts_equal_datetime_field_arithmetic(zone, width, data):
    tz = ZoneInfo(zone)
    near = st.sampled_from(TRANSITIONS[zone] or [START]).flatmap(
        lambda s: st.floats(s - 3 * 3600, s + 3 * 3600, allow_nan=False))
    anywhere = st.floats(START, END - 1, allow_nan=False)
    times = np.array(data.draw(st.lists(st.one_of(anywhere, near), min_size=0, max_size=40)), dtype=np.float64)
    got = R.bucket_starts(times, width, tz)
    assert got.dtype == np.int64
    assert got.tolist() == [reference_bucket(t, width, tz) for t in times]
    days = R.local_day(times, tz)
    assert days.dtype == np.int32
    assert days.tolist() == [reference_day(t, tz) for t in times]


def test_local_midnight_splits_days_and_quarter_hours():
    before = datetime(2024, 3, 14, 23, 59, 59, tzinfo=SHANGHAI).timestamp()
    after = datetime(2024, 3, 15, 0, 0, 0, tzinfo=SHANGHAI).timestamp()
    t = np.array([before, after])
    d0, d1 = R.local_day(t, SHANGHAI).tolist()
    assert (d0, d1) == ((date(2024, 3, 14) - date(1970, 1, 1)).days, (date(2024, 3, 15) - date(1970, 1, 1)).days)
    assert R.bucket_starts(t, 86_400, SHANGHAI).tolist() == [
        datetime(2024, 3, 14, tzinfo=SHANGHAI).timestamp(), after]
    assert R.bucket_starts(t, 900, SHANGHAI).tolist() == [
        datetime(2024, 3, 14, 23, 45, tzinfo=SHANGHAI).timestamp(), after]
    assert R.bucket_starts(t, 300, SHANGHAI).tolist() == [
        datetime(2024, 3, 14, 23, 55, tzinfo=SHANGHAI).timestamp(), after]
    # the UTC day is the same for both: the split is local
    assert int(before) // 86_400 == int(after) // 86_400


def test_bucket_refusals():
    with pytest.raises(ValueError, match="divide a day"):
        R.bucket_starts(np.array([0.0]), 7 * 60, SHANGHAI)
    with pytest.raises(ValueError, match="1900-2200"):
        R.bucket_starts(np.array([math.nan]), 900, SHANGHAI)


# --- measurement time -------------------------------------------------------------------------------

def test_measurement_times_at_the_window_edges():
    received = 1_700_000_000.0
    behind, ahead = R.MEASUREMENT_BEHIND_S, R.MEASUREMENT_AHEAD_S
    assert (behind, ahead) == (7 * 86_400, 300)
    device = np.array([received - behind, received - behind - 0.001, received + ahead, received + ahead + 0.001,
                       math.nan, received - 3600, 946_684_800.0])
    got = R.measurement_times(device, np.full(len(device), received))
    assert got.tolist() == [received - behind, received, received + ahead, received, received,
                            received - 3600, received]
    narrow = R.measurement_times(device, np.full(len(device), received), behind_s=3600, ahead_s=0)
    assert narrow[5] == received - 3600 and narrow[2] == received and narrow[0] == received


def test_measurement_times_refusals():
    with pytest.raises(ValueError, match="received_t must be finite"):
        R.measurement_times(np.array([1.0]), np.array([math.nan]))
    with pytest.raises(ValueError, match="with 1 rows"):
        R.measurement_times(np.array([1.0]), np.array([1.0, 2.0]))


# --- merge_sql in PostgreSQL ------------------------------------------------------------------------

COLUMNS = ("flow", "temp", "rsrp")


def _random_batch(rng, rows: int, base: float):
    keys = rng.integers(0, 25, rows)
    # whole milliseconds: a timestamptz keeps them exactly; a few repeated instants make ties
    times = base + rng.integers(0, 2 * 86_400_000, rows) / 1000
    times[rng.random(rows) < 0.2] = base + 43_200.5
    values = np.round(rng.standard_normal((rows, len(COLUMNS))) * 100, 3)
    values[rng.random(values.shape) < 0.25] = np.nan
    values[rng.random(rows) < 0.05, 1] = np.nan
    return keys, R.bucket_starts(times, 900, SHANGHAI), times, values


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merge_sql_in_postgres_equals_reference_and_group_by(db_url, seed):
    rng = np.random.default_rng(seed)
    base = datetime(2024, 3, 14, 12, tzinfo=SHANGHAI).timestamp()
    batches = [_random_batch(rng, int(rows), base) for rows in rng.integers(0, 600, 6)]
    # merge order: batches shuffled; one merged in three pieces, one through a staging table
    pieces = []
    for i in rng.permutation(len(batches)):
        batch = batches[i]
        if i == 0:
            cuts = sorted(rng.integers(0, len(batch[0]) + 1, 2))
            pieces += [tuple(a[lo:hi] for a in batch) for lo, hi in zip([0, *cuts], [*cuts, len(batch[0])])]
        else:
            pieces.append(batch)
    # two pieces go through a staging table (COPY of partial_rows; binary COPY of partial_columns)
    via_rows, via_columns = (int(i) for i in rng.choice(len(pieces), 2, replace=False))

    upsert = R.merge_sql("rollup_test", ["device_key", "bucket"], COLUMNS)
    from_staging = R.merge_sql("rollup_test", ["device_key", "bucket"], COLUMNS, source="rollup_staging")
    names = ["device_key", "bucket", *R.rollup_columns(COLUMNS)]
    seq = 0
    with psycopg.connect(db_url) as conn:
        conn.execute(R.rollup_table_sql("rollup_test", [("device_key", "bigint"), ("bucket", "timestamptz")], COLUMNS))
        conn.execute("CREATE TEMP TABLE rollup_staging (LIKE rollup_test)")
        conn.execute("""CREATE TEMP TABLE raw_test (seq bigint, device_key bigint, bucket timestamptz,
                        t timestamptz, flow double precision, temp double precision, rsrp double precision)""")
        with conn.cursor() as cur:
            for i, piece in enumerate(pieces):
                partials = R.reduce_groups(*piece)
                if i == via_rows:
                    with cur.copy(f"COPY rollup_staging ({', '.join(names)}) FROM STDIN") as copy:
                        for row in R.partial_rows(partials):
                            copy.write_row(row)
                    cur.execute(from_staging)
                    cur.execute("TRUNCATE rollup_staging")
                elif i == via_columns:
                    columns = R.partial_columns(partials, COLUMNS)
                    assert [name for name, _ in columns][2:] == names[2:]
                    block = pgbinary.encode([pgbinary.Column(_PGTYPE[name.rsplit("_", 1)[-1]], values)
                                             for name, values in columns], len(partials))
                    with cur.copy(f"COPY rollup_staging ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(block)
                    cur.execute(from_staging)
                    cur.execute("TRUNCATE rollup_staging")
                else:
                    cur.executemany(upsert, list(R.partial_rows(partials)))
                keys, buckets, times, values = piece
                with cur.copy("COPY raw_test FROM STDIN") as copy:
                    for r in range(len(keys)):
                        copy.write_row([seq, int(keys[r]), datetime.fromtimestamp(int(buckets[r]), UTC),
                                        datetime.fromtimestamp(float(times[r]), UTC),
                                        *[None if math.isnan(v) else float(v) for v in values[r]]])
                        seq += 1
        table = conn.execute(f"SELECT {', '.join(names)} FROM rollup_test ORDER BY device_key, bucket").fetchall()
        grouped = conn.execute("""
            SELECT device_key, bucket, count(*),
                   count(flow), coalesce(sum(flow), 0), min(flow), max(flow),
                   count(temp), coalesce(sum(temp), 0), min(temp), max(temp),
                   count(rsrp), coalesce(sum(rsrp), 0), min(rsrp), max(rsrp)
            FROM raw_test GROUP BY device_key, bucket ORDER BY device_key, bucket""").fetchall()
        last = {col: dict(((k, b), (v, t)) for k, b, v, t in conn.execute(f"""
            SELECT DISTINCT ON (device_key, bucket) device_key, bucket, {col}, t FROM raw_test
            WHERE {col} IS NOT NULL ORDER BY device_key, bucket, t DESC, seq DESC""").fetchall())
                for col in COLUMNS}

    whole = [np.concatenate([p[a] for p in pieces]) for a in range(4)]
    want = R.reduce_groups_reference(*whole)
    scale = magnitude(*whole)
    assert len(table) == len(want) == len(grouped) > 0
    for g, row in enumerate(table):
        assert row[0] == want.keys[g] and row[1].timestamp() == want.buckets[g] and row[2] == want.count[g]
        assert grouped[g][:3] == row[:3]
        for j, col in enumerate(COLUMNS):
            n, total, low, high, last_v, last_t = row[3 + 6 * j: 9 + 6 * j]
            assert n == want.n[g, j]
            assert abs(total - want.sum[g, j]) <= 1e-12 * scale[g, j]
            assert low == _none(want.min[g, j]) and high == _none(want.max[g, j]) and last_v == _none(want.last[g, j])
            if n:
                assert abs(last_t.timestamp() - want.last_t[g, j]) < 1e-6
            else:
                assert last_t is None
            sql_n, sql_sum, sql_min, sql_max = grouped[g][3 + 4 * j: 7 + 4 * j]
            assert (sql_n, sql_min, sql_max) == (n, low, high)
            assert abs(sql_sum - total) <= 1e-12 * scale[g, j]
            assert last[col].get((row[0], row[1]), (None, None)) == (last_v, last_t)


_PGTYPE = {"key": "bigint", "bucket": "timestamp with time zone", "count": "bigint", "n": "bigint",
           "sum": "double precision", "min": "double precision", "max": "double precision",
           "last": "double precision", "t": "timestamp with time zone"}     # "…_last_t".rsplit("_", 1) -> "t"


def _none(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def test_merge_sql_refuses_odd_identifiers():
    with pytest.raises(ValueError, match="identifier"):
        R.merge_sql("rollup; DROP TABLE x", ["device_key"], ["flow"])
    with pytest.raises(ValueError, match="identifier"):
        R.merge_sql("rollup", ["device_key"], ['flow"'])


def test_last_t_is_stored_as_the_writer_stores_reading_times(db_url):
    """partial_rows rounds last_t to the microsecond as ingest/pgbinary rounds the readings' `time`, so a
    rollup's last_t equals its reading's stored time even for sub-microsecond float times."""
    rng = np.random.default_rng(5)
    times = 1_709_222_400 + rng.random(2_000) * 86_400
    partials = R.reduce_groups(np.arange(len(times)), np.zeros(len(times), dtype=np.int64), times,
                               np.ones((len(times), 1)))
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TEMP TABLE stored (i bigint, t timestamptz)")
        block = pgbinary.encode([pgbinary.Column("bigint", np.arange(len(times))),
                                 pgbinary.Column("timestamp with time zone", times)], len(times))
        with conn.cursor().copy("COPY stored FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(block)
        stored = dict(conn.execute("SELECT i, t FROM stored").fetchall())
    rows = list(R.partial_rows(partials))
    assert [row[8] for row in rows] == [stored[i] for i in range(len(times))]


def test_the_benchmark_runs(pg_admin_url, tmp_path):
    """benchmarks/rollups.py --quick completes and its three ways agree (it checks them itself); no
    timing is asserted (the figures live in benchmarks/README.md)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "rollups.py"), "--quick", "--merge-batches", "2",
                           "--database-url", pg_admin_url, "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    [size] = figures["sizes"]
    assert size["readings"] == 100_000 and 0 < size["groups"] <= 100_000
    assert set(size["median_s"]) == {"numba", "lexsort", "numpy", "sql5", "sql_last"}
    assert figures["merge"]["table_rows"] > 0
