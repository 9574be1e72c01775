"""Resolving the database and broker a command runs against: configured, or embedded defaults."""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from pathlib import Path

from .broker import AmqttBroker, MosquittoProcess
from .settings import Settings

log = logging.getLogger(__name__)


def resolve_services(settings: Settings, stack: ExitStack, *, data_dir: Path | None = None) -> Settings:
    """Settings with a database and a broker: the configured ones, else embedded ones whose
    shutdown is registered on `stack`."""
    data_dir = Path(data_dir or settings.data_dir).resolve()
    updates = {}
    if settings.database_url is None:
        from .db.embedded import start_embedded_postgres
        updates["database_url"] = start_embedded_postgres(data_dir / "pg")
        log.info("no IOTJX_DATABASE_URL: using an embedded PostgreSQL in %s", data_dir / "pg")
    if settings.mqtt_url is None:
        if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
            broker = MosquittoProcess(data_dir / "mosquitto").start()
            stack.callback(broker.stop)
            log.info("no IOTJX_MQTT_URL: started mosquitto with deploy/mosquitto/mosquitto.conf at %s", broker.url)
        else:
            broker = AmqttBroker().start()
            stack.callback(broker.stop)
            updates["mqtt_protocol"] = "3.1.1"
            log.info("no IOTJX_MQTT_URL and no mosquitto: started an embedded amqtt broker at %s", broker.url)
        updates["mqtt_url"] = broker.url
    return settings.model_copy(update=updates) if updates else settings


def prepare_database(settings: Settings) -> dict[str, object]:
    """Migrations and the device-model catalogue, applied; returns the migration summary."""
    from .db import connect
    from .db.migrations import upgrade
    from .devices import sync_models

    summary = upgrade(settings.database_url, raw_retention_days=settings.raw_retention_days)
    with connect(settings.database_url) as conn:
        summary["models"] = sync_models(conn)
        conn.commit()
    return summary
