"""The gateway process: transports (MQTT; CoAP and carrier HTTP push when enabled) + pipeline +
downlinks for sleeping devices + a heartbeat row that /health reads.

Given a `SchemaKeeper` whose schema is not applied yet (the database did not answer at start-up),
the gateway runs all the same: every database connection it makes waits behind the keeper's gate,
so uplinks are spooled (fsync'd) and acknowledged, and the spool is replayed once the keeper has
applied the migrations — with no operator."""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import psycopg

from iotjx.db import connect
from iotjx.model import Outcome, Uplink
from iotjx.settings import Settings

from .aggregates import Aggregator
from .downlink import DownlinkService
from .mqtt import MqttIngest
from .pipeline import Pipeline
from .registry import DeviceRegistry
from .rejects import RejectRetention
from .spool import Spool
from .writer import Writer

if TYPE_CHECKING:
    from iotjx.runtime import SchemaKeeper

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


class Gateway:
    """Owns the pipeline, the transports and the downlinks; `start`, then `stop` (drains, acks, closes)."""

    def __init__(self, settings: Settings, *, heartbeat_s: float = 2.0, schema: SchemaKeeper | None = None) -> None:
        """`schema`: when given, no connection is made before its schema is applied (see the module)."""
        if settings.database_url is None:
            raise ValueError("the gateway needs IOTJX_DATABASE_URL")
        self.settings = settings
        self.schema = schema
        connector = self._connector
        self.registry = DeviceRegistry(connector("iotjx-registry"), cache_max=settings.registry_cache_max)
        aggregator = Aggregator(settings.tz) if settings.rollups else None
        self.writer = Writer(connector("iotjx-writer"), aggregator=aggregator)
        self.more_writers = [Writer(connector(f"iotjx-writer{k}"), aggregator=aggregator)
                             for k in range(1, settings.database_writers)]
        self.pipeline = Pipeline(self.registry, self.writer, batch_size=settings.batch_size,
                                 batch_age_s=settings.batch_age_ms / 1000,
                                 batch_idle_s=settings.batch_idle_ms / 1000, queue_max=settings.queue_max,
                                 dedup_window_s=settings.dedup_window_s, slow_batch_s=settings.slow_batch_s,
                                 spool=Spool(settings.spool_dir or settings.data_dir / "spool" / settings.mqtt_client_id,
                                             max_bytes=settings.spool_max_bytes),
                                 more_writers=self.more_writers, queue_max_bytes=settings.queue_max_bytes,
                                 uplink_max_bytes=settings.uplink_max_bytes,
                                 reject_rows_per_min=settings.reject_rows_per_min or None)
        self.reject_retention = RejectRetention(connector("iotjx-retention", autocommit=True),
                                                settings.reject_retention_days)
        self.downlinks = DownlinkService(settings, connector("iotjx-downlinks"))
        self.mqtt = MqttIngest(settings, self._submit_mqtt, ack_flush=self.pipeline.add_ack_flush,
                               read_gate=self.pipeline.wait_room, submit_many=self._submit_mqtt_many)
        self.coap = None
        if settings.coap_enabled:
            from .coap import CoapIngest, DeviceCredentials
            credentials = DeviceCredentials(connector("iotjx-coap"))
            self.coap = CoapIngest(settings, self.pipeline.submit, credentials, self.downlinks,
                                   ack_flush=self.pipeline.add_ack_flush)
        self.http = None
        if settings.http_push_enabled:
            from .http import HttpPushIngest
            self.http = HttpPushIngest(settings, self.pipeline.try_submit)
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._status_conn: psycopg.Connection | None = None     # one connection for every beat
        self._status_connect = connector("iotjx-heartbeat", autocommit=True)
        self._status_error: str | None = None
        self.started_at = datetime.now(UTC)

    def _connector(self, application_name: str, **kwargs) -> Callable[[], psycopg.Connection]:
        """A connection factory for one part of the gateway, behind the schema's gate when there is one."""
        url = self.settings.database_url

        def factory() -> psycopg.Connection:
            return connect(url, application_name=application_name, **kwargs)
        return factory if self.schema is None else self.schema.gate(factory)

    def start(self) -> None:
        try:
            from decoders.warmup import warm_up
        except ImportError:
            warm_up = None
        if warm_up is not None:
            warm_up()      # numba kernels compiled (or loaded from cache) before the first batch
        # paho's thread and the writer share the GIL; a thread back from the database waits for the
        # other to yield, up to the switch interval (5 ms by default) each time.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if self.schema is not None:
            self.schema.start()              # retries the migrations while the database is away
        self.pipeline.start()
        self.reject_retention.start()
        self.downlinks.start()
        self.mqtt.start()
        if self.coap is not None:
            self.coap.start()
        if self.http is not None:
            self.http.start()
        self._heartbeat = threading.Thread(target=self._beat, name="iotjx-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        # MQTT only pauses first, so what the pipeline holds is acknowledged on a live connection;
        # the other transports let the uplinks they hold be answered; then the writer drains.
        self.mqtt.pause()
        if self.schema is not None:
            self.schema.stop()
        if self.http is not None:
            self.http.stop()
        if self.coap is not None:
            self.coap.stop()
        self.pipeline.stop()
        self.mqtt.stop()
        self.reject_retention.stop()
        self.downlinks.stop()
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5)
        self._write_status()
        if self._status_conn is not None:
            self._status_conn.close()
        for writer in (self.writer, *self.more_writers):
            writer.close()
        self.registry.close()

    def status(self) -> dict:
        counters = dict(self.pipeline.counters)
        counters.update({f"mqtt.{k}": v for k, v in self.mqtt.counters.items()})
        counters.update({f"downlink.{k}": v for k, v in self.downlinks.counters.items()})
        for name in ("coap", "http"):
            transport = getattr(self, name)
            if transport is not None:
                counters.update({f"{name}.{k}": v for k, v in transport.counters.items()})
        if self.coap is not None and self.coap.rcvbuf is not None:
            counters["coap.rcvbuf_bytes"] = self.coap.rcvbuf
        return {"broker_connected": self.mqtt.connected.is_set(), "queue_depth": self.pipeline.queue_depth,
                "counters": counters, "last_error": self.pipeline.last_error,
                "spool": self.pipeline.spool_status(), "metrics": self.pipeline.metrics_snapshot()}

    def _submit_mqtt(self, uplink: Uplink) -> None:
        self.pipeline.submit(self._with_delivery(uplink))

    def _submit_mqtt_many(self, uplinks: list[Uplink]) -> None:
        if self.downlinks.any_pending:
            uplinks = [self._with_delivery(u) for u in uplinks]
        self.pipeline.submit_many(uplinks, "mqtt")

    def _with_delivery(self, uplink: Uplink) -> Uplink:
        # A device with a command waiting gets it once this uplink is committed (it is awake now);
        # the check is a set lookup, so the other uplinks pay nothing.
        if self.downlinks.has_pending(uplink.device_id):
            return replace(uplink, ack=partial(_then_deliver, uplink.ack, self.downlinks, uplink.device_id))
        return uplink

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            self._write_status()

    def _write_status(self) -> None:
        s = self.status()
        try:
            if self._status_conn is None or self._status_conn.closed:
                self._status_conn = self._status_connect()
            self._status_conn.execute("""
                INSERT INTO gateway_status (gateway_id, started_at, updated_at, broker_connected, queue_depth, counters)
                VALUES (%s, %s, now(), %s, %s, %s)
                ON CONFLICT (gateway_id) DO UPDATE SET started_at = excluded.started_at,
                    updated_at = now(), broker_connected = excluded.broker_connected,
                    queue_depth = excluded.queue_depth, counters = excluded.counters""",
                (self.settings.mqtt_client_id, self.started_at, s["broker_connected"], s["queue_depth"],
                 json.dumps({**s["counters"], "last_error": s["last_error"], "spool": s["spool"],
                             "metrics": s["metrics"]})))
        except psycopg.Error as exc:
            error = str(exc).splitlines()[0]
            # Once per change: a database away for an hour is one line, not one every beat.
            log.log(logging.WARNING if error != self._status_error else logging.DEBUG, "heartbeat not written: %s", error)
            self._status_error = error
            if self._status_conn is not None:
                self._status_conn.close()       # reconnect on the next beat
        else:
            self._status_error = None


def _then_deliver(transport_ack, downlinks: DownlinkService, device_id: str, outcome: Outcome) -> None:
    transport_ack(outcome)
    downlinks.after_uplink(device_id, outcome)
