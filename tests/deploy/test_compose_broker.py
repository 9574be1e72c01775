"""What compose's broker services do, on the real parts that run here: the real `iotjx` CLI as
broker-init and broker-sync run it, a real Mosquitto on deploy/mosquitto/compose.conf (its ports
and two paths moved, nothing else), a raw MQTT CONNECT as the gateways would log in; and Grafana's
read-only role from deploy/timescaledb/10-grafana-reader.sh on the real PostgreSQL."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from iotjx.broker import free_port, wait_for_port

from ._cli import DEPLOY

IOTJX = str(Path(sys.executable).with_name("iotjx"))


def iotjx(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IOTJX_DATABASE_URL": db_url, "IOTJX_LOG_LEVEL": "WARNING"}
    return subprocess.run([IOTJX, *args], env=env, capture_output=True, text=True, timeout=120)


def broker_init(db_url: str, conf_dir: Path, username: str, password: str) -> subprocess.CompletedProcess:
    """compose's `broker-init` command as compose runs it (`$$` is compose's escaped `$`), with this
    venv's iotjx first on PATH and the container's environment."""
    import yaml

    command = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["broker-init"]["command"]
    env = {**os.environ, "PATH": f"{Path(IOTJX).parent}:{os.environ['PATH']}", "IOTJX_DATABASE_URL": db_url,
           "IOTJX_BROKER_CONF_DIR": str(conf_dir), "IOTJX_MQTT_USERNAME": username, "IOTJX_MQTT_PASSWORD": password,
           "IOTJX_LOG_LEVEL": "WARNING"}
    return subprocess.run([part.replace("$$", "$") for part in command], env=env, capture_output=True, text=True,
                          timeout=120)


def mqtt_connect(port: int, username: str, password: str) -> int:
    """The CONNACK return code of an MQTT 3.1.1 CONNECT with these credentials (0: accepted, 4: bad
    user name or password, 5: not authorised)."""
    def field(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b
    variable = field(b"MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack("!H", 30)
    payload = field(b"deploy-test-" + secrets.token_hex(4).encode()) + field(username.encode()) + field(password.encode())
    body = variable + payload
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        answer = s.recv(4)
    assert answer[:2] == b"\x20\x02", answer
    return answer[3]


@pytest.fixture
def broker_dirs():
    # Started as root, Mosquitto drops to the `mosquitto` user, which must reach its files.
    root = Path(tempfile.mkdtemp(prefix="iotjx-deploy-broker-"))
    root.chmod(0o755)
    (root / "data").mkdir()
    (root / "accounts").mkdir()
    if os.geteuid() == 0:
        for sub in ("data", "accounts"):
            try:
                shutil.chown(root / sub, "mosquitto", "mosquitto")
            except (LookupError, PermissionError):
                pass
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="mosquitto is not installed")
def test_compose_broker_sequence_on_a_real_mosquitto(db_url, broker_dirs):
    device_port, service_port = free_port(), free_port()
    accounts = broker_dirs / "accounts"
    # broker-init, its very command: the gateways' account with the password of .env, then the files
    password = secrets.token_hex(12)
    short = broker_init(db_url, accounts, "gateway", "too-short")
    assert short.returncode != 0 and "16-128" in short.stderr          # the reason is shown …
    assert not (accounts / "services.passwd").exists()                # … and nothing was written
    synced = broker_init(db_url, accounts, "gateway", password)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert password not in synced.stdout + synced.stderr               # the password is not logged
    assert {p.name for p in accounts.iterdir()} >= {"devices.passwd", "devices.acl", "services.passwd", "services.acl"}

    conf = (DEPLOY / "mosquitto" / "compose.conf").read_text()
    for old, new in (("listener 1883\n", f"listener {device_port}\n"), ("listener 1884\n", f"listener {service_port}\n"),
                     ("/etc/mosquitto/iotjx/", f"{accounts}/"), ("/mosquitto/data/", f"{broker_dirs / 'data'}/")):
        assert old in conf
        conf = conf.replace(old, new)
    (broker_dirs / "mosquitto.conf").write_text(conf)
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with open(broker_dirs / "mosquitto.log", "wb") as log:
        proc = subprocess.Popen([exe, "-c", str(broker_dirs / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", service_port) and wait_for_port("127.0.0.1", device_port), \
            (broker_dirs / "mosquitto.log").read_text()
        # The gateways' listener is on every interface of the container (they are other containers) …
        listening = {c.laddr.port: c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening[service_port] in ("0.0.0.0", "::")
        # … and takes the gateway account, not a wrong password, not anonymous
        assert mqtt_connect(service_port, "gateway", password) == 0
        assert mqtt_connect(service_port, "gateway", password + "x") in (4, 5)
        # a device account appears after a sync with the pid (what broker-sync --watch does), without restart
        csv = broker_dirs / "devices.csv"
        csv.write_text("device_id,model,network,city,site_kind,site_name\n"
                       "860000000000001,cjt188-nb-water-std,nbiot,360600,community,Deploy test community\n")
        imported = iotjx(db_url, "devices", "import", str(csv))
        assert imported.returncode == 0, imported.stdout + imported.stderr
        device = iotjx(db_url, "devices", "mqtt-password", "860000000000001", "--password", "device-secret-000001")
        assert device.returncode == 0, device.stdout + device.stderr
        assert mqtt_connect(device_port, "860000000000001", "device-secret-000001") in (4, 5)
        reloaded = iotjx(db_url, "broker", "sync", "--conf-dir", str(accounts), "--pid", str(proc.pid))
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        deadline = time.monotonic() + 5
        while mqtt_connect(device_port, "860000000000001", "device-secret-000001") != 0:
            assert time.monotonic() < deadline, "the reloaded broker does not take the new device account"
            time.sleep(0.1)
        # the gateway account is refused on the devices' listener (per_listener_settings)
        assert mqtt_connect(device_port, "gateway", password) in (4, 5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_grafana_reader_role_reads_and_cannot_write(db_url):
    """The image's init step, run as the image runs it (psql as POSTGRES_USER on POSTGRES_DB)."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    role = f"iotjx_grafana_{secrets.token_hex(4)}"
    env = {**os.environ, "POSTGRES_USER": info.get("user") or "postgres", "POSTGRES_DB": info["dbname"],
           "PGHOST": info.get("host") or "127.0.0.1", "PGPORT": str(info.get("port") or 5432),
           "IOTJX_GRAFANA_DB_USER": role, "IOTJX_GRAFANA_DB_PASSWORD": secrets.token_hex(12)}
    if info.get("password"):
        env["PGPASSWORD"] = info["password"]
    done = subprocess.run(["sh", str(DEPLOY / "timescaledb" / "10-grafana-reader.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        with psycopg.connect(db_url, user=role, password=env["IOTJX_GRAFANA_DB_PASSWORD"], autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] >= 0
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] > 0
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("DELETE FROM schema_migrations")
            conn.execute("SET default_transaction_read_only = off")          # a session may try …
            with pytest.raises(psycopg.errors.InsufficientPrivilege):       # … the role has no write grant
                conn.execute("DELETE FROM schema_migrations")
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
