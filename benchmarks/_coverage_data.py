"""The coverage benchmark's world: a database of N devices built in SQL, its snapshot history, and
the targets catalogues (16 and 100 targets) in the catalogue's TOML format.

Everything random is drawn by PostgreSQL after `setseed`, so a scale builds the same registry each
time.  Roughly: one catalogue site per 100 devices spread over the 11 cities (skewed: a few big
sites, many small), devices of the bundled models with each model's own pilot and network, 2 %
inactive and 1 % retired, 3 % on no site, 3 % never heard from, and `last_seen` drawn so that
about 70 % of the rest are within 1.5 × their reporting interval of now (live)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

# Bundled models and their share of the fleet (percent): water 50, fire 24, traffic 10, parking 16.
MODEL_WEIGHTS = {
    "cjt188-nb-water-std": 20, "ctwing-cjt188-water": 10, "onenet-cjt188-water": 8,
    "cjt188-nb-water-msb-status": 6, "lwm2m-3424-water-senml-cbor": 4, "lwm2m-3424-water-senml-json": 2,
    "gb26875-nb-smoke": 10, "ctwing-lian-smoke": 6, "onenet-gb26875-uitd": 3, "gb26875-uitd": 3,
    "gb26875-uitd-fscn8001": 2, "gbt43229-detector": 5, "gbt43229-detector-be": 2,
    "cat1-json-traffic-counter": 3, "nb-parking-sensor": 10, "cat1-json-parking": 6,
}
# Catalogue site kinds and their share of the sites (percent).
SITE_WEIGHTS = {"residential": 30, "community": 15, "building": 12, "intersection": 10, "parking_lot": 8,
                "campus": 6, "farm": 6, "scenic_spot": 5, "dev_zone": 5, "museum": 3}
CITY_CODES = (360100, 360200, 360300, 360400, 360500, 360600, 360700, 360800, 360900, 361000, 361100)
HISTORY_DAYS = 60


@dataclass(frozen=True, slots=True)
class BuiltDatabase:
    """A benchmark database and what building it took."""

    url: str
    name: str
    devices: int
    sites: int
    live: int
    build_s: dict[str, float]
    snapshot: dict[str, Any]


def with_db(url: str, name: str) -> str:
    """`url` pointing at database `name`."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    return make_conninfo(**{**conninfo_to_dict(url), "dbname": name})


