"""Memory phases of the ingest benchmark: the gateway's RSS over a long run at full rate, while the
database is away (the spool should take the load, not RAM), and with a registry of 1M devices."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psycopg

from _phases import Bench, run_gateway


def rss_profile(result: dict) -> dict:
    """Gateway RSS at 10 / 50 / 90 % of the run, its sampled maximum and the kernel's VmHWM (MiB)."""
    series = result.pop("series", {}).get("gateway", [])
    out = {"hwm_mb": result["hwm_mb"].get("gateway", 0.0), "rss_max_mb": result["rss_mb"].get("gateway", 0.0)}
    if series:
        end = series[-1][0]
        for share in (0.1, 0.5, 0.9):
            out[f"rss_at_{int(share * 100)}pct_mb"] = next(r for t, r in series if t >= share * end) / 2**20
    return out


def run_memory(bench: Bench, duration_s: float, rate: float) -> dict:
    """Publish at `rate` for `duration_s` (no publish times kept), then drain; RSS as it goes."""
    result = run_gateway(bench, duration_s=duration_s, rate=rate, keep_times=False, keep_series=True)
    return {"duration_s": duration_s, "offered_rate": rate, "rate": result["rate"], "messages": result["messages"],
            "rows": result["rows"], **rss_profile(result), "cores": result["cores"]}


def spool_setting() -> str | None:
    """The Settings field naming the spool directory, when the gateway has a spool."""
    import importlib.util

    from iotjx.settings import Settings
    if importlib.util.find_spec("ingest.spool") is None:
        return None
    names = [n for n in Settings.model_fields if "spool" in n and (n.endswith("_dir") or n.endswith("_path"))]
    return names[0] if names else None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_outage(bench: Bench, duration_s: float, rate: float, outage_s: float) -> dict:
    """The database refuses connections for `outage_s` in the middle of a run at `rate`: peak RSS of
    the gateway meanwhile, the spool's largest size, and every uplink stored once it is back."""
    field = spool_setting()
    spool_dir = bench.workdir / f"spool-{time.time_ns()}"
    db, admin = bench.db, bench.db.admin_url

    def outage(sampler) -> dict:
        time.sleep(max(1.0, (duration_s - outage_s) / 2))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS false')
            conn.execute("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                            WHERE datname = %s AND application_name LIKE 'iotjx%%'""", (db.name,))
        t_cut, largest = time.time(), 0
        rss_before = sampler.series.get("gateway", [(0, 0)])[-1][1]
        while time.time() - t_cut < outage_s:
            largest = max(largest, _dir_size(spool_dir))
            time.sleep(1.0)
        rss_end_of_outage = sampler.series.get("gateway", [(0, 0)])[-1][1]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS true')
        return {"spool_max_mb": largest / 2**20, "rss_before_outage_mb": rss_before / 2**20,
                "rss_end_of_outage_mb": rss_end_of_outage / 2**20}

    try:
        result = run_gateway(bench, duration_s=duration_s, rate=rate, keep_times=False, keep_series=True,
                             extra_env={f"IOTJX_{field.upper()}": str(spool_dir)}, during=outage)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS true')
        shutil.rmtree(spool_dir, ignore_errors=True)
    return {"duration_s": duration_s, "outage_s": outage_s, "offered_rate": rate, "messages": result["messages"],
            "rows": result["rows"], "duplicates": result["duplicates"], "spool_max_mb": result["spool_max_mb"],
            "rss_before_outage_mb": result["rss_before_outage_mb"],
            "rss_end_of_outage_mb": result["rss_end_of_outage_mb"], **rss_profile(result)}


def _registry_cache_max() -> int | None:
    """The gateway's bound on cached devices (IOTJX_REGISTRY_CACHE_MAX), when it has one."""
    from iotjx.settings import Settings
    return Settings().model_dump().get("registry_cache_max")


def run_registry(bench: Bench, registry_size: int, touched: int) -> dict:
    """Register devices by COPY up to `registry_size`, then one uplink from each of `touched` of them."""
    extra = [f"86{k:013d}" for k in range(registry_size - len(bench.device_ids))]
    registered = bench.db.scalar("SELECT count(*) FROM devices")
    copy_s = 0.0
    if registered < registry_size:
        copy_s = bench.db.register_bulk(extra, "cjt188-nb-water-std")
    ids = (extra + bench.device_ids)[:touched]
    result = run_gateway(bench, rounds=1, device_ids=ids, keep_times=False, keep_series=True)
    return {"registry": bench.db.scalar("SELECT count(*) FROM devices"), "register_copy_s": copy_s,
            "touched": len(ids), "registry_cache_max": _registry_cache_max(), "rate": result["rate"], "rows": result["rows"], **rss_profile(result),
            "cores": result["cores"]}
