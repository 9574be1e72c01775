"""`api_latency.py --figures`: every figure route (api/routes/water.py, fire.py, traffic.py, radio.py, health.py,
reports.py) and its CSV twin, timed at concurrency 1 with a viewer key (every city, no `city`) and a city-scoped
viewer key (its one city), over the windows the route allows (a day, a week, 30 days), `--figure-requests`
requests each; the paginated lists also at their third page (a cursor collected before the timing).

Per route, window and key: p50 / p95 (ms), the median answer size (bytes) and rows (JSON: the list's or page's
items, the report's groups; CSV: lines less the header).  A route whose answers all had no rows is listed as
"no data" (the build stores no traffic, parking or fire frames, no night flows or water alerts).  Nothing is
asserted; any status but 200 is counted as an error."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import psycopg

TZ = ZoneInfo("Asia/Shanghai")
SLOW_MS = 1000.0


@dataclass
class Route:
    name: str                                   # the path as in the route table
    windows: tuple[int | None, ...] = (None,)   # days (None: the route takes no window)
    paged: bool = False
    params: Callable[["Ctx", int | None, int | None], tuple[str, dict[str, str]]] | None = None
    scoped_only_city: bool = False              # the request names one object (its city's key is used)


@dataclass
class Ctx:
    end: datetime                               # an hour edge after the newest reading (aware)
    last_day: datetime                          # the local midnight after the data's last whole day
    sites: list[tuple[str, int]]
    detectors: list[tuple[str, int]]
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    def span(self, days: int) -> dict[str, str]:
        return {"from": (self.end - timedelta(days=days)).isoformat(), "to": self.end.isoformat()}

    def day_span(self, days: int) -> dict[str, str]:
        return {"from": (self.last_day - timedelta(days=days)).date().isoformat(), "to": self.last_day.date().isoformat()}


def _plain(path: str) -> Callable:
    return lambda ctx, days, city: (path, {})


def _span(path: str) -> Callable:
    return lambda ctx, days, city: (path, ctx.span(days))


def _days(path: str) -> Callable:
    return lambda ctx, days, city: (path, ctx.day_span(days))


def _site_nights(suffix: str) -> Callable:
    def make(ctx: Ctx, days, city):
        code = ctx.rng.choice([s for s, c in ctx.sites if city is None or c == city] or [s for s, _ in ctx.sites])
        return f"/water/sites/{code}/nights{suffix}", ctx.day_span(days)
    return make


def _flow(suffix: str, one: bool) -> Callable:
    def make(ctx: Ctx, days, city):
        p = {**ctx.span(days), "interval": "15m"}
        if one and ctx.detectors:
            p["device"] = ctx.rng.choice([d for d, c in ctx.detectors if city is None or c == city]
                                         or [d for d, _ in ctx.detectors])
        return "/traffic/flow" + suffix, p
    return make


ROUTES: tuple[Route, ...] = (
    Route("/water/consumption", (1, 7, 30), params=_days("/water/consumption")),
    Route("/water/consumption.csv", (1, 7, 30), params=_days("/water/consumption.csv")),
    Route("/water/consumption/districts", (1, 7, 30), params=_days("/water/consumption/districts")),
    Route("/water/consumption/districts.csv", (1, 7, 30), params=_days("/water/consumption/districts.csv")),
    Route("/water/nights", params=lambda ctx, d, c: ("/water/nights", {"day": (ctx.last_day - timedelta(days=1))
                                                                       .date().isoformat(), "limit": "100"})),
    Route("/water/sites/{site_id}/nights", (7, 30), params=_site_nights(""), scoped_only_city=True),
    Route("/water/sites/{site_id}/nights.csv", (7, 30), params=_site_nights(".csv"), scoped_only_city=True),
    Route("/water/silent-meters", paged=True, params=_plain("/water/silent-meters")),
    Route("/water/silent-meters.csv", params=_plain("/water/silent-meters.csv")),
    Route("/water/stopped-meters", paged=True, params=_plain("/water/stopped-meters")),
    Route("/water/stopped-meters.csv", params=_plain("/water/stopped-meters.csv")),
    Route("/fire/offline", paged=True, params=_plain("/fire/offline")),
    Route("/fire/offline.csv", params=_plain("/fire/offline.csv")),
    Route("/traffic/flow", (1,), paged=True, params=_flow("", False)),
    Route("/traffic/flow.csv", (1,), params=_flow(".csv", False)),
    Route("/traffic/flow?device", (7, 30), paged=True, params=_flow("", True), scoped_only_city=True),
    Route("/traffic/parking", (1, 7, 30), paged=True, params=_span("/traffic/parking")),
    Route("/traffic/parking.csv", (1, 7, 30), params=_span("/traffic/parking.csv")),
    Route("/radio/summary", (1, 7, 30), params=lambda ctx, d, c: ("/radio/summary",
                                                                  {"from": ctx.span(d)["from"]})),
    Route("/radio/summary.csv", (1, 7, 30), params=lambda ctx, d, c: ("/radio/summary.csv",
                                                                      {"from": ctx.span(d)["from"]})),
    Route("/radio/report", (1, 7, 30), params=_span("/radio/report")),
    Route("/radio/weak.csv", (1, 7, 30), params=_span("/radio/weak.csv")),
    Route("/health/report", params=_plain("/health/report")),
    Route("/health/online.csv", params=_plain("/health/online.csv")),
    Route("/health/uplink-success", (1, 7, 30), paged=True, params=_span("/health/uplink-success")),
    Route("/health/uplink-success.csv", (1, 7, 30), params=_span("/health/uplink-success.csv")),
    Route("/reports/coverage", params=_plain("/reports/coverage")),
)


def rows_of(path: str, r: httpx.Response) -> int:
    if ".csv" in path:
        return max(0, r.content.count(b"\n") - 1)
    if path.startswith("/reports/"):
        return r.content.count(b"<tr")
    body = r.json()
    if isinstance(body, list):
        return len(body)
    for k in ("items", "groups"):
        if k in body:
            return len(body[k]) + len(body.get("weak", []))
    return len(body.get("online", [])) + len(body.get("silent", [])) + len(body.get("low_batteries", []))


def context(url: str, w) -> Ctx:
    with psycopg.connect(url, autocommit=True) as conn:
        detectors = conn.execute("""
            SELECT d.device_id, s.city_code FROM devices d JOIN sites s USING (site_id)
            WHERE d.pilot = 'traffic' AND d.model IN (SELECT model FROM device_models WHERE family = 'traffic')
            ORDER BY d.device_id""").fetchall()
    end = w.end.astimezone(TZ).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    last = w.last_day.replace(tzinfo=None).replace(tzinfo=TZ) + timedelta(days=1)
    return Ctx(end=end, last_day=last, sites=w.sites, detectors=detectors)


def measure_figures(url: str, w, args, make_keys, start_api, stop_api) -> dict[str, Any]:
    viewer, scoped = make_keys(url, w.cities)
    ctx = context(url, w)
    proc, base = start_api(url)
    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(900.0)) as client:
            def get(path, params, key):
                t0 = time.perf_counter()
                r = client.get(path, params=params, headers={"Authorization": f"Bearer {key}"})
                body = r.content
                return time.perf_counter() - t0, r, body

            for route in ROUTES:
                for days in route.windows:
                    for kind in ("viewer", "city"):
                        pages = ("p1", "p3") if route.paged else ("",)
                        for pg in pages:
                            times, sizes, rows, errors = [], [], [], {}
                            for i in range(args.figure_requests):
                                city = None if kind == "viewer" else ctx.rng.choice(w.cities)
                                key = viewer if city is None else scoped[city]
                                path, params = route.params(ctx, days, city)
                                if pg == "p3":                # two untimed pages to get the third's cursor
                                    cur = None
                                    for _ in range(2):
                                        _, r, _ = get(path, {**params, **({"cursor": cur} if cur else {})}, key)
                                        cur = r.json().get("next_cursor") if r.status_code == 200 else None
                                        if cur is None:
                                            break
                                    if cur is None:
                                        continue
                                    params = {**params, "cursor": cur}
                                dt, r, body = get(path, params, key)
                                if r.status_code != 200:
                                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                                    if sum(errors.values()) == 1:
                                        print(f"{route.name} {params}: {r.status_code} {body[:200]!r}")
                                    continue
                                times.append(dt * 1000)
                                sizes.append(len(body))
                                rows.append(rows_of(path, r))
                            res = {"route": route.name + (f" {pg}" if pg else ""), "days": days, "key": kind,
                                   "n": len(times), "errors": errors}
                            if times:
                                ms = np.array(times)
                                res.update(p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
                                           max_ms=float(ms.max()), bytes_median=float(np.median(sizes)),
                                           rows_median=float(np.median(rows)), rows_max=int(max(rows)))
                            results.append(res)
                            print(f"{res['route']:<40} {str(days or ''):>3} {kind:<6} "
                                  + (f"p50 {res['p50_ms']:8.1f} p95 {res['p95_ms']:8.1f} ms "
                                     f"{res['bytes_median']:>10,.0f} B {res['rows_median']:>8,.0f} rows"
                                     if times else "no answer") + (f" errors {errors}" if errors else ""), flush=True)
    finally:
        stop_api(proc)
    return {"figure_routes": results, "conditions": {"wall_s": time.perf_counter() - t_all}}


def print_figures(out: dict[str, Any], console) -> None:
    from rich.table import Table
    c = out["counts"]
    table = Table(title=f"Figure routes at {c['water_readings'] + c['radio_readings']:,} readings, "
                        f"{c['devices']:,} devices (ms, concurrency 1, {out['args']['figure_requests']} requests each)")
    for col in ("route", "days", "key", "n", "p50", "p95", "bytes", "rows", "errors", "note"):
        table.add_column(col, justify="left" if col in ("route", "key", "note") else "right")
    for r in out["figure_routes"]:
        if not r["n"]:
            table.add_row(r["route"], str(r["days"] or ""), r["key"], "0", "—", "—", "—", "—",
                          str(sum(r["errors"].values())), "no answer")
            continue
        note = "no data" if r["rows_max"] == 0 else ""
        if r["p95_ms"] > SLOW_MS:
            note = (note + " SLOW").strip()
        table.add_row(r["route"], str(r["days"] or ""), r["key"], str(r["n"]), f"{r['p50_ms']:.0f}",
                      f"{r['p95_ms']:.0f}", f"{r['bytes_median']:,.0f}", f"{r['rows_median']:,.0f}",
                      str(sum(r["errors"].values())), note)
    console.print(table)
    empty = sorted({r["route"] for r in out["figure_routes"] if r["n"] and r["rows_max"] == 0})
    slow = sorted({r["route"] for r in out["figure_routes"] if r["n"] and r["p95_ms"] > SLOW_MS})
    console.print("no data: " + (", ".join(empty) or "—"))
    console.print(f"p95 > {SLOW_MS:.0f} ms: " + (", ".join(slow) or "—"))