def create_database(admin_url: str, name: str) -> str:
    """A fresh database `name` (dropped first if a previous run left it); its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_db(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _weighted_array(weights: dict[str, int]) -> list[str]:
    return [name for name, w in weights.items() for _ in range(w)]


def build_registry(url: str, devices: int, seed: float = 0.42) -> dict[str, float]:
    """Migrate, sync the models, then sites, devices and device_state in SQL; seconds per step."""
    from iotjx.db.migrations import upgrade
    from iotjx.devices import sync_models

    took: dict[str, float] = {}
    t0 = time.perf_counter()
    upgrade(url)
    with psycopg.connect(url) as conn:
        sync_models(conn)
        conn.commit()
    took["migrate"] = time.perf_counter() - t0
    n_sites = max(60, devices // 100)
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SELECT setseed(%s)", (seed,))
        known = {r[0] for r in conn.execute("SELECT model FROM device_models")}
        models = [m for m in _weighted_array(MODEL_WEIGHTS) if m in known]
        kinds = _weighted_array(SITE_WEIGHTS)
        t0 = time.perf_counter()
        # Site i: kind by weight, city i mod 11; grades for scenic spots, a model community in 8,
        # a model development zone in 5.
        conn.execute("""
            INSERT INTO sites (site_id, code, city_code, kind, name, grade, model_site)
            SELECT i, 'BENCH-' || lpad(i::text, 7, '0'), (%(cities)s::int[])[1 + i %% 11], k,
                   k || ' ' || i,
                   CASE WHEN k = 'scenic_spot' THEN (ARRAY['3A', '3A', '4A', '4A', '5A'])[1 + i %% 5] END,
                   (k = 'community' AND i %% 8 = 0) OR (k = 'dev_zone' AND i %% 5 = 0)
            FROM (SELECT i, (%(kinds)s::text[])[1 + floor(random() * %(nk)s)::int] AS k
                  FROM generate_series(1, %(n)s) i) s""",
                     {"cities": list(CITY_CODES), "kinds": kinds, "nk": len(kinds), "n": n_sites})
        conn.execute("SELECT setval(pg_get_serial_sequence('sites', 'site_id'), %s)", (n_sites,))
        took["sites"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # A skewed site size (random()^2: low site ids get most devices), 3 % on no site.
        conn.execute("""
            INSERT INTO devices (device_id, model, pilot, network, site_id, installed_at, status)
            SELECT 'bench' || lpad(d.i::text, 8, '0'), d.model, m.pilot, coalesce(m.network, 'nbiot'),
                   CASE WHEN d.r_site < 0.03 THEN NULL ELSE 1 + floor(%(ns)s * d.r_where ^ 2)::bigint END,
                   now() - interval '400 days' * d.r_when,
                   CASE WHEN d.r_status < 0.02 THEN 'inactive' WHEN d.r_status < 0.03 THEN 'retired'
                        ELSE 'active' END
            FROM (SELECT i, (%(models)s::text[])[1 + floor(random() * %(nm)s)::int] AS model,
                         random() AS r_site, random() AS r_where, random() AS r_when, random() AS r_status
                  FROM generate_series(1, %(n)s) i) d
            JOIN device_models m USING (model)""",
                     {"models": models, "nm": len(models), "ns": n_sites, "n": devices})
        took["devices"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # 97 % heard from; of those 70 % within 1.4 × their interval of now, the rest 1.6-10 × ago.
        conn.execute("""
            INSERT INTO device_state (device_id, first_seen, last_seen, uplinks)
            SELECT device_id, ls - interval '30 days', ls, 1 + floor(random() * 500)::bigint
            FROM (SELECT d.device_id,
                         now() - make_interval(secs => m.reporting_interval_s *
                             CASE WHEN random() < 0.7 THEN 1.4 * random() ELSE 1.6 + 8.4 * random() END) AS ls
                  FROM devices d JOIN device_models m USING (model)
                  WHERE random() >= 0.03) s""")
        took["device_state"] = time.perf_counter() - t0
        conn.commit()
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE sites")
        conn.execute("VACUUM ANALYZE devices")
        conn.execute("VACUUM ANALYZE device_state")
        conn.execute("VACUUM ANALYZE device_status_log")
    took["analyze"] = time.perf_counter() - t0
    return took


def live_count(url: str, live_factor: float = 1.5) -> tuple[int, int]:
    """(live devices, registered devices not retired) by the README's definition, in plain SQL."""
    with psycopg.connect(url) as conn:
        return conn.execute("""
            SELECT count(*) FILTER (WHERE d.status = 'active' AND st.last_seen >= now() - make_interval(
                       secs => %s * coalesce(d.reporting_interval_s, m.reporting_interval_s))),
                   count(*) FILTER (WHERE d.status <> 'retired')
            FROM devices d JOIN device_models m USING (model) LEFT JOIN device_state st USING (device_id)""",
                            (live_factor,)).fetchone()


def _yesterday(tz_name: str) -> date:
    from zoneinfo import ZoneInfo
    return datetime.now(ZoneInfo(tz_name)).date() - timedelta(days=1)


def build_history(url: str, targets_file: Path, tz_name: str = "Asia/Shanghai") -> dict[str, Any]:
    """60 days of coverage snapshots ending yesterday (local): one real snapshot of yesterday
    (`analytics.coverage.take_snapshot`, timed), the 59 days before it copied from it in SQL."""
    from analytics.coverage import take_snapshot
    from iotjx.settings import Settings
    from iotjx.targets import load_catalogue

    yesterday = _yesterday(tz_name)
    settings = Settings(database_url=url, targets_file=targets_file, timezone=tz_name)
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        take_snapshot(conn, yesterday, load_catalogue(targets_file), settings)
        conn.commit()
        took = time.perf_counter() - t0
        _copy_back(conn, yesterday, HISTORY_DAYS - 1)
        conn.commit()
        rows = conn.execute("SELECT count(*) FROM coverage_snapshots").fetchone()[0]
        breakdown = conn.execute("SELECT count(*) FROM coverage_breakdown_daily").fetchone()[0]
    return {"days": HISTORY_DAYS, "last_day": yesterday.isoformat(), "take_snapshot_s": took,
            "snapshot_rows": rows, "breakdown_rows": breakdown}


