"""`iotjx demo --duration 20` from a clean directory, with no database or broker configured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_on_embedded_defaults(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTJX_")}
    env["IOTJX_DATA_DIR"] = str(tmp_path / "state")
    proc = subprocess.run([sys.executable, "-m", "iotjx.cli", "demo", "--duration", "20", "--devices", "60"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"storage:\s+postgresql", out)
    # plan targets with their verdicts, programme targets with their pace
    assert "Plan targets" in out and "Programme targets" in out
    assert re.search(r"tourism-smart-parking.*(met|missed|unknown)", out)
    live = re.search(r"live devices: (\d+) of (\d+) registered", out)
    assert live and int(live.group(1)) > 0 and int(live.group(2)) == 60, out[-2000:]
    stored = re.search(r"stored (\d+) readings", out)
    assert stored and int(stored.group(1)) > 0
    assert "checksum" in out and "unknown_device" in out      # planted bad frames were kept as rejects
