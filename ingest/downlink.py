"""Commands for sleeping devices: queued through the API, handed over on the device's next uplink
(in the CoAP 2.04 response, or as an MQTT publish on ``{prefix}/down/{device_id}``), then
acknowledged by the device or expired.  Status: queued → sent → acknowledged | expired.

How a device acknowledges (docs/transports.md):
* CoAP: a later ``POST /up/{device_id}?t=…&ack=<id>`` (the id came as Location-Query ``dl=<id>``);
* MQTT: a publish on ``{prefix}/ack/{device_id}`` whose payload is the id in decimal (several ids
  separated by commas); an empty payload acknowledges every command sent to that device.

The pipeline does not change: transports ask `has_pending` after their uplink is committed."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from iotjx.model import Outcome
from iotjx.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("valve_close", "valve_open", "set_interval", "raw")
MAX_PAYLOAD = 1024          # one CoAP datagram; a sleeping device should not need Block2 to read a command
ENVELOPE_CODECS = ("ctwing", "onenet")


class DownlinkError(ValueError):
    """A command that cannot be queued; `status` is the HTTP code the API answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- payloads

def build_payload(codec: str, settings: Mapping[str, Any], kind: str, params: Mapping[str, Any],
                  raw: bytes | None = None) -> bytes:
    """The bytes a device of this codec receives for `kind`; operator-given `raw` bytes win."""
    if kind not in KINDS:
        raise DownlinkError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if codec in ENVELOPE_CODECS:
        raise DownlinkError(f"{codec} devices take commands through the carrier platform's command API, "
                            "not from iotjx")
    if raw is not None:
        payload = raw
    elif kind == "raw":
        raise DownlinkError("kind raw needs payload_hex or payload_base64")
    elif codec == "cjt188" and kind in ("valve_close", "valve_open"):
        payload = cjt188_valve_frame(kind == "valve_close", params, settings)
    elif codec in ("json", "senml-json", "senml-cbor"):
        payload = _structured_command(codec, kind, params)
    else:
        raise DownlinkError(f"no {kind} encoder for codec {codec}; give the bytes as payload_hex")
    if not payload or len(payload) > MAX_PAYLOAD:
        raise DownlinkError(f"a command payload must be 1..{MAX_PAYLOAD} bytes, not {len(payload)}")
    return payload