def _copy_back(conn: psycopg.Connection, day: date, days: int) -> None:
    """Days day-1 … day-`days` as copies of `day`, values shrinking 0.4 % a day back."""
    conn.execute("""
        INSERT INTO coverage_snapshot_days (day, state_at, taken_at, how, devices, duration_s)
        SELECT day - k, state_at - make_interval(days => k), taken_at - make_interval(days => k), 'filled',
               devices, duration_s
        FROM coverage_snapshot_days, generate_series(1, %(n)s) k WHERE day = %(day)s""", {"day": day, "n": days})
    conn.execute("""
        INSERT INTO coverage_snapshots (day, target_id, value, target_value, registered, active, live, sites,
                                        sites_meeting)
        SELECT day - k, target_id, value * (1 - 0.004 * k), target_value, registered, active,
               (live * (1 - 0.004 * k))::bigint, sites, (sites_meeting * (1 - 0.004 * k))::bigint
        FROM coverage_snapshots, generate_series(1, %(n)s) k WHERE day = %(day)s""", {"day": day, "n": days})
    conn.execute("""
        INSERT INTO coverage_breakdown_daily (day, city_code, pilot, network, registered, active, live)
        SELECT day - k, city_code, pilot, network, registered, active, (live * (1 - 0.004 * k))::bigint
        FROM coverage_breakdown_daily, generate_series(1, %(n)s) k WHERE day = %(day)s""", {"day": day, "n": days})


def build(admin_url: str, name: str, devices: int, targets_file: Path) -> BuiltDatabase:
    """The whole world of one scale: database, registry, snapshot history."""
    url = create_database(admin_url, name)
    took = build_registry(url, devices)
    t0 = time.perf_counter()
    snapshot = build_history(url, targets_file)
    took["history"] = time.perf_counter() - t0
    live, _registered = live_count(url)
    with psycopg.connect(url) as conn:
        sites = conn.execute("SELECT count(*) FROM sites").fetchone()[0]
    return BuiltDatabase(url=url, name=name, devices=devices, sites=sites, live=live, build_s=took,
                         snapshot=snapshot)


# --------------------------------------------------------------------------- targets catalogues

_PLAN_DEVICE = [
    {"id": "tourism-smart-parking", "value": 100, "unit": "percent",
     "measure": {"kind": "site_share", "sites": [{"kind": "scenic_spot", "min_grade": "4A"}, {"kind": "museum"}],
                 "devices": {"family": ["parking"]}, "min_live": 1}},
    {"id": "smart-community-models", "value": 15, "unit": "sites",
     "measure": {"kind": "sites_meeting", "sites": [{"kind": "community", "model_site": True}],
                 "devices": {"family": ["water", "fire"]}, "min_live": 1, "min_live_share": 80}},
    {"id": "agri-iot-zones", "value": 200, "unit": "sites",
     "measure": {"kind": "sites_meeting", "sites": [{"kind": "farm"}], "devices": {"family": ["water"]},
                 "min_live": 1}},
    {"id": "digital-dev-zones", "value": 20, "unit": "sites",
     "measure": {"kind": "sites_meeting", "sites": [{"kind": "dev_zone", "model_site": True}],
                 "devices": {"family": ["water", "fire", "traffic", "parking"]}, "min_live": 1}},
    {"id": "smart-campus", "value": 100, "unit": "percent",
     "measure": {"kind": "site_share", "sites": [{"kind": "campus"}], "devices": {"family": ["water", "fire"]},
                 "min_live": 2, "min_live_share": 80}},
]
_PLAN_OPERATOR = [("5g-base-stations", 40000, "base stations"), ("5g-benchmarks", 30, "benchmarks"),
                  ("industrial-internet-retrofits", 30, "enterprises"), ("miot-revenue", 1500, "100 million yuan"),
                  ("miot-firms", 100, "firms")]
_PROGRAMME = [("yingtan-water-nbiot", 360600, 50000, ["water"], "nbiot"),
              ("nanchang-water-nbiot", 360100, 80000, ["water"], "nbiot"),
              ("nanchang-traffic-detectors-cat1", 360100, 2000, ["traffic"], "cat1"),
              ("nanchang-parking-sensors", 360100, 5000, ["parking"], None),
              ("yingtan-fire-nbiot", 360600, 20000, ["fire"], "nbiot"),
              ("province-water-nbiot", None, 500000, ["water"], "nbiot")]     # the bundled 17 less province-fire
