"""The API latency benchmark, run tiny: it builds its database (with alarms), starts the real API, drives
every operation at two concurrency levels with no error, its report names every operation, and it drops
what it built.  No timing is asserted (speed lives in benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ("coverage", "device day", "site month 1h", "alarms p1", "alarms p4")


def test_a_tiny_run_measures_every_operation(pg_admin_url, tmp_path):
    out = tmp_path / "figures.json"
    # 800 devices (~190 fire devices) × 40 alarms each: over 300 alarms per city, so a fourth page exists.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "api_latency.py"), "--devices", "800", "--readings", "40000",
           "--alarms-per-fire-device", "40", "--requests", "4", "--concurrency", "1,2", "--repeats", "1",
           "--warmup", "1", "--pg-admin-url", pg_admin_url, "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["figures"]) == set(OPERATIONS)
    for op, levels in report["figures"].items():
        assert set(levels) == {"1", "2"}, op
        for m in levels.values():
            assert m["errors"] == {} and m["ok"] == m["requests"] == 4, (op, m)
            assert 0 < m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"] <= m["max_ms"] and m["rps_median"] > 0, (op, m)
            assert m["bytes_median"] > 0, op
    assert report["conditions"]["alarm_cursor_cities"] >= 1      # cities whose list has a fourth page
    counts = report["counts"]
    assert counts["devices"] == 800 and 35_000 < counts["water_readings"] + counts["radio_readings"] < 45_000
    assert counts["fire_alarms"] > 11 * 300
    for op in OPERATIONS:
        assert op in done.stdout
    # a verdict per operation and level in the table, and one line per operation
    assert sum(done.stdout.count(word) for word in ("PASS", "FAIL", "PART")) >= len(OPERATIONS) * 3
    with psycopg.connect(pg_admin_url) as conn:         # the benchmark drops what it built
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                            (report["database"],)).fetchone()[0] == 0


def test_a_tiny_figures_run_answers_every_figure_route(pg_admin_url, tmp_path):
    """`--figures`: every figure route of the route table (JSON and CSV) is driven with both keys and
    answered 200 (no timing asserted); the routes with no data in the build are named."""
    from api.routes import fire, health, radio, reports, traffic, water

    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "api_latency.py"), "--figures", "--devices", "600",
           "--readings", "30000", "--days", "8", "--figure-requests", "1", "--pg-admin-url", pg_admin_url,
           "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["figure_routes"]
    for r in rows:
        assert r["errors"] == {}, r
        assert r["n"] == 1 or r["route"].endswith(" p3"), r      # a third page exists only for long lists
    timed = {r["route"].removesuffix(" p1").removesuffix(" p3").split("?")[0] for r in rows if r["n"]}
    figure_paths = {route.path for module in (water, fire, traffic, radio, health, reports)
                    for route in module.router.routes}
    assert len(figure_paths) >= 26
    assert figure_paths <= timed, figure_paths - timed
    assert {r["key"] for r in rows} == {"viewer", "city"}
    assert "no data:" in done.stdout and "p95 > 1000 ms:" in done.stdout