def cjt188_valve_frame(close: bool, params: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """CJ/T 188 write-data frame (C=04) with DI A017 valve control: 99H closes, 55H opens.

    The address defaults to the broadcast AA×7 (a device reached on its own link answers it);
    `meter_address` is the 14-digit printed id (A6..A0), sent A0 first."""
    address = str(params.get("meter_address") or "AA" * 7)
    if not re.fullmatch(r"[0-9]{14}|(?i:a{14})", address):
        raise DownlinkError("meter_address must be 14 digits (as printed on the meter)")
    meter_type = int(params.get("meter_type", 0x10))
    serial = int(params.get("serial", 0))
    if not (0 <= meter_type <= 0xFF and 0 <= serial <= 0xFF):
        raise DownlinkError("meter_type and serial are single bytes")
    di = (0xA0, 0x17) if settings.get("di_order") == "high_first" else (0x17, 0xA0)
    body = bytes([0x68, meter_type]) + bytes.fromhex(address)[::-1] + bytes([0x04, 0x04, *di, serial,
                                                                               0x99 if close else 0x55])
    return b"\xfe\xfe" + body + bytes([sum(body) & 0xFF, 0x16])


def _structured_command(codec: str, kind: str, params: Mapping[str, Any]) -> bytes:
    if kind == "set_interval":
        interval = params.get("interval_s")
        if not isinstance(interval, int) or isinstance(interval, bool) or not 60 <= interval <= 30 * 86400:
            raise DownlinkError("set_interval needs interval_s, an integer of 60..2592000 seconds")
        name, value = "reporting_interval", {"v": interval, "u": "s"}
    else:
        name, value = "valve", {"vs": "closed" if kind == "valve_close" else "open"}
    if codec == "json":
        body = {"command": kind, **({"interval_s": value["v"]} if "v" in value else {"valve": value["vs"]})}
        return json.dumps(body, separators=(",", ":")).encode()
    record = {"n": name, **value}
    if codec == "senml-json":
        return json.dumps([record], separators=(",", ":")).encode()
    import cbor2
    labels = {"n": 0, "u": 1, "v": 2, "vs": 3}          # RFC 8428 §6 CBOR labels
    return cbor2.dumps([{labels[k]: v for k, v in record.items()}])


# ----------------------------------------------------------------------------- the table

COLUMNS = ("id", "device_id", "kind", "params", "payload", "status", "transport", "attempts", "created_at",
           "sent_at", "acked_at", "expires_at")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM downlinks"


def queue_downlink(conn: psycopg.Connection, device_id: str, kind: str, params: Mapping[str, Any] | None = None,
                   raw: bytes | None = None, ttl_s: float = 7 * 86400) -> dict[str, Any]:
    """Queue one command for a device (payload built with its codec); the new row."""
    row = conn.execute("""SELECT m.codec, m.settings FROM devices d JOIN device_models m USING (model)
                          WHERE d.device_id = %s""", (device_id,)).fetchone()
    if row is None:
        raise DownlinkError(f"no device {device_id}", 404)
    params = dict(params or {})
    payload = build_payload(row[0], row[1] or {}, kind, params, raw)
    out = conn.execute(f"""INSERT INTO downlinks (device_id, kind, params, payload, expires_at)
                           VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))
                           RETURNING {', '.join(COLUMNS)}""",
                       (device_id, kind, Jsonb(params), payload, ttl_s)).fetchone()
    return _row(out)


def get_downlink(conn: psycopg.Connection, downlink_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"{_SELECT} WHERE id = %s", (downlink_id,)).fetchone()
    return _row(row) if row else None


def list_downlinks(conn: psycopg.Connection, device_id: str, status: str | None = None,
                   limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
    """A device's commands, newest first; `before_id`: only those older than that one (a page's cursor)."""
    rows = conn.execute(f"{_SELECT} WHERE device_id = %s AND (%s::text IS NULL OR status = %s) "
                        "AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
                        (device_id, status, status, before_id, before_id, limit)).fetchall()
    return [_row(r) for r in rows]


def _row(row: tuple) -> dict[str, Any]:
    out = dict(zip(COLUMNS, row, strict=True))
    out["payload"] = bytes(out["payload"])
    return out


_CLAIM = """
    UPDATE downlinks d SET status = 'sent', sent_at = now(), attempts = d.attempts + 1, transport = %s
    WHERE d.id IN (SELECT id FROM downlinks WHERE device_id = %s AND expires_at > now()
                     AND (status = 'queued' OR (status = 'sent' AND attempts < %s))
                   ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING d.id, d.kind, d.payload"""
_UNCLAIM = """
    UPDATE downlinks SET attempts = attempts - 1,
        status = CASE WHEN attempts = 1 THEN 'queued' ELSE status END,
        sent_at = CASE WHEN attempts = 1 THEN NULL ELSE sent_at END
    WHERE id = ANY(%s) AND status = 'sent'"""
_ACK = """
    UPDATE downlinks SET status = 'acknowledged', acked_at = now()
    WHERE device_id = %s AND status = 'sent' AND (%s::bigint[] IS NULL OR id = ANY(%s)) RETURNING id"""
_EXPIRE = "UPDATE downlinks SET status = 'expired' WHERE status IN ('queued', 'sent') AND expires_at <= now()"
_PENDING = """SELECT DISTINCT device_id FROM downlinks WHERE expires_at > now()
              AND (status = 'queued' OR (status = 'sent' AND attempts < %s))"""


def parse_ack_ids(text: str) -> list[int] | None:
    """Downlink ids a device acknowledges ("12", "12,13"); None for an empty ack (all sent ones)."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        return None
    if not all(p.isdigit() and len(p) <= 18 for p in parts):
        raise ValueError(f"an ack names downlink ids in decimal, not {text[:40]!r}")
    return [int(p) for p in parts]


# ----------------------------------------------------------------------------- the gateway side

class DownlinkService:
    """Which devices have commands waiting (refreshed every `downlink_poll_s`), claiming them for a
    transport, acknowledgements, expiry; and, with a broker, MQTT delivery on `{prefix}/down/…`."""

    def __init__(self, settings: Settings, connect: Callable[[], psycopg.Connection]) -> None:
        self._settings = settings
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._pending: frozenset[str] = frozenset()
        self._tasks: queue.Queue[tuple | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        self.mqtt = None
        if settings.mqtt_url is not None:
            self.mqtt = MqttDownlinks(settings, self._tasks)

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="iotjx-downlink", daemon=True)
        self._thread.start()
        if self.mqtt is not None:
            self.mqtt.start()

    def stop(self) -> None:
        # The worker first, so deliveries already asked for still go out; acks arriving after that
        # are not PUBACKed, and the broker gives them to this session again next time.
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join(30)
            self._thread = None
        if self.mqtt is not None:
            self.mqtt.stop()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --------------------------------------------------------------- what transports call
    @property
    def any_pending(self) -> bool:
        """True when some device may have a command waiting (no per-uplink lookups otherwise)."""
        return bool(self._pending)

    def has_pending(self, device_id: str) -> bool:
        """True when the device may have a command waiting (cheap: a set lookup, no I/O)."""
        return device_id in self._pending

    def claim(self, device_id: str, transport: str, limit: int = 1) -> list[tuple[int, str, bytes]]:
        """Mark up to `limit` waiting commands sent; (id, kind, payload) oldest first."""
        rows = self._db(lambda c: c.execute(_CLAIM, (transport, device_id, self._settings.downlink_max_attempts,
                                                     limit)).fetchall())
        self.counters[f"sent.{transport}"] += len(rows)
        return sorted((r[0], r[1], bytes(r[2])) for r in rows)

    def unclaim(self, ids: list[int]) -> None:
        """Put back commands that could not be handed over."""
        self._db(lambda c: c.execute(_UNCLAIM, (ids,)))
        self.counters["unclaimed"] += len(ids)

    def acknowledge(self, device_id: str, ids: list[int] | None) -> list[int]:
        """Mark the device's sent commands acknowledged (all of them when `ids` is None)."""
        done = [r[0] for r in self._db(lambda c: c.execute(_ACK, (device_id, ids, ids)).fetchall())]
        self.counters["acknowledged"] += len(done)
        return done

    def after_uplink(self, device_id: str, outcome: Outcome) -> None:
        """Hook for an MQTT uplink's ack (writer thread): the device is awake, send what waits."""
        if outcome.status in ("stored", "duplicate") and self.mqtt is not None and device_id in self._pending:
            self._tasks.put(("deliver", device_id))

    # --------------------------------------------------------------- the worker thread
    def _run(self) -> None:
        next_refresh = time.monotonic() + self._settings.downlink_poll_s
        while True:
            try:
                task = self._tasks.get(timeout=max(0.0, next_refresh - time.monotonic()))
            except queue.Empty:
                task = ()
            if task is None:
                return
            try:
                if task and task[0] == "deliver":
                    self._deliver_mqtt(task[1])
                elif task and task[0] == "ack":
                    self._ack_mqtt(*task[1:])
                if time.monotonic() >= next_refresh:
                    self._refresh()
                    next_refresh = time.monotonic() + self._settings.downlink_poll_s
            except psycopg.Error as exc:
                self.counters["db_errors"] += 1
                log.warning("downlinks: database error, retrying later: %s", str(exc).splitlines()[0])
                if task:
                    time.sleep(0.5)
                    self._tasks.put(task)
            except Exception:
                log.exception("downlink task %r failed", task)

    def _refresh(self) -> None:
        try:
            expired = self._db(lambda c: c.execute(_EXPIRE).rowcount)
            rows = self._db(lambda c: c.execute(_PENDING, (self._settings.downlink_max_attempts,)).fetchall())
        except psycopg.Error as exc:
            log.warning("downlinks: cannot refresh the waiting set: %s", str(exc).splitlines()[0])
            return
        self.counters["expired"] += max(expired, 0)
        self._pending = frozenset(r[0] for r in rows)

    def _deliver_mqtt(self, device_id: str) -> None:
        claimed = self.claim(device_id, "mqtt", limit=20)
        for i, (downlink_id, kind, payload) in enumerate(claimed):
            if not self.mqtt.publish(device_id, downlink_id, kind, payload):
                self.unclaim([d for d, _, _ in claimed[i:]])
                return

    def _ack_mqtt(self, device_id: str, payload: bytes, mid: int, qos: int, generation: int) -> None:
        try:
            ids = parse_ack_ids(payload.decode("ascii", "replace"))
        except ValueError as exc:
            self.counters["bad_ack"] += 1
            log.warning("ack from %s ignored: %s", device_id, exc)
        else:
            self.acknowledge(device_id, ids)
        self.mqtt.puback(mid, qos, generation)     # after the update: an ack lost in a crash is redelivered

    def _db(self, work: Callable[[psycopg.Connection], Any]) -> Any:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._conn.autocommit = True
            try:
                return work(self._conn)
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None
                raise


class MqttDownlinks:
    """A paho client of its own (`{client_id}-dl`, persistent session): publishes commands QoS 1 on
    `{prefix}/down/{device_id}` (MQTT 5: user property `downlink_id`) and reads acks on
    `{prefix}/ack/+`, each acknowledged to the broker only after the database update."""

    def __init__(self, settings: Settings, tasks: queue.Queue) -> None:
        from .mqtt import make_client
        self._settings = settings
        self._tasks = tasks
        self._ack_prefix = f"{settings.mqtt_topic_prefix}/ack/"
        topic = f"{self._ack_prefix}+"
        self._ack_filter = f"$share/{settings.mqtt_share_group}/{topic}" if settings.mqtt_shared_group else topic
        self._client = make_client(settings, f"{settings.mqtt_session_client_id}-dl", manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self.connected = threading.Event()          # connected and subscribed to the ack topic
        self._generation = 0                         # connections so far: a PUBACK belongs to one

    def start(self) -> None:
        from .mqtt import connect_properties
        host, port = self._settings.mqtt_host_port
        kwargs = {}
        if self._settings.mqtt_protocol == "5":
            kwargs = {"clean_start": False, "properties": connect_properties(self._settings)}
        self._client.connect_async(host, port, keepalive=30, **kwargs)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def publish(self, device_id: str, downlink_id: int, kind: str, payload: bytes, timeout: float = 10.0) -> bool:
        """True once the broker has the command (PUBACK); the broker then holds it for the device."""
        properties = None
        if self._settings.mqtt_protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = [("downlink_id", str(downlink_id)), ("kind", kind)]
        topic = f"{self._settings.mqtt_topic_prefix}/down/{device_id}"
        if not self.connected.is_set():      # paho would queue it and send it after we gave up
            return False
        try:
            info = self._client.publish(topic, payload, qos=1, properties=properties)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError) as exc:       # not connected / queue full
            log.warning("downlink %d to %s not published: %s", downlink_id, device_id, exc)
            return False

    def puback(self, mid: int, qos: int, generation: int) -> None:
        # A message id is only meaningful on the connection that delivered it; after a reconnect
        # the broker redelivers the message under a new id, and an old id could ack another one.
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("downlink client refused by the broker: %s", reason_code)
            return
        self._generation += 1
        client.subscribe(self._ack_filter, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        from .mqtt import identity_of
        device_id = msg.topic[len(self._ack_prefix):] if msg.topic.startswith(self._ack_prefix) else ""
        identity = self._settings.mqtt_identity_property
        if not device_id or "/" in device_id or (identity and identity_of(msg, identity) != device_id):
            # No device, or (where the broker names the publisher) another device's ack: not taken.
            if device_id and "/" not in device_id:
                log.debug("ack on %s from %r refused: not that device", msg.topic,
                            identity_of(msg, identity))
            self.puback(msg.mid, msg.qos, self._generation)
            return
        self._tasks.put(("ack", device_id, bytes(msg.payload), msg.mid, msg.qos, self._generation))