_CELLS = (("water", "nbiot"), ("fire", "nbiot"), ("fire", "cat1"), ("traffic", "cat1"), ("parking", "nbiot"),
          ("parking", "cat1"))
_SITE_VARIANTS = (  # kind criteria, families, min_live, min_live_share
    ([{"kind": "campus"}], ["water", "fire"], 3, 50), ([{"kind": "community"}], ["water"], 2, None),
    ([{"kind": "community", "model_site": True}], ["fire"], 1, 90), ([{"kind": "scenic_spot", "grades": ["5A"]}],
                                                                      ["parking"], 2, None),
    ([{"kind": "scenic_spot", "min_grade": "3A"}], ["parking", "traffic"], 1, 60), ([{"kind": "museum"}],
                                                                                      ["fire"], 2, 80),
    ([{"kind": "farm"}], ["water"], 5, None), ([{"kind": "dev_zone"}], ["water", "fire", "traffic"], 4, 70),
    ([{"kind": "residential"}], ["water", "fire"], 10, None), ([{"kind": "building"}], ["fire"], 3, 90),
    ([{"kind": "intersection"}], ["traffic"], 1, None), ([{"kind": "parking_lot"}], ["parking"], 5, 75),
)


def catalogue_entries(count: int) -> list[tuple[str, dict[str, Any]]]:
    """(section, entry) of a catalogue of exactly `count` targets (16 or more): the bundled
    catalogue's device-measured and operator targets less one programme target, then generated
    programme targets (city × family × network) and site targets (varying min_live / min_live_share)."""
    deadline = date(2022, 12, 31)
    entries: list[tuple[str, dict[str, Any]]] = []
    for e in _PLAN_DEVICE:
        entries.append(("plan", {**e, "deadline": deadline}))
    for tid, value, unit in _PLAN_OPERATOR:
        entries.append(("plan", {"id": tid, "value": value, "unit": unit, "deadline": deadline,
                                 "measure": {"kind": "operator"}}))
    for tid, city, value, family, network in _PROGRAMME:
        devices = {"family": family, **({"network": network} if network else {})}
        entries.append(("programme", {"id": tid, **({"city": city} if city else {}), "value": value,
                                      "deadline": date(2026, 12, 31),
                                      "measure": {"kind": "live_devices", "devices": devices}}))
    if count < len(entries):
        raise ValueError(f"a catalogue has at least {len(entries)} targets here, not {count}")
    generated: list[tuple[str, dict[str, Any]]] = []
    for n, city in enumerate(CITY_CODES):
        for family, network in _CELLS:
            generated.append(("programme", {
                "id": f"gen-{city}-{family}-{network}", "city": city, "value": 1000 * (1 + (n + len(family)) % 7),
                "deadline": date(2027, 12, 31),
                "measure": {"kind": "live_devices", "devices": {"family": [family], "network": network}}}))
    remaining = count - len(entries)
    n_sites = max(remaining - len(generated), remaining // 5)
    sites: list[tuple[str, dict[str, Any]]] = []
    for n in range(n_sites):
        criteria, families, min_live, share = _SITE_VARIANTS[n % len(_SITE_VARIANTS)]
        city = None if n < len(_SITE_VARIANTS) else CITY_CODES[n % len(CITY_CODES)]
        measure: dict[str, Any] = {"kind": "site_share" if n % 2 else "sites_meeting", "sites": criteria,
                                   "devices": {"family": families}, "min_live": min_live}
        if share is not None:
            measure["min_live_share"] = share
        sites.append(("programme", {"id": f"gen-site-{n:02d}", **({"city": city} if city else {}),
                                    "value": 100 if n % 2 else 50, "unit": "percent" if n % 2 else "sites",
                                    "deadline": date(2027, 12, 31), "measure": measure}))
    return entries + generated[:remaining - n_sites] + sites


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, date)):
        return v.isoformat() if isinstance(v, date) else repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def write_catalogue(path: Path, count: int) -> Path:
    """A targets catalogue of `count` targets in the catalogue's TOML format (iotjx/targets/catalogue.toml)."""
    lines = [f"# iotjx coverage benchmark: {count} targets (benchmarks/_coverage_data.py)", ""]
    for section, entry in catalogue_entries(count):
        lines.append(f"[[{section}]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
