"""The end-to-end ingest benchmark, run tiny: every phase completes and counts every uplink.
No timing is asserted (speed lives in benchmarks/README.md); the counts are checked against what
was sent, and the rows against plain SQL on the benchmark's database where the harness reports them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVICES, ROUNDS, NAIVE, COAP, TOUCHED = 150, 2, 60, 120, 300


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="the benchmark starts mosquitto with the project's configuration")
def test_a_tiny_run_completes_and_counts_every_uplink(pg_admin_url, tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ingest_e2e.py"), "--quick", "--repeats", "1",
           "--devices", str(DEVICES), "--messages", str(DEVICES * ROUNDS), "--naive-messages", str(NAIVE),
           "--coap-requests", str(COAP), "--coap-endpoints", "16", "--memory-s", "3",
           "--registry", str(DEVICES + 500), "--registry-touched", str(TOUCHED), "--skip", "outage",
           "--pg-admin-url", pg_admin_url, "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    skipped = figures["skipped"]
    assert not any(why.startswith("failed") for why in skipped.values()), skipped
    run = figures["runs"][0]
    sent = DEVICES * ROUNDS

    assert run["bare"]["received"] == sent and run["bare_2"]["received"] == sent
    for key in ("e2e_1", "e2e_2"):
        gw = run[key]
        assert (gw["messages"], gw["stored"], gw["rows"], gw["rejected"], gw["duplicates"]) == (sent, sent, sent, 0, 0)
        # every stored row found its publish time and its commit
        assert gw["latency"]["rows"] == sent and gw["latency"]["missing_commit"] == 0
        assert all(v > 0 for v in gw["latency"]["publish_to_commit_ms"])
    assert run["copy"]["rows"] == sent
    assert run["pipeline"]["stored"] == sent
    assert (run["naive"]["rows"], run["naive"]["errors"]) == (NAIVE, 0)
    assert run["coap_bare"]["codes"] == {"2.04": COAP}
    if "coap_gateway" in run:
        assert run["coap_gateway"]["codes"] == {"2.04": COAP} and run["coap_gateway"]["stored"] == COAP
    else:
        assert "coap_gateway" in skipped

    once = figures["once"]
    assert once["latency"]["rows"] == once["latency"]["messages"]
    assert once["memory_short"]["rows"] == once["memory_short"]["messages"] > 0
    assert once["memory_short"]["hwm_mb"] > 0
    registry = once["registry"]
    assert (registry["registry"], registry["touched"], registry["rows"]) == (DEVICES + 500, TOUCHED, TOUCHED)
    assert "summary over 1 repeats" in done.stdout
