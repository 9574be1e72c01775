"""Finding or starting an MQTT broker for the demo and the tests: the configured one, a `mosquitto`
on PATH started with the project's configuration (deploy/mosquitto/mosquitto.conf), or an embedded
amqtt broker (MQTT 3.1.1 only)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_CONF = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf"


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


def mosquitto_config(port: int, persistence_dir: Path, base: Path = PROJECT_CONF) -> str:
    """The project's broker configuration with the listener port and persistence dir replaced."""
    lines = []
    for line in base.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "persistence_location":
            line = f"persistence_location {persistence_dir}/"
        lines.append(line)
    return "\n".join(lines) + "\n"


class MosquittoProcess:
    """A mosquitto started with the project's configuration on a spare port; restartable."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.exe = exe
        self.port = port or free_port()
        self.workdir = Path(workdir)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the `mosquitto` user, which must be able to save
            # its persistence file (or a restart loses every session).
            self.workdir.chmod(0o755)
            try:
                shutil.chown(self.workdir / "data", "mosquitto")
            except (LookupError, PermissionError):
                log.warning("no `mosquitto` user to own %s; persistence may fail", self.workdir / "data")
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(mosquitto_config(self.port, self.workdir / "data"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MosquittoProcess:
        log_file = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        if not wait_for_port("127.0.0.1", self.port):
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


class AmqttBroker:
    """An embedded amqtt broker in its own thread and event loop (MQTT 3.1.1)."""

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
        return self

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(15)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
