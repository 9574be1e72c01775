"""`iotjx demo --duration 20` from a clean directory, with no database or broker configured: the province
mix over MQTT, CoAP and carrier push, then coverage, open alarms, leaks, weak cells and the HTML report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_on_embedded_defaults(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTJX_")}
    env["IOTJX_DATA_DIR"] = str(tmp_path / "state")
    env["COLUMNS"] = "200"
    proc = subprocess.run([sys.executable, "-m", "iotjx.cli", "demo", "--duration", "20", "--devices", "60"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"storage:\s+postgresql", out)
    fleet = re.search(r"(\d+) devices registered across 11 cities \(([^)]*)\)", out)
    assert fleet, out[-3000:]
    # every pilot of the province mix, over every transport
    for what in ("fire", "parking", "traffic", "water", "coap", "http", "mqtt"):
        assert re.search(rf"\b{what} [1-9]\d*", fleet.group(2)), fleet.group(2)
    # plan targets with their verdicts, programme targets with their pace
    assert "Plan targets" in out and "Programme targets" in out
    assert re.search(r"tourism-smart-parking.*(met|missed|unknown)", out)
    live = re.search(r"live devices: (\d+) of (\d+) registered", out)
    assert live and int(live.group(1)) > 0 and int(live.group(2)) == int(fleet.group(1)), out[-2000:]
    stored = re.search(r"— (\d+) readings", out)
    assert stored and int(stored.group(1)) > 0
    for table in ("water_readings", "fire_events", "traffic_flow", "parking_events"):
        assert re.search(rf"[1-9]\d* {table}", out), table
    assert re.search(r"Open fire alarms and faults: \d+", out)
    assert re.search(r"Water leaks — meters with continuous or reverse flow: \d+", out)
    assert re.search(r"Weak-coverage cells .*: \d+", out.replace("\n", " "))
    assert "checksum" in out and "unknown_device" in out      # planted bad frames were kept as rejects
    report = re.search(r"coverage report \(HTML\): (\S+)", out)
    assert report, out[-2000:]
    html = Path(report.group(1)).read_text(encoding="utf-8")
    assert "Plan targets" in html and "Radio coverage by city" in html and "南昌" in html
