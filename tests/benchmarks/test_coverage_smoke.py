"""The coverage benchmark, run tiny (`--quick`: 2,000 devices, 16 targets, a few requests): it
completes, every figure of the new path and of the old one is produced, and the answers have the
catalogue's targets.  No timing is asserted (speed lives in benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]


def test_a_quick_run_produces_every_figure(pg_admin_url, tmp_path):
    out = tmp_path / "figures.json"
    prefix = f"covbench_smoke_{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "coverage.py"), "--quick", "--requests", "5",
           "--pg-admin-url", pg_admin_url, "--db-prefix", prefix, "--workdir", str(tmp_path / "work"),
           "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["failed"] == {}
    [scale] = figures["scales"]
    assert scale["devices"] == 2_000 and scale["sites"] > 0 and 0 < scale["live"] < 2_000
    assert scale["snapshot"]["days"] == 60
    assert scale["snapshot"]["snapshot_rows"] == 60 * 16 and scale["snapshot"]["take_snapshot_s"] > 0
    [cfg] = scale["configs"]
    assert cfg["targets"] == 16
    assert cfg["recompute"]["n"] == 3 and len(cfg["recompute"]["samples_ms"]) == 3
    for figure in ("coverage", "as_of"):
        assert cfg[figure]["n"] == 5 and 0 < cfg[figure]["p50_ms"] <= cfg[figure]["p95_ms"]
    assert (cfg["response"]["source"], cfg["response"]["targets"]) == ("live", 16)
    assert (cfg["as_of"]["source"], cfg["as_of"]["targets"]) == ("snapshot", 16)
    assert cfg["response"]["breakdown"] > 0 and cfg["as_of"]["breakdown"] > 0
    assert cfg["old"]["n"] >= 1 and cfg["old"]["p50_ms"] > 0 and cfg["old"]["targets"] == 16
    assert "GET /coverage" in done.stdout
    with psycopg.connect(pg_admin_url) as conn:         # the benchmark drops what it built
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                            (prefix + "%",)).fetchone()[0] == 0
