"""The read-latency benchmark, run tiny: it builds its database, every figure is measured (none
errors) and returns rows, and the rollups it fills in SQL agree with its readings.  No timing is
asserted (speed lives in benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_measures_every_figure(pg_admin_url, tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "read_latency.py"), "--devices", "800", "--readings", "40000",
           "--requests", "4", "--pg-admin-url", pg_admin_url, "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert 35_000 < figures["build_s"]["rows"] < 45_000
    for name, m in figures["figures"].items():
        assert "error" not in m, (name, m)
        assert m["n"] == 4 and 0 < m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"] and m["rows_median"] > 0, name
