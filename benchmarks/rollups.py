"""Rollup kernels (issue 13): `reduce_groups` with numba against the numpy-only way and against the
same aggregation in PostgreSQL, at 1M and 10M readings, in one run.

    python benchmarks/rollups.py                          # 1m and 10m readings
    python benchmarks/rollups.py --sizes 1m --json figures.json
    python benchmarks/rollups.py --quick                  # 100k readings, 2 rounds

The data: 100,000 keys (devices), measurement times uniform over 30 days, buckets = the local day
(Asia/Shanghai, `bucket_starts(…, 86400)`: the device × local day rollup; `--width 900` for 15-minute
buckets), k = 3 value columns with 5 %, 10 % and 30 % NaN.  Each round runs, one after the other:

* **numba**: `analytics.rollups.reduce_groups` (stable lexsort + one njit pass); its lexsort alone is
  timed too, to show what the pass itself costs;
* **numpy**: `reduce_groups_numpy` (lexsort, gather, `reduceat` per aggregate, `last` by masks);
* **SQL**: the readings COPYed once (binary, `ingest.pgbinary`; timed apart) into a temp table, then
  `CREATE TEMP TABLE … AS SELECT … GROUP BY key, bucket` — "SQL 5" with count, n, sum, min, max;
  "SQL + last" adding each column's last value and time (`array_agg(… ORDER BY t DESC, seq DESC)`),
  which is the whole of what the kernel computes.

Then, shaped like the write path (not a reduce_groups comparison): batches of 5,000 readings from
10,000 devices over one day are reduced and merged into a rollup table (an ordinary logged table, as
the writer's would be) two ways, each into its own table: `executemany(merge_sql, partial_rows)` and
a binary COPY of `partial_columns` into a temp staging table then one `merge_sql(source=…)`.  The
statements are timed, not the commit (the writer commits them with the readings).

Medians over the rounds, and each ratio as the median of the per-round ratios (the machine is
shared and noisy).  numba's compile time is measured apart in a child process with an empty
NUMBA_CACHE_DIR (the first call), and its cache load in a second child on that cache.  Nothing is
asserted on times; the results of the three ways are checked to agree."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import psycopg  # noqa: E402

from analytics import rollups as R  # noqa: E402
from ingest.pgbinary import Column, encode  # noqa: E402

SIZES = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}
KEYS = 100_000
DAYS = 30
NAN_SHARE = (0.05, 0.10, 0.30)
START = 1_709_222_400                 # 2024-03-01T00:00:00+08:00
COLUMNS = ("v0", "v1", "v2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1m,10m", help=f"comma-separated, of {', '.join(SIZES)} or a number")
    p.add_argument("--rounds", type=int, help="rounds per size (default 5 at <= 1M, 3 above; --quick 2)")
    p.add_argument("--width", type=int, default=86_400, help="bucket width in seconds (86400: local day)")
    p.add_argument("--no-sql-last", action="store_true", help="skip 'SQL + last' (the slow one)")
    p.add_argument("--merge-batches", type=int, help="write-path-shaped batches merged into a rollup table (30)")
    p.add_argument("--quick", action="store_true", help="100k readings, 2 rounds (a smoke run)")
    p.add_argument("--database-url", default=os.environ.get("IOTJX_BENCH_PG_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"),
                   help="any database: only temp tables are created")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = "100k", args.rounds or 2
    return args


def readings(rows: int, width: int, seed: int = 13) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, KEYS, rows, dtype=np.int64)
    times = START + rng.random(rows) * DAYS * 86_400
    values = rng.standard_normal((rows, len(COLUMNS))) * 50 + 100
    for j, share in enumerate(NAN_SHARE):
        values[rng.random(rows) < share, j] = np.nan
    buckets = R.bucket_starts(times, width, R.ZoneInfo("Asia/Shanghai"))
    return keys, buckets, times, values


def timed(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def compile_times() -> dict[str, float]:
    """First call of reduce_groups and merge in a fresh process: compiling (empty cache), then loading."""
    code = ("import time, numpy as np; t0 = time.perf_counter(); from analytics import rollups as R; "
            "t1 = time.perf_counter(); p = R.reduce_groups(np.array([1, 1]), np.array([0, 0]), np.array([1.0, 2.0]), "
            "np.array([[1.0], [np.nan]])); t2 = time.perf_counter(); R.merge(p, p); t3 = time.perf_counter(); "
            "print(t1 - t0, t2 - t1, t3 - t2)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("compile", "cache_load"):
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                  check=True)
            imp, reduce_s, merge_s = map(float, done.stdout.split())
            out[f"{label}_reduce_s"], out[f"{label}_merge_s"] = reduce_s, merge_s
            out[f"{label}_import_s"] = imp
    return out


def copy_into_postgres(conn: psycopg.Connection, keys, buckets, times, values, chunk: int = 1_000_000) -> float:
    conn.execute("DROP TABLE IF EXISTS rollup_raw")
    conn.execute("CREATE TEMP TABLE rollup_raw (seq bigint, device_key bigint, bucket bigint, t double precision, "
                 + ", ".join(f"{c} double precision" for c in COLUMNS) + ")")
    t0 = time.perf_counter()
    with conn.cursor() as cur, cur.copy("COPY rollup_raw FROM STDIN (FORMAT BINARY)") as copy:
        for lo in range(0, len(keys), chunk):
            hi = min(lo + chunk, len(keys))
            cols = [Column("bigint", np.arange(lo, hi, dtype=np.int64)), Column("bigint", keys[lo:hi]),
                    Column("bigint", buckets[lo:hi]), Column("double precision", times[lo:hi])]
            cols += [Column("double precision", values[lo:hi, j]) for j in range(len(COLUMNS))]
            block = encode(cols, hi - lo)
            # encode() frames a whole stream; the stream is one header, the tuples, one trailer
            copy.write(block[:-2] if lo == 0 else block[19:-2])
        copy.write(b"\xff\xff")
    conn.commit()
    elapsed = time.perf_counter() - t0
    conn.execute("ANALYZE rollup_raw")
    conn.commit()
    return elapsed


def sql_aggregate(with_last: bool) -> str:
    parts = ["device_key", "bucket", "count(*) AS count"]
    for c in COLUMNS:
        parts += [f"count({c}) AS {c}_n", f"coalesce(sum({c}), 0) AS {c}_sum", f"min({c}) AS {c}_min",
                  f"max({c}) AS {c}_max"]
        if with_last:
            parts += [f"(array_agg({c} ORDER BY t DESC, seq DESC) FILTER (WHERE {c} IS NOT NULL))[1] AS {c}_last",
                      f"max(t) FILTER (WHERE {c} IS NOT NULL) AS {c}_last_t"]
    return (f"CREATE TEMP TABLE rollup_out AS SELECT {', '.join(parts)} "
            "FROM rollup_raw GROUP BY device_key, bucket")


def run_sql(conn: psycopg.Connection, statement: str) -> tuple[float, int]:
    conn.execute("DROP TABLE IF EXISTS rollup_out")
    conn.commit()
    t0 = time.perf_counter()
    cur = conn.execute(statement)
    conn.commit()
    elapsed = time.perf_counter() - t0
    return elapsed, cur.rowcount


def check_same(numba_p: R.Partials, numpy_p: R.Partials, conn: psycopg.Connection, with_last: bool) -> None:
    for name in ("keys", "buckets", "count", "n", "min", "max", "last", "last_t"):
        np.testing.assert_array_equal(getattr(numba_p, name), getattr(numpy_p, name), err_msg=name)
    np.testing.assert_allclose(numba_p.sum, numpy_p.sum, rtol=1e-9, atol=1e-6)
    cols = ["count(*)", "sum(count)"] + [f"sum({c}_n), sum({c}_sum), min({c}_min), max({c}_max)" for c in COLUMNS]
    if with_last:
        cols += [f"sum({c}_last)" for c in COLUMNS]
    row = conn.execute(f"SELECT {', '.join(cols)} FROM rollup_out").fetchone()
    want = [len(numba_p), int(numba_p.count.sum())]
    for j in range(len(COLUMNS)):
        want += [int(numba_p.n[:, j].sum()), float(numba_p.sum[:, j].sum()), float(np.nanmin(numba_p.min[:, j])),
                 float(np.nanmax(numba_p.max[:, j]))]
    if with_last:
        want += [float(np.nansum(numba_p.last[:, j])) for j in range(len(COLUMNS))]
    for got, exp in zip(row, want, strict=True):
        assert abs(float(got) - exp) <= 1e-6 * max(1.0, abs(exp)), (row, want)


def bench_size(conn: psycopg.Connection, rows: int, rounds: int, width: int, with_last: bool) -> dict[str, Any]:
    t_data, (keys, buckets, times, values) = timed(readings, rows, width)
    fig: dict[str, Any] = {"readings": rows, "keys": KEYS, "days": DAYS, "width_s": width, "rounds": rounds,
                           "data_s": t_data}
    fig["bucket_starts_s"] = timed(R.bucket_starts, times, width, R.ZoneInfo("Asia/Shanghai"))[0]
    fig["copy_s"] = copy_into_postgres(conn, keys, buckets, times, values)
    statements = {"sql5": sql_aggregate(False)}
    if with_last:
        statements["sql_last"] = sql_aggregate(True)
    samples: dict[str, list[float]] = {name: [] for name in ("numba", "lexsort", "numpy", *statements)}
    groups = None
    for r in range(rounds):
        dt, p_numba = timed(R.reduce_groups, keys, buckets, times, values)
        samples["numba"].append(dt)
        samples["lexsort"].append(timed(np.lexsort, (buckets, keys))[0])
        dt, p_numpy = timed(R.reduce_groups_numpy, keys, buckets, times, values)
        samples["numpy"].append(dt)
        for name, statement in statements.items():
            dt, groups = run_sql(conn, statement)
            samples[name].append(dt)
            if r == 0:
                check_same(p_numba, p_numpy, conn, with_last=name == "sql_last")
        print(f"  {rows:,} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in samples.items()),
              flush=True)
    fig["groups"] = len(p_numba)
    assert groups == len(p_numba), (groups, len(p_numba))
    fig["median_s"] = {k: statistics.median(v) for k, v in samples.items()}
    fig["samples_s"] = samples
    fig["ratio_vs_numba"] = {k: statistics.median(s / n for s, n in zip(v, samples["numba"], strict=True))
                             for k, v in samples.items() if k not in ("numba", "lexsort")}
    fig["ns_per_reading"] = {k: v / rows * 1e9 for k, v in fig["median_s"].items()}
    conn.execute("DROP TABLE IF EXISTS rollup_out")
    conn.execute("DROP TABLE IF EXISTS rollup_raw")
    conn.commit()
    return fig


_PGTYPE = {"key": "bigint", "bucket": "timestamp with time zone", "count": "bigint", "n": "bigint",
           "sum": "double precision", "min": "double precision", "max": "double precision",
           "last": "double precision", "t": "timestamp with time zone"}     # "…_last_t".rsplit("_", 1) -> "t"


def bench_merge(conn: psycopg.Connection, batches: int, batch_rows: int = 5_000, devices: int = 10_000) -> dict:
    rng = np.random.default_rng(7)
    tables = {"executemany": f"rollbench_em_{os.getpid()}", "copy_merge": f"rollbench_cm_{os.getpid()}"}
    keys_sql = [("device_key", "bigint"), ("bucket", "timestamptz")]
    names = ["device_key", "bucket", *R.rollup_columns(COLUMNS)]
    samples: dict[str, list[float]] = {"reduce": [], "executemany": [], "copy_merge": []}
    groups = []
    try:
        for table in tables.values():
            conn.execute(R.rollup_table_sql(table, keys_sql, COLUMNS))
        conn.execute(f"CREATE TEMP TABLE rollbench_staging (LIKE {tables['copy_merge']})")
        conn.commit()
        upsert = R.merge_sql(tables["executemany"], ["device_key", "bucket"], COLUMNS)
        merge = R.merge_sql(tables["copy_merge"], ["device_key", "bucket"], COLUMNS, source="rollbench_staging")
        for b in range(batches):
            keys = rng.integers(0, devices, batch_rows, dtype=np.int64)
            times = START + 3600 + b * 600 + rng.random(batch_rows) * 600      # 10 minutes a batch, one local day
            values = rng.standard_normal((batch_rows, len(COLUMNS))) * 50 + 100
            for j, share in enumerate(NAN_SHARE):
                values[rng.random(batch_rows) < share, j] = np.nan
            buckets = R.bucket_starts(times, 86_400, R.ZoneInfo("Asia/Shanghai"))
            dt, partials = timed(R.reduce_groups, keys, buckets, times, values)
            samples["reduce"].append(dt)
            groups.append(len(partials))
            with conn.cursor() as cur:
                t0 = time.perf_counter()
                cur.executemany(upsert, list(R.partial_rows(partials)))
                samples["executemany"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                block = encode([Column(_PGTYPE[name.rsplit("_", 1)[-1]], values)
                                for name, values in R.partial_columns(partials, COLUMNS)], len(partials))
                with cur.copy(f"COPY rollbench_staging ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(block)
                cur.execute(merge)
                cur.execute("TRUNCATE rollbench_staging")
                samples["copy_merge"].append(time.perf_counter() - t0)
            conn.commit()
        a, b = tables["executemany"], tables["copy_merge"]
        differ = conn.execute(f"SELECT count(*) FROM ((TABLE {a} EXCEPT TABLE {b}) UNION ALL "
                              f"(TABLE {b} EXCEPT TABLE {a})) d").fetchone()[0]
        rows = conn.execute(f"SELECT count(*) FROM {a}").fetchone()[0]
        assert differ == 0, f"the two merge paths disagree on {differ} rows"
    finally:
        conn.rollback()
        for table in tables.values():
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("DROP TABLE IF EXISTS rollbench_staging")
        conn.commit()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"batches": batches, "batch_readings": batch_rows, "devices": devices,
            "partial_rows_median": statistics.median(groups), "table_rows": rows, "median_s": med,
            "us_per_reading": {k: v / batch_rows * 1e6 for k, v in med.items()}, "samples_s": samples}


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [SIZES.get(s) or int(s) for s in args.sizes.split(",")]
    t_start = time.perf_counter()
    figures: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "load_start": os.getloadavg(), "sizes": []}
    import numba
    figures["numba"], figures["numpy"] = numba.__version__, np.__version__
    figures["compile"] = compile_times()
    print("numba first call (empty cache / cache load): reduce_groups "
          f"{figures['compile']['compile_reduce_s']:.2f} / {figures['compile']['cache_load_reduce_s']:.3f} s, merge "
          f"{figures['compile']['compile_merge_s']:.2f} / {figures['compile']['cache_load_merge_s']:.3f} s", flush=True)
    R.reduce_groups(np.array([1]), np.array([0]), np.array([0.0]), np.array([[1.0]]))   # warm in this process
    with psycopg.connect(args.database_url) as conn:
        figures["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
        figures["work_mem"] = conn.execute("SHOW work_mem").fetchone()[0]
        conn.commit()
        for rows in sizes:
            rounds = args.rounds or (5 if rows <= 1_000_000 else 3)
            figures["sizes"].append(bench_size(conn, rows, rounds, args.width, not args.no_sql_last))
        figures["merge"] = bench_merge(conn, batches=args.merge_batches or (5 if args.quick else 30))
    figures["load_end"] = os.getloadavg()
    figures["total_s"] = time.perf_counter() - t_start
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def print_table(figures: dict[str, Any]) -> None:
    print(f"\nnumba {figures['numba']}, numpy {figures['numpy']}, PostgreSQL {figures['postgres']} "
          f"(work_mem {figures['work_mem']}), {figures['cpus']} CPUs, load {figures['load_start'][0]:.2f} -> "
          f"{figures['load_end'][0]:.2f}, {figures['total_s']:.0f} s in all")
    names = [n for n in ("numba", "lexsort", "numpy", "sql5", "sql_last") if n in figures["sizes"][0]["median_s"]]
    print("| readings | groups | rounds | COPY s | " + " | ".join(f"{n} s" for n in names)
          + " | " + " | ".join(f"{n} / numba" for n in names if n not in ("numba", "lexsort")) + " |")
    print("|" + "---:|" * (4 + len(names) + len([n for n in names if n not in ("numba", "lexsort")])))
    for f in figures["sizes"]:
        print(f"| {f['readings']:,} | {f['groups']:,} | {f['rounds']} | {f['copy_s']:.2f} | "
              + " | ".join(f"{f['median_s'][n]:.3f}" for n in names) + " | "
              + " | ".join(f"{f['ratio_vs_numba'][n]:.1f} ×" for n in names if n not in ("numba", "lexsort")) + " |")
    m = figures["merge"]
    print(f"\nmerge into a rollup table: {m['batches']} batches of {m['batch_readings']:,} readings from "
          f"{m['devices']:,} devices, {m['partial_rows_median']:,.0f} partial rows a batch, {m['table_rows']:,} rows at the end")
    print("| step | median ms a batch | µs a reading |")
    print("|---|---:|---:|")
    for k, v in m["median_s"].items():
        print(f"| {k} | {v * 1e3:.2f} | {m['us_per_reading'][k]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
