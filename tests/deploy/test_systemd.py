"""deploy/systemd/*.service: units systemd accepts, with the keys each kind needs, running iotjx
commands that exist."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ._cli import DEPLOY, check_invocation, iotjx_invocations

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED_IOTJX = "/opt/iotjx/venv/bin/iotjx"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → every value in order (systemd allows a key several times,
    e.g. EnvironmentFile= and ExecStartPre=); comments and blank lines skipped, no continuation lines."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = out.setdefault(stripped[1:-1], {})
            continue
        key, sep, value = stripped.partition("=")
        assert section is not None and sep and not stripped.endswith("\\"), f"{path.name}:{number}: {line}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def values(parsed: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return [v for v in parsed.get(section, {}).get(key, []) if v]


def test_the_units_are_there():
    names = {p.name for p in UNITS}
    assert {"iotjx-db-upgrade.service", "iotjx-gateway@.service", "iotjx-api.service", "iotjx-mosquitto.service",
            "iotjx-broker-sync.service"} <= names


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_has_what_its_kind_needs(path):
    parser = unit(path)
    assert values(parser, "Unit", "Description")
    assert len(values(parser, "Service", "ExecStart")) == 1
    assert values(parser, "Install", "WantedBy")
    if path.name != "iotjx-mosquitto.service":               # Mosquitto starts as root and drops to its user
        assert values(parser, "Service", "User") and values(parser, "Service", "User") != ["root"]
    if values(parser, "Service", "Type") != ["oneshot"]:
        assert values(parser, "Service", "Restart") == ["on-failure"]
    assert "/etc/iotjx/iotjx.env" in values(parser, "Service", "EnvironmentFile")
    if path.name != "iotjx-db-upgrade.service" and "iotjx" in values(parser, "Service", "ExecStart")[0]:
        if path.name != "iotjx-broker-sync.service":
            assert "iotjx-db-upgrade.service" in " ".join(values(parser, "Unit", "Requires"))


def test_gateway_template_names_each_replica():
    parser = unit(DEPLOY / "systemd" / "iotjx-gateway@.service")
    env = " ".join(values(parser, "Service", "Environment"))
    assert "IOTJX_MQTT_CLIENT_ID=gateway-%i" in env
    assert values(parser, "Service", "KillSignal") == ["SIGTERM"]


def test_every_iotjx_command_in_the_units_exists():
    invocations = []
    for path in UNITS:
        parser = unit(path)
        for key in ("ExecStart", "ExecStartPre", "ExecStartPost"):
            for line in values(parser, "Service", key):
                argv = shlex.split(line.lstrip("-+!@:"))
                invocations += iotjx_invocations(argv)
    assert ["gateway"] in invocations and ["api"] in invocations and ["db", "upgrade"] in invocations
    problems = [p for args in invocations for p in check_invocation(args)]
    assert problems == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd's own parser on the units, with the installed path of iotjx pointed at this venv's
    (verify checks that each command is executable) and the template instantiated; any warning fails."""
    iotjx = Path(sys.executable).with_name("iotjx")
    assert iotjx.exists()
    for path in UNITS:
        text = path.read_text().replace(INSTALLED_IOTJX, str(iotjx))
        name = path.name.replace("@.service", "@1.service")
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(map(str, tmp_path.glob("*.service")))],
                            capture_output=True, text=True, cwd=tmp_path)
    # dependencies on units absent here (postgresql.service) are not errors; anything else is
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and lines == [], "\n".join(lines)
