"""Read latency of the analytics figures at 10M readings from 100,000 devices over 30 days (issue 13).

    python benchmarks/read_latency.py                        # 100,000 devices, 10M readings, ~5 min
    python benchmarks/read_latency.py --quick                # 5,000 devices, 500k readings
    python benchmarks/read_latency.py --json figures.json

The database is built in SQL (benchmarks/_coverage_data.py's registry: the bundled models' mix, one
catalogue site per 100 devices, skewed site sizes), then 30 days of readings: every water meter an
hourly-ish register reading (≈ 60 % of the readings) and every NB-IoT/Cat-1 device radio figures
(≈ 40 %), drawn by PostgreSQL after `setseed`.  The rollup tables and `water_daily` are then filled from
those readings by SQL (the same sums the writer keeps; building them through the gateway would take
the ingest benchmark's time, and what is measured here is reading them).

Measured, each on one warm connection, `--requests` times with a random key each time (p50/p95/p99):

* **site water, 30 days of 15-minute buckets**: `analytics.rollups.rollup_series` of
  `rollup_water_site_15m` for one of the busiest 100 sites (2,880 buckets);
* **meter, a month of daily consumption**: `analytics.water.daily_consumption` of a random meter;
* **city radio summary**: `analytics.radio.radio_summary` of a random city over the last 7 local days
  (from local midnight 6 days ago to now): per city, site and cell the RSRP/SINR p10/p50/p90, ECL shares
  and coverage rate of the devices' latest figures (the writer's `rollup_radio_latest`), in one statement;
* **city radio report** (reported, the requirement names the summary): `radio_report` of a random city,
  the same groups computed in Python from every device's latest figures, plus the weak devices and every
  device's uplink success (counted in the raw log, which holds one stored uplink per reading).

Nothing is asserted on times; the requirement (each p95 under 100 ms) is reported PASS/FAIL."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import _coverage_data as data  # noqa: E402

TZ = "Asia/Shanghai"
REQUIREMENT_MS = 100.0
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 devices, 500k readings, 50 requests")
    p.add_argument("--devices", type=int)
    p.add_argument("--readings", type=int, help="total readings (water + radio)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--requests", type=int)
    p.add_argument("--pg-admin-url", default=os.environ.get("IOTJX_BENCH_PG_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.devices = a.devices or (5_000 if a.quick else 100_000)
    a.readings = a.readings or (500_000 if a.quick else 10_000_000)
    a.requests = a.requests or (50 if a.quick else 300)
    return a


def build_readings(url: str, days: int, readings: int) -> dict[str, float]:
    """30 days of water registers and radio figures in SQL; then the rollups and water_daily from them."""
    from iotjx.db.migrations import ensure_partitions

    took: dict[str, float] = {}
    today = datetime.now(UTC).date()
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_partitions(conn, today - timedelta(days=days + 2), today + timedelta(days=1))
        meters = conn.execute("SELECT count(*) FROM devices WHERE pilot = 'water'").fetchone()[0]
        radios = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
        per_meter = max(1, round(0.6 * readings / max(meters, 1)))
        per_radio = max(1, round(0.4 * readings / max(radios, 1)))
        conn.execute("SELECT setseed(0.13)")
        conn.execute("SET synchronous_commit = off")
        t0 = time.perf_counter()
        # Reading k of a meter at an even step over the days with ±20 % jitter; the register grows by
        # 0-40 l a reading; its own clock 0-60 s before the receive time.
        conn.execute("""
            INSERT INTO water_readings (time, device_id, transport, meter_address, meter_type, flow_m3,
                                        settlement_flow_m3, meter_time, status, valve, battery_low)
            SELECT t, device_id, 'mqtt', lpad(device_key::text, 14, '0'), 16, m3, m3, t - interval '1 s' * (60 * random()),
                   0, CASE WHEN random() < 0.01 THEN 'closed' ELSE 'open' END, random() < 0.02
            FROM (SELECT d.device_id, d.device_key,
                         now() - make_interval(days => %(days)s) + make_interval(secs => (k + 0.2 * random()) * %(step)s) AS t,
                         (d.device_key %% 1000) + 0.02 * k + 0.001 * floor(random() * 20) AS m3
                  FROM devices d CROSS JOIN generate_series(0, %(n)s - 1) k WHERE d.pilot = 'water') s""",
                     {"days": days, "step": days * 86400.0 / per_meter, "n": per_meter})
        took["water_readings"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.execute("""
            INSERT INTO radio_readings (time, device_id, transport, source, rsrp_dbm, sinr_db, rsrq_db, ecl, pci, cell_id)
            SELECT t, device_id, 'mqtt', 'payload', rsrp, sinr, -10 - 8 * random(),
                   CASE WHEN rsrp >= -110 THEN 0 WHEN rsrp >= -120 THEN 1 ELSE 2 END, cell %% 504, cell
            FROM (SELECT d.device_id,
                         now() - make_interval(days => %(days)s) + make_interval(secs => (k + random()) * %(step)s) AS t,
                         -85 - 35 * random() ^ 2 AS rsrp, 15 - 20 * random() AS sinr,
                         460000000 + (coalesce(d.site_id, 0) %% 3000) AS cell
                  FROM devices d CROSS JOIN generate_series(0, %(n)s - 1) k) s""",
                     {"days": days, "step": days * 86400.0 / per_radio, "n": per_radio})
        took["radio_readings"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The raw log: one stored uplink per water reading, and per radio reading of the other devices.
        conn.execute("""
            INSERT INTO raw_uplinks (received_at, device_id, transport, payload, outcome)
            SELECT time, device_id, 'mqtt', '\\x68'::bytea, 'stored' FROM water_readings
            UNION ALL
            SELECT r.time, r.device_id, 'mqtt', '\\x68'::bytea, 'stored'
            FROM radio_readings r JOIN devices d USING (device_id) WHERE d.pilot <> 'water'""")
        took["raw_uplinks"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _fill_rollups(conn)
        took["rollups"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.execute(f"""
            INSERT INTO water_daily (device_id, day, consumption_m3, readings, first_register_m3, last_register_m3,
                                     first_at, last_at, meter_address)
            SELECT device_id, (meter_time AT TIME ZONE '{TZ}')::date, coalesce(sum(delta), 0), count(*),
                   min(flow_m3), max(flow_m3), min(meter_time), max(meter_time), min(meter_address)
            FROM (SELECT device_id, meter_time, flow_m3, meter_address,
                         flow_m3 - lag(flow_m3) OVER (PARTITION BY device_id ORDER BY meter_time) AS delta
                  FROM water_readings) w
            GROUP BY 1, 2""")
        took["water_daily"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for table in ("water_readings", "radio_readings", "raw_uplinks", "water_daily", "rollup_water_site_15m",
                      "rollup_water_day", "rollup_radio_day", "rollup_radio_cell_day",
                      "rollup_radio_latest"):
            conn.execute(f"VACUUM ANALYZE {table}")
        took["analyze"] = time.perf_counter() - t0
        took["rows"] = conn.execute("SELECT (SELECT count(*) FROM water_readings) + (SELECT count(*) FROM radio_readings)"
                                    ).fetchone()[0]
    return took


def _fill_rollups(conn: psycopg.Connection) -> None:
    """The rollup rows the writer would have kept for these readings (the same sums, in SQL)."""
    mt = ("CASE WHEN meter_time BETWEEN r.time - interval '7 days' AND r.time + interval '300 s' "
          "THEN meter_time ELSE r.time END")
    day = f"(date_trunc('day', {{t}} AT TIME ZONE '{TZ}') AT TIME ZONE '{TZ}')"
    q15 = f"(date_bin('15 minutes', {{t}} AT TIME ZONE '{TZ}', timestamp '2000-01-01') AT TIME ZONE '{TZ}')"
    conn.execute(f"""
        INSERT INTO rollup_water_site_15m (site_id, bucket, count, battery_low_n, battery_low_sum,
                                           valve_closed_n, valve_closed_sum)
        SELECT d.site_id, {q15.format(t=mt)}, count(*), count(battery_low), coalesce(sum(battery_low::int), 0),
               count(valve), coalesce(sum((valve = 'closed')::int), 0)
        FROM water_readings r JOIN devices d USING (device_id) WHERE d.site_id IS NOT NULL GROUP BY 1, 2""")
    conn.execute(f"""
        INSERT INTO rollup_water_day (device_key, bucket, count, flow_m3_n, flow_m3_sum, flow_m3_min, flow_m3_max,
                                      flow_m3_last, flow_m3_last_t, settlement_flow_m3_n, settlement_flow_m3_sum,
                                      battery_low_n, battery_low_sum, valve_closed_n, valve_closed_sum)
        SELECT d.device_key, {day.format(t=mt)}, count(*), count(flow_m3), sum(flow_m3), min(flow_m3), max(flow_m3),
               max(flow_m3), max({mt}), count(*), sum(flow_m3), count(*), sum(battery_low::int), count(*),
               sum((valve = 'closed')::int)
        FROM water_readings r JOIN devices d USING (device_id) GROUP BY 1, 2""")
    last = ", ".join(f"(array_agg({c} ORDER BY r.time DESC) FILTER (WHERE {c} IS NOT NULL))[1], "
                     f"max(r.time) FILTER (WHERE {c} IS NOT NULL)" for c in ("rsrp_dbm", "sinr_db", "rsrq_db", "ecl",
                                                                              "cell_id", "pci"))
    conn.execute(f"""
        INSERT INTO rollup_radio_day (device_key, bucket, count,
                                      rsrp_dbm_n, rsrp_dbm_sum, rsrp_dbm_min, rsrp_dbm_max,
                                      sinr_db_n, sinr_db_sum, sinr_db_min, sinr_db_max,
                                      rsrq_db_n, rsrq_db_sum, rsrq_db_min, rsrq_db_max, ecl_n, ecl_sum, ecl_max,
                                      cell_id_n, cell_id_sum, pci_n, pci_sum,
                                      rsrp_dbm_last, rsrp_dbm_last_t, sinr_db_last, sinr_db_last_t,
                                      rsrq_db_last, rsrq_db_last_t, ecl_last, ecl_last_t, cell_id_last, cell_id_last_t,
                                      pci_last, pci_last_t)
        SELECT d.device_key, {day.format(t='r.time')}, count(*),
               count(rsrp_dbm), sum(rsrp_dbm), min(rsrp_dbm), max(rsrp_dbm),
               count(sinr_db), sum(sinr_db), min(sinr_db), max(sinr_db),
               count(rsrq_db), coalesce(sum(rsrq_db), 0), min(rsrq_db), max(rsrq_db), count(ecl), sum(ecl), max(ecl),
               count(cell_id), coalesce(sum(cell_id), 0), count(pci), coalesce(sum(pci), 0), {last}
        FROM radio_readings r JOIN devices d USING (device_id) GROUP BY 1, 2""")
    cols = ("rsrp_dbm", "sinr_db", "rsrq_db", "ecl", "cell_id", "pci")
    conn.execute(f"""
        INSERT INTO rollup_radio_latest (device_key, bucket, count, {", ".join(f"{c}_n, {c}_sum, {c}_last, {c}_last_t"
                                                                           for c in cols)})
        SELECT d.device_key, timestamptz '1970-01-01 00:00:00+00', count(*), {", ".join(
            f"count({c}), coalesce(sum({c}), 0), (array_agg({c} ORDER BY r.time DESC) FILTER (WHERE {c} IS NOT NULL))[1], "
            f"max(r.time) FILTER (WHERE {c} IS NOT NULL)" for c in cols)}
        FROM radio_readings r JOIN devices d USING (device_id) GROUP BY 1""")
    conn.execute(f"""
        INSERT INTO rollup_radio_cell_day (cell_id, bucket, count, rsrp_dbm_n, rsrp_dbm_sum, rsrp_dbm_min,
                                           rsrp_dbm_max, sinr_db_n, sinr_db_sum, sinr_db_min, sinr_db_max,
                                           ecl_0_n, ecl_0_sum, ecl_1_n, ecl_1_sum, ecl_2_n, ecl_2_sum)
        SELECT cell_id, {day.format(t='r.time')}, count(*), count(rsrp_dbm), sum(rsrp_dbm), min(rsrp_dbm),
               max(rsrp_dbm), count(sinr_db), sum(sinr_db), min(sinr_db), max(sinr_db),
               count(ecl), sum((ecl = 0)::int), count(ecl), sum((ecl = 1)::int), count(ecl), sum((ecl = 2)::int)
        FROM radio_readings r WHERE cell_id IS NOT NULL GROUP BY 1, 2""")


def site_water(conn: psycopg.Connection, rng: random.Random, ctx: dict) -> int:
    from analytics.rollups import rollup_series
    now = datetime.now(ZoneInfo(TZ))
    got = rollup_series(conn, "rollup_water_site_15m", {"site_id": rng.choice(ctx["sites"])},
                        now - timedelta(days=30), now)
    return len(got)


def meter_month(conn: psycopg.Connection, rng: random.Random, ctx: dict) -> int:
    from analytics.water import daily_consumption
    today = datetime.now(ZoneInfo(TZ)).date()
    return len(daily_consumption(conn, rng.choice(ctx["meters"]), today - timedelta(days=30), today + timedelta(days=1)))


def _week() -> datetime:
    """The last 7 local days, today so far included."""
    return datetime.now(ZoneInfo(TZ)).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=6)


def city_radio(conn: psycopg.Connection, rng: random.Random, ctx: dict) -> int:
    """analytics.radio.radio_summary of a city: its, its sites' and cells' distributions and coverage rate."""
    from analytics.radio import radio_summary
    return len(radio_summary(conn, _week(), rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city=rng.choice(data.CITY_CODES)))


def city_radio_report(conn: psycopg.Connection, rng: random.Random, ctx: dict) -> int:
    """analytics.radio.radio_report of a city: the summary computed in Python from every device's latest
    figures, plus the weak devices and every device's uplink success (the CLI's and the API's report)."""
    from analytics.radio import radio_report
    got = radio_report(conn, _week(), None, rsrp_min_dbm=-105.0, sinr_min_db=-3.0,
                       city=rng.choice(data.CITY_CODES), tz=ZoneInfo(TZ))
    return len(got.groups) + len(got.success)


