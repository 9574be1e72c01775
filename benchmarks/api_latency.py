"""API latency at 10M readings from 100,000 devices over 30 days (issue 14, "Benchmark").

    python benchmarks/api_latency.py                          # build 10M readings (~5-8 min), measure, drop
    python benchmarks/api_latency.py --keep-db                # … and keep the database (its name is printed)
    python benchmarks/api_latency.py --reuse iotjx_api_bench  # use that database if it is built, else build and keep it
    python benchmarks/api_latency.py --quick                  # 5,000 devices, 500k readings: a smoke run
    python benchmarks/api_latency.py --concurrency 1,4,16 --requests 200 --repeats 2 --json figures.json
    python benchmarks/api_latency.py --reuse iotjx_api_bench --figures   # every figure route instead (figure_routes.py)

The database is read_latency.py's (benchmarks/_coverage_data.py's registry, then `read_latency.build_readings`:
water registers, radio figures, the raw log, the rollups and `water_daily` in SQL), plus fire alarms: that build
stores no fire frames, so `fire_alarms` rows are inserted directly, matching migration 9's schema (about two
episodes per fire device over the days, 85 % faults, most cleared, a few acknowledged or still active).

The API is the real one, `python -m iotjx.cli api` (uvicorn, as deployed) in its own process on a loopback
port, with `IOTJX_API_RATE_PER_S=0` (the per-key rate limit would answer 429: every request of the benchmark
carries one of a few keys) and `IOTJX_ANALYTICS_INTERVAL_S=0` (the scheduled analytics would run their rounds
during the timing; `GET /alarms` still brings the alarms up to date itself, every 15 s).  Keys: one viewer key
(every city) and one city-scoped viewer key per city; request *i* of an operation uses the viewer key when *i*
is even, else the scoped key of the city it asks about.

The load is an asyncio client (httpx.AsyncClient — already a dependency of the project; locust would add
gevent and a web UI for what a closed loop of coroutines does) in this process: for each concurrency level C,
C workers each send their next request as soon as the last one is answered, `--requests` requests in all per
operation and level.  Latency = request sent → body read (streamed telemetry read to its end); requests/s =
requests / wall time of the level.  Each request asks about a different key (device, site, city, page), drawn
from a seeded generator.  Operations:

* **coverage**: `GET /coverage?city=C` (C a random city; every 5th request without `city`);
* **device day**: `GET /devices/{id}/telemetry` of a random water meter or NB-IoT/Cat-1 device, one local day
  in the data's range, `fields` its family's two main fields plus `rsrp_dbm,sinr_db`, `interval` 1h or 5m
  (alternating), `agg=avg`;
* **site month 1h**: `GET /sites/{code}/telemetry?interval=1h&fields=battery_low,valve_closed&agg=sum`, the 30
  days up to the data's end, of a random site with water meters (served by `rollup_water_site_15m`);
* **alarms p1**: `GET /alarms?city=C` (the first page, 100 items), **alarms p4**: the same list's fourth page
  (a cursor collected before the timing, per city).

Every answer must be 200 (any other status is counted and reported as an error, and fails the operation).
Figures are pooled over `--repeats` rounds (each round runs every level and operation once); the per-round
p95 is reported too, to show the spread.  The requirement (each p95 under 100 ms) is reported PASS/FAIL per
operation at each level (a PASS line for an operation met it at every level, PART at some); nothing is
asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import _coverage_data as data  # noqa: E402
import read_latency  # noqa: E402

TZ = ZoneInfo("Asia/Shanghai")
REQUIREMENT_MS = 100.0
OPERATIONS = ("coverage", "device day", "site month 1h", "alarms p1", "alarms p4")
DESCRIBE = {
    "coverage": "GET /coverage?city=C",
    "device day": "GET /devices/{id}/telemetry, 1 day, 4 fields, 1h|5m",
    "site month 1h": "GET /sites/{id}/telemetry, 30 days, interval=1h",
    "alarms p1": "GET /alarms?city=C, first page",
    "alarms p4": "GET /alarms?city=C&cursor=…, fourth page",
}
ALARM_PAGE = 100
console = Console(highlight=False, width=None if sys.stdout.isatty() else 170)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 devices, 500k readings, 30 requests, levels 1,4")
    p.add_argument("--devices", type=int)
    p.add_argument("--readings", type=int, help="total readings (water + radio)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--alarms-per-fire-device", type=float, default=2.0)
    p.add_argument("--concurrency", help="comma-separated levels (default 1,4,16; --quick 1,4)")
    p.add_argument("--requests", type=int, help="requests per operation, level and round (default 200; --quick 30)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every level and operation")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per operation before the rounds")
    p.add_argument("--pg-admin-url", default=os.environ.get("IOTJX_BENCH_PG_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--reuse", metavar="DBNAME",
                   help="use this database when a previous run built it (else build it under this name); kept")
    p.add_argument("--keep-db", action="store_true", help="keep the database built (its name is printed)")
    p.add_argument("--json", type=Path)
    p.add_argument("--figures", action="store_true",
                   help="time every figure route (JSON and CSV) instead of the five operations: viewer and "
                        "city-scoped key, concurrency 1, a day / a week / 30 days where allowed")
    p.add_argument("--figure-requests", type=int, default=4,
                   help="requests per figure route, window and key kind (default 4)")
    a = p.parse_args(argv)
    a.devices = a.devices or (5_000 if a.quick else 100_000)
    a.readings = a.readings or (500_000 if a.quick else 10_000_000)
    a.requests = a.requests or (30 if a.quick else 200)
    a.levels = [int(x) for x in (a.concurrency or ("1,4" if a.quick else "1,4,16")).split(",")]
    if any(c < 1 for c in a.levels) or a.requests < 1 or a.repeats < 1:
        p.error("concurrency levels, --requests and --repeats must be at least 1")
    return a


# --------------------------------------------------------------------------- the database

def fill_alarms(url: str, days: int, per_device: float) -> dict[str, float]:
    """Fire alarm and fault episodes of the fire devices (migration 9's fire_alarms), drawn by PostgreSQL."""
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(0.27)")
        conn.execute("SET synchronous_commit = off")
        # Episode k of a fire device: raised at a uniform time of the window, received 0-30 s later; 85 %
        # faults; 85 % cleared by the device's restore frame after 1 min-6 h, 70 % acknowledged 1-60 min
        # after raising; a random component of loop 1-8.
        conn.execute("""
            INSERT INTO fire_alarms (device_id, system_type, system_address, component_type, component_address,
                                     kind, raised_at, received_at, description, restored_at, restore_received_at,
                                     acked_at, acked_by, cleared_at, cleared_by, false_alarm, verdict_by, verdict_at)
            SELECT device_id, 1, 0, 40, loop * 1000 + comp, kind, raised, raised + interval '1 s' * floor(30 * r1),
                   CASE kind WHEN 'alarm' THEN 'smoke detector ' ELSE 'component ' END || loop || '-' || comp,
                   restored, restored + interval '5 s',
                   acked, CASE WHEN acked IS NOT NULL THEN 'operator' END,
                   restored, CASE WHEN restored IS NOT NULL THEN 'device' END,
                   verdict, CASE WHEN verdict IS NOT NULL THEN 'operator' END,
                   CASE WHEN verdict IS NOT NULL THEN acked END
            FROM (SELECT device_id, loop, comp, kind, raised, r1,
                         CASE WHEN r2 < 0.85 AND raised + restore_after < now() THEN raised + restore_after END AS restored,
                         CASE WHEN r3 < 0.7 THEN raised + interval '1 min' * (1 + 59 * r4) END AS acked,
                         CASE WHEN r3 < 0.7 AND kind = 'alarm' THEN r4 < 0.8 END AS verdict
                  FROM (SELECT d.device_id, 1 + floor(8 * random())::int AS loop, 1 + floor(200 * random())::int AS comp,
                               CASE WHEN random() < 0.15 THEN 'alarm' ELSE 'fault' END AS kind,
                               now() - make_interval(days => %(days)s) * random() AS raised,
                               interval '1 min' + interval '6 hours' * random() ^ 2 AS restore_after,
                               random() AS r1, random() AS r2, random() AS r3, random() AS r4
                        FROM devices d CROSS JOIN generate_series(1, %(n)s) k
                        WHERE d.pilot = 'fire' AND random() < %(p)s) e) a
            ON CONFLICT DO NOTHING""",
                     {"days": days, "n": max(1, int(np.ceil(per_device))),
                      "p": per_device / max(1, int(np.ceil(per_device)))})
        # update_alarms (which GET /alarms runs) reads fire_events from its watermark: nothing to read here.
        conn.execute("""INSERT INTO fire_alarm_progress (read_to) VALUES (now())
                        ON CONFLICT (one) DO UPDATE SET read_to = excluded.read_to""")
        conn.execute("VACUUM ANALYZE fire_alarms")
        n = conn.execute("SELECT count(*) FROM fire_alarms").fetchone()[0]
    return {"alarms_s": time.perf_counter() - t0, "alarms": n}


def built(admin_url: str, name: str) -> bool:
    """Whether database `name` exists and holds a finished build (alarms are its last step)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            return False
    try:
        with psycopg.connect(data.with_db(admin_url, name)) as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM fire_alarms) AND EXISTS (SELECT 1 FROM water_readings)"
                                ).fetchone()[0]
    except psycopg.Error:
        return False


def build(admin_url: str, name: str, args) -> dict[str, Any]:
    """read_latency.py's registry and readings, then the alarms; seconds per step."""
    url = data.create_database(admin_url, name)
    t0 = time.perf_counter()
    took: dict[str, Any] = {f"registry {k}": v for k, v in data.build_registry(url, args.devices).items()}
    took.update(read_latency.build_readings(url, args.days, args.readings))
    took.update(fill_alarms(url, args.days, args.alarms_per_fire_device))
    took["total_s"] = time.perf_counter() - t0
    return took


@dataclass
class World:
    """What the requests are drawn from."""

    cities: list[int]
    devices: list[tuple[str, str, int | None]]          # device_id, family, city
    sites: list[tuple[str, int]]                        # code, city
    first_day: datetime                                 # local midnights of the data's whole days
    last_day: datetime
    end: datetime                                       # the newest reading
    counts: dict[str, int]


def world(url: str) -> World:
    with psycopg.connect(url, autocommit=True) as conn:
        lo, hi = conn.execute("SELECT min(time), max(time) FROM water_readings").fetchone()
        devices = [(d, f, c) for d, f, c in conn.execute("""
            SELECT d.device_id, coalesce(m.family, m.pilot), s.city_code FROM devices d JOIN device_models m USING (model)
            LEFT JOIN sites s USING (site_id)
            WHERE (m.pilot = 'water' OR d.network IN ('nbiot', 'cat1')) AND d.status = 'active'
            ORDER BY d.device_id""")]
        sites = [(code, city) for code, city in conn.execute("""
            SELECT s.code, s.city_code FROM sites s
            WHERE EXISTS (SELECT 1 FROM devices d WHERE d.site_id = s.site_id AND d.pilot = 'water') ORDER BY s.code""")]
        counts = dict(zip(("devices", "sites", "water_readings", "radio_readings", "fire_alarms"), conn.execute("""
            SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM sites), (SELECT count(*) FROM water_readings),
                   (SELECT count(*) FROM radio_readings), (SELECT count(*) FROM fire_alarms)""").fetchone()))
    first = (lo.astimezone(TZ) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    last = (hi.astimezone(TZ) - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return World(list(data.CITY_CODES), devices, sites, first, max(first, last), hi, counts)


def make_keys(url: str, cities: list[int]) -> tuple[str, dict[int, str]]:
    """A viewer key for every city, and a viewer key scoped to each city."""
    from iotjx.apikeys import create_key
    with psycopg.connect(url) as conn:
        _, viewer = create_key(conn, "viewer", name="api latency benchmark", created_by="benchmarks/api_latency.py")
        scoped = {c: create_key(conn, "viewer", cities=[c], name=f"api latency benchmark {c}",
                                created_by="benchmarks/api_latency.py")[1] for c in cities}
        conn.commit()
    return viewer, scoped


# --------------------------------------------------------------------------- the API

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(url: str) -> tuple[subprocess.Popen, str]:
    """`python -m iotjx.cli api` on a free loopback port; returns the process and its base URL once it answers."""
    port = _free_port()
    env = {**os.environ, "IOTJX_DATABASE_URL": url, "IOTJX_API_BIND": f"127.0.0.1:{port}",
           "IOTJX_API_RATE_PER_S": "0", "IOTJX_ANALYTICS_INTERVAL_S": "0", "IOTJX_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "iotjx.cli", "api"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code < 500:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the API did not answer /health within 120 s")
        time.sleep(0.2)


def stop_api(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- requests

MAIN_FIELDS = {"water": "flow_m3,battery_low", "fire": "fire_alarm,fault", "traffic": "count_a,occupancy_pct",
               "parking": "occupied,battery_mv"}


def _iso(t: datetime) -> str:
    return t.isoformat()


class Requests:
    """Request i of an operation: (path, params, key), a different key each request."""

    def __init__(self, w: World, viewer: str, scoped: dict[int, str], cursors: dict[int, str], seed: int):
        self.w, self.viewer, self.scoped, self.cursors = w, viewer, scoped, cursors
        self.rng = random.Random(seed)

    def key(self, i: int, city: int | None) -> str:
        return self.viewer if i % 2 == 0 or city is None else self.scoped[city]

    def make(self, op: str, i: int) -> tuple[str, dict[str, str], str]:
        rng, w = self.rng, self.w
        if op == "coverage":
            city = rng.choice(w.cities)
            return "/coverage", ({} if i % 5 == 4 else {"city": str(city)}), self.key(i, city)
        if op == "device day":
            device, family, city = rng.choice(w.devices)
            days = max(0, (w.last_day - w.first_day).days)
            start = (w.first_day + timedelta(days=rng.randint(0, days))).replace(tzinfo=None).replace(tzinfo=TZ)
            fields = MAIN_FIELDS.get(family, "") + ",rsrp_dbm,sinr_db"
            return (f"/devices/{device}/telemetry",
                    {"from": _iso(start), "to": _iso(start + timedelta(days=1)), "interval": "1h" if i % 2 else "5m",
                     "fields": fields.strip(","), "agg": "avg"}, self.key(i, city))
        if op == "site month 1h":
            code, city = rng.choice(w.sites)
            end = w.end.astimezone(TZ).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            return (f"/sites/{code}/telemetry",
                    {"from": _iso(end - timedelta(days=30)), "to": _iso(end), "interval": "1h",
                     "fields": "battery_low,valve_closed", "agg": "sum"}, self.key(i, city))
        if op in ("alarms p1", "alarms p4"):
            city = rng.choice([c for c in w.cities if op == "alarms p1" or c in self.cursors])
            params = {"city": str(city), "limit": str(ALARM_PAGE)}
            if op == "alarms p4":
                params["cursor"] = self.cursors[city]
            return "/alarms", params, self.key(i, city)
        raise ValueError(op)


def page_cursors(base: str, viewer: str, cities: list[int], page: int = 4) -> dict[int, str]:
    """Per city, the cursor of `GET /alarms?city=C`'s page `page` (cities with fewer pages are left out)."""
    out = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {viewer}"}, timeout=120) as client:
        for city in cities:
            cursor = None
            for _ in range(page - 1):
                params = {"city": str(city), "limit": str(ALARM_PAGE), **({"cursor": cursor} if cursor else {})}
                r = client.get("/alarms", params=params)
                r.raise_for_status()
                cursor = r.json()["next_cursor"]
                if cursor is None:
                    break
            if cursor is not None:
                out[city] = cursor
    return out


async def run_level(base: str, reqs: Requests, op: str, n: int, concurrency: int) -> dict[str, Any]:
    """`n` requests of `op` from `concurrency` workers in a closed loop."""
    todo = [reqs.make(op, i) for i in range(n)]
    times: list[float] = []
    errors: dict[str, int] = {}
    sizes: list[int] = []
    it = iter(todo)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        async def worker() -> None:
            for path, params, key in it:
                t0 = time.perf_counter()
                try:
                    r = await client.get(path, params=params, headers={"Authorization": f"Bearer {key}"})
                    body = r.content
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                        if len(errors) == 1 and sum(errors.values()) == 1:
                            console.print(f"[red]{op}: {r.status_code} for {path} {params}: {body[:300]!r}")
                        continue
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                times.append(dt)
                sizes.append(len(body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"times": times, "errors": errors, "wall_s": wall, "n": n, "bytes_median": float(np.median(sizes)) if sizes else 0}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (pid None) or of `pid` (from /proc)."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / hz, sum(v[:8]) / hz


def pg_backends_cpu(url: str, dbname: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to the benchmark database (same machine)."""
    total = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                   (dbname,)):
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError):
                pass
    return total


def summarise(times: list[float]) -> dict[str, float]:
    if not times:
        return {"ok": 0}
    ms = np.array(times) * 1000
    return {"ok": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def measure(url: str, dbname: str, w: World, args) -> dict[str, Any]:
    viewer, scoped = make_keys(url, w.cities)
    proc, base = start_api(url)
    try:
        cursors = page_cursors(base, viewer, w.cities)
        reqs = Requests(w, viewer, scoped, cursors, seed=11)
        ops = [op for op in OPERATIONS if op != "alarms p4" or cursors]
        for op in ops:                                            # warm: pool, caches, the coverage report
            got = asyncio.run(run_level(base, reqs, op, args.warmup, 1))
            if got["errors"]:
                console.print(f"[yellow]warm-up of {op}: {got['errors']}")
        results: dict[str, dict[int, dict[str, Any]]] = {op: {c: {"times": [], "errors": {}, "rounds": []}
                                                              for c in args.levels} for op in ops}
        cpu0 = (cpu_seconds(), cpu_seconds(proc.pid), pg_backends_cpu(url, dbname), *machine_busy())
        load0, t_start = os.getloadavg(), time.time()
        for rnd in range(args.repeats):
            for c in args.levels:
                for op in ops:
                    got = asyncio.run(run_level(base, reqs, op, args.requests, c))
                    slot = results[op][c]
                    slot["times"] += got["times"]
                    for k, v in got["errors"].items():
                        slot["errors"][k] = slot["errors"].get(k, 0) + v
                    slot["rounds"].append({"rps": len(got["times"]) / got["wall_s"], "wall_s": got["wall_s"],
                                           "bytes_median": got["bytes_median"], **summarise(got["times"])})
                    r = slot["rounds"][-1]
                    console.print(f"round {rnd + 1} c={c:<3} {op:<14} p50 {r.get('p50_ms', float('nan')):7.1f} "
                                  f"p95 {r.get('p95_ms', float('nan')):7.1f} ms  {r['rps']:7.1f} req/s"
                                  + (f"  errors {got['errors']}" if got["errors"] else ""))
        cpu1 = (cpu_seconds(), cpu_seconds(proc.pid), pg_backends_cpu(url, dbname), *machine_busy())
        wall = time.time() - t_start
    finally:
        stop_api(proc)
    busy = cpu1[3] - cpu0[3]
    ours = {"client": cpu1[0] - cpu0[0], "api": cpu1[1] - cpu0[1], "postgres": cpu1[2] - cpu0[2]}
    conditions = {"wall_s": wall, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                  "cores_busy": busy / wall, **{f"{k}_cores": v / wall for k, v in ours.items()},
                  "others_cores": max(0.0, busy - sum(ours.values())) / wall,
                  "alarm_cursor_cities": len(cursors)}
    figures: dict[str, Any] = {}
    for op, levels in results.items():
        figures[op] = {}
        for c, slot in levels.items():
            s = summarise(slot["times"])
            rps = [r["rps"] for r in slot["rounds"]]
            figures[op][str(c)] = {**s, "requests": args.requests * args.repeats, "errors": slot["errors"],
                                   "rps_median": float(np.median(rps)), "rps_rounds": rps,
                                   "p95_rounds_ms": [r.get("p95_ms") for r in slot["rounds"]],
                                   "bytes_median": float(np.median([r["bytes_median"] for r in slot["rounds"]])),
                                   "pass": bool(s["ok"]) and not slot["errors"] and s["p95_ms"] < REQUIREMENT_MS}
    return {"figures": figures, "conditions": conditions}


def machine_info(admin_url: str) -> dict[str, Any]:
    import fastapi
    import uvicorn
    with psycopg.connect(admin_url) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        work_mem = conn.execute("SHOW work_mem").fetchone()[0]
    return {"python": platform.python_version(), "nproc": os.cpu_count(), "postgresql": server, "work_mem": work_mem,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "httpx": httpx.__version__,
            "at": datetime.now().astimezone().isoformat(timespec="seconds")}


def print_report(out: dict[str, Any], levels: list[int]) -> None:
    c = out["counts"]
    table = Table(title=f"API latency at {c['water_readings'] + c['radio_readings']:,} readings, {c['devices']:,} "
                        f"devices, {c['fire_alarms']:,} alarms (ms; pooled over {out['args']['repeats']} rounds "
                        f"of {out['args']['requests']} requests)")
    for col in ("operation", "conc.", "n", "p50", "p95", "p99", "max", "req/s", "p95 per round", "errors",
                f"p95 < {REQUIREMENT_MS:.0f} ms"):
        table.add_column(col, justify="left" if col in ("operation", "p95 per round") else "right")
    for op, per in out["figures"].items():
        for lvl in levels:
            m = per[str(lvl)]
            if not m["ok"]:
                table.add_row(op, str(lvl), "0", "—", "—", "—", "—", "—", "—", json.dumps(m["errors"]), "FAIL")
                continue
            table.add_row(op, str(lvl), f"{m['ok']:,}", f"{m['p50_ms']:.1f}", f"{m['p95_ms']:.1f}", f"{m['p99_ms']:.1f}",
                          f"{m['max_ms']:.0f}", f"{m['rps_median']:.0f}",
                          " / ".join(f"{x:.0f}" for x in m["p95_rounds_ms"] if x is not None),
                          str(sum(m["errors"].values())), "PASS" if m["pass"] else "FAIL")
    console.print(table)
    for op in out["figures"]:
        console.print(f"  {op:<14} {DESCRIBE[op]}")
    k = out["conditions"]
    console.print(f"conditions: {out['machine']['nproc']} CPUs, load {k['loadavg_start'][0]:.2f} → "
                  f"{k['loadavg_end'][0]:.2f}, over {k['wall_s']:.0f} s the machine was busy {k['cores_busy']:.2f} "
                  f"cores: client {k['client_cores']:.2f}, API {k['api_cores']:.2f}, PostgreSQL backends "
                  f"{k['postgres_cores']:.2f}, others {k['others_cores']:.2f}")
    # A closed loop of C clients at R requests/s sees C / R s a request (Little's law): past the machine's
    # throughput a higher level only queues, so the verdict is given per level, not pooled.
    for op, per in out["figures"].items():
        ok = [lvl for lvl in levels if per[str(lvl)]["pass"]]
        bad = [lvl for lvl in levels if not per[str(lvl)]["pass"]]
        console.print(f"{'PASS' if not bad else 'FAIL' if not ok else 'PART'}  {op}: p95 < {REQUIREMENT_MS:.0f} ms at "
                      f"concurrency {', '.join(map(str, ok)) or '—'}" + (f"; not at {', '.join(map(str, bad))}" if bad else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the API and drop the database on the way out
    name = args.reuse or f"iotjx_api_{os.getpid()}"
    keep = args.keep_db or args.reuse is not None
    took: dict[str, Any] = {}
    try:
        if args.reuse and built(args.pg_admin_url, name):
            console.print(f"reusing database {name}")
        else:
            took = build(args.pg_admin_url, name, args)
            console.print(f"built {name} in {took['total_s']:.0f} s: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in took.items() if isinstance(v, float) and k != "total_s"))
        url = data.with_db(args.pg_admin_url, name)
        w = world(url)
        if args.figures:
            import figure_routes
            measured = figure_routes.measure_figures(url, w, args, make_keys, start_api, stop_api)
        else:
            measured = measure(url, name, w, args)
    finally:
        if not keep:
            data.drop_database(args.pg_admin_url, name)
        else:
            console.print(f"database kept: {name} (--reuse {name})")
    out = {"machine": machine_info(args.pg_admin_url), "args": {k: str(v) for k, v in vars(args).items()},
           "counts": w.counts, "build_s": took, "database": name, **measured}
    out["args"].update(repeats=args.repeats, requests=args.requests)
    if args.figures:
        import figure_routes
        figure_routes.print_figures(out, console)
    else:
        print_report(out, args.levels)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
