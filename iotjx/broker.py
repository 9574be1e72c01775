"""Finding or starting an MQTT broker for the demo and the tests: the configured one, a `mosquitto`
on PATH started with the project's configuration (deploy/mosquitto/mosquitto.conf: authentication
on, a device listener and a service listener), or an embedded amqtt broker (MQTT 3.1.1 only, and
anonymous: it is the fallback of a machine without Mosquitto, never a deployment).

A Mosquitto started here makes its own gateway and tester accounts (`gateway_login`,
`tester_login`), kept in its password file only; `sync(db_url)` adds the registry's accounts (device
accounts and any gateway/tester accounts made with `iotjx broker account create`) and reloads it."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_CONF = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf"
DEVICE_PORT, SERVICE_PORT = 1883, 1884       # the shipped file's listeners


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_config(port: int, persistence_dir: Path, base: Path = PROJECT_CONF, *,
                     service_port: int | None = None, conf_dir: Path | None = None) -> str:
    """The project's broker configuration with the listeners on 127.0.0.1 (device listener on `port`,
    service listener on `service_port`), the persistence dir and the account files' dir replaced."""
    lines = []
    for line in base.read_text().splitlines():
        key, _, rest = line.partition(" ")
        if key == "listener":
            shipped = int(rest.split()[0])
            line = f"listener {service_port if shipped == SERVICE_PORT and service_port else port} 127.0.0.1"
        elif key == "persistence_location":
            line = f"persistence_location {persistence_dir}/"
        elif key in ("password_file", "acl_file") and conf_dir is not None:
            line = f"{key} {Path(conf_dir) / Path(rest.strip()).name}"
        lines.append(line)
    return "\n".join(lines) + "\n"


class MosquittoProcess:
    """A mosquitto started with the project's configuration on spare ports; restartable.  `url` is the
    service listener (gateways, tester), `device_url` the device listener."""

    def __init__(self, workdir: Path, port: int | None = None, *, service_port: int | None = None,
                 topic_prefix: str = "+", base: Path = PROJECT_CONF) -> None:
        """`topic_prefix`: the prefix in the ACL; "+" (the default here) lets each test or demo run use
        a prefix of its own under the same rules.  `base`: another configuration to start with (one
        with a single listener serves devices and services on one port)."""
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.exe = exe
        self.device_port = port or free_port()
        two_listeners = sum(line.startswith("listener ") for line in Path(base).read_text().splitlines()) > 1
        self.port = (service_port or free_port()) if two_listeners else self.device_port
        self.workdir = Path(workdir)
        self.topic_prefix = topic_prefix
        self.conf_dir = self.workdir / "accounts"
        if os.geteuid() == 0 and not _reachable_by_others(self.workdir):
            # The broker reads these files as the `mosquitto` user (at start and at each reload),
            # which cannot pass a root-only directory such as pytest's tmp root.
            self.conf_dir = Path(tempfile.mkdtemp(prefix="iotjx-mq-accounts-"))
            self.conf_dir.chmod(0o755)
            atexit.register(shutil.rmtree, self.conf_dir, True)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the `mosquitto` user, which must be able to save
            # its persistence file (or a restart loses every session) and read its account files.
            self.workdir.chmod(0o755)
            try:
                shutil.chown(self.workdir / "data", "mosquitto")
            except (LookupError, PermissionError):
                log.warning("no `mosquitto` user to own %s; persistence may fail", self.workdir / "data")
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(mosquitto_config(self.device_port, self.workdir / "data", base, service_port=self.port,
                                              conf_dir=self.conf_dir))
        self.gateway_login, self.tester_login = _own_logins(self.conf_dir / "own-logins.json")
        self._own_accounts = _own_accounts(self.gateway_login, self.tester_login)
        self._write_files(None)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def device_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.device_port}"

    def gateway_settings(self) -> dict[str, str]:
        """Settings fields for a gateway on this broker (service listener, the gateway account)."""
        return {"mqtt_url": self.url, "mqtt_username": self.gateway_login["username"],
                "mqtt_password": self.gateway_login["password"]}

    def sync(self, db_url: str | None) -> None:
        """The registry's accounts (and ours) written to the broker's files, and the broker reloaded."""
        self._write_files(db_url)
        if self.proc is not None and self.proc.poll() is None:
            from .broker_sync import reload_broker
            reload_broker(self.proc.pid)
            time.sleep(0.3)      # the reload happens in the broker's loop, within a few ms here

    def _write_files(self, db_url: str | None) -> None:
        from . import broker_sync
        if db_url is None:
            broker_sync.write_files(self.conf_dir, self.topic_prefix, self._own_accounts)
            return
        import psycopg
        with psycopg.connect(db_url) as conn:
            broker_sync.sync(conn, self.conf_dir, self.topic_prefix, extra_services=self._own_accounts)

    def start(self) -> MosquittoProcess:
        log_file = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        if not (wait_for_port("127.0.0.1", self.port) and wait_for_port("127.0.0.1", self.device_port)):
            self.stop()
            raise RuntimeError(f"mosquitto did not start; see {self.workdir / 'mosquitto.log'}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _reachable_by_others(path: Path) -> bool:
    """Every directory down to `path` lets other users through (search permission)."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents) if p.exists())


def _own_logins(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """This broker's gateway and tester logins, kept beside its files so that a restarted demo keeps
    them (and with them the gateway's derived client id, and so its session)."""
    import json
    try:
        saved = json.loads(path.read_text())
        return saved["gateway"], saved["tester"]
    except (OSError, ValueError, KeyError):
        pass
    logins = {"gateway": {"username": "iotjx-gateway", "password": secrets.token_urlsafe(18)},
              "tester": {"username": "iotjx-tester", "password": secrets.token_urlsafe(18)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(logins, f)
    return logins["gateway"], logins["tester"]


def _own_accounts(*logins: dict[str, str]):
    from .broker_sync import ServiceAccount
    from .mqtt_accounts import hash_password, mosquitto_hash
    roles = ("gateway", "tester")
    return tuple(ServiceAccount(login["username"], role, mosquitto_hash(*hash_password(login["password"])))
                 for login, role in zip(logins, roles, strict=True))


class AmqttBroker:
    """An embedded amqtt broker in its own thread and event loop (MQTT 3.1.1), anonymous: it has no
    password file or ACL of ours, so it is only the fallback of a machine without Mosquitto."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> AmqttBroker:
        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        self._thread.start()

        async def _start():
            self._broker = Broker(config)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(15)
        if not wait_for_port("127.0.0.1", self.port):
            raise RuntimeError("the embedded amqtt broker did not start")
        log.warning("the embedded amqtt broker at %s is anonymous: any client may publish as any device "
                    "(install mosquitto for the secured configuration)", self.url)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(15)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