QUERIES: dict[str, Callable[[psycopg.Connection, random.Random, dict], int]] = {
    "site water, 30 days of 15-minute buckets": site_water,
    "meter, a month of daily consumption": meter_month,
    "city radio summary, last 7 local days": city_radio,
    "city radio report (+ devices, weak, uplink success)": city_radio_report,
}


def measure(url: str, requests: int) -> dict[str, dict[str, Any]]:
    out = {}
    with psycopg.connect(url, autocommit=True) as conn:
        ctx = {"sites": [r[0] for r in conn.execute(
                   "SELECT site_id FROM devices WHERE pilot = 'water' AND site_id IS NOT NULL "
                   "GROUP BY 1 ORDER BY count(*) DESC LIMIT 100")],
               "meters": [r[0] for r in conn.execute(
                   "SELECT device_id FROM devices WHERE pilot = 'water' ORDER BY random() LIMIT 1000")]}
        for name, query in QUERIES.items():
            rng = random.Random(7)
            try:
                rows = [query(conn, rng, ctx) for _ in range(3)]          # warm
                samples = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    rows.append(query(conn, rng, ctx))
                    samples.append(time.perf_counter() - t0)
            except Exception as exc:  # a figure not built yet is reported, the others still measured
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            ms = np.array(samples) * 1000
            out[name] = {"n": requests, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                         "p99_ms": float(np.percentile(ms, 99)), "rows_median": statistics.median(rows)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    name = f"iotjx_read_{os.getpid()}"
    url = data.create_database(args.pg_admin_url, name)
    try:
        t0 = time.perf_counter()
        took = data.build_registry(url, args.devices)
        took.update(build_readings(url, args.days, args.readings))
        console.print(f"built {args.devices:,} devices and {took['rows']:,} readings over {args.days} days in "
                      f"{time.perf_counter() - t0:.0f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()
                                                                        if k != "rows"))
        figures = measure(url, args.requests)
    finally:
        if not args.keep_db:
            data.drop_database(args.pg_admin_url, name)
    table = Table(title=f"read latency at {took['rows']:,} readings, {args.devices:,} devices (ms)")
    for col in ("figure", "p50", "p95", "p99", "rows", f"p95 < {REQUIREMENT_MS:.0f} ms"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for fig, m in figures.items():
        if "error" in m:
            table.add_row(fig, "—", "—", "—", "—", m["error"][:60])
            continue
        table.add_row(fig, f"{m['p50_ms']:.1f}", f"{m['p95_ms']:.1f}", f"{m['p99_ms']:.1f}", f"{m['rows_median']:,.0f}",
                      "PASS" if m["p95_ms"] < REQUIREMENT_MS else "FAIL")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                                                     "loadavg": os.getloadavg()},
                                         "args": {k: str(v) for k, v in vars(args).items()}, "build_s": took,
                                         "figures": figures}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
