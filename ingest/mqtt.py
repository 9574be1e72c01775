"""MQTT transport: paho in its network thread, uplinks handed to the pipeline, PUBACK after commit.

Topic scheme: devices publish on ``{prefix}/up/{device_id}`` (QoS 1); commands for a device go to
``{prefix}/down/{device_id}``.  The registry, not the topic, says what the device is."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotjx.model import Uplink
from iotjx.settings import Settings

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600   # the broker keeps our session (and unacked messages) a week
RECEIVE_MAXIMUM = 65535            # MQTT 5: let the broker keep many unacknowledged messages in flight


def make_client(settings: Settings, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """The one place that turns settings into a paho client (not yet connected)."""
    v5 = settings.mqtt_protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=manual_ack,
    )
    if settings.mqtt_username:
        client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(1000)
    return client


def connect_properties(settings: Settings) -> Properties | None:
    if settings.mqtt_protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


class MqttIngest:
    """Subscribes to the uplink topic with a persistent session and feeds the pipeline."""

    def __init__(self, settings: Settings, submit: Callable[[Uplink], None]) -> None:
        self._settings = settings
        self._submit = submit
        self._prefix = f"{settings.mqtt_topic_prefix}/up/"
        self._client = make_client(settings, settings.mqtt_client_id, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self.connected = threading.Event()
        self.counters = {"messages": 0, "bad_topic": 0, "reconnects": 0}

    @property
    def client(self) -> mqtt.Client:
        return self._client

    def start(self) -> None:
        host, port = self._settings.mqtt_host_port
        kwargs = {}
        if self._settings.mqtt_protocol == "5":
            kwargs = {"clean_start": False, "properties": connect_properties(self._settings)}
        self._client.connect_async(host, port, keepalive=30, **kwargs)
        self._client.loop_start()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Stop reading; what is in flight and unacknowledged the broker redelivers to our session."""
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    # paho callbacks run in its network thread: keep them short, never raise.
    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(self._settings.uplink_topic_filter, qos=1)
        log.info("connected to %s, subscribed to %s (session present: %s)", self._settings.mqtt_url,
                 self._settings.uplink_topic_filter, flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            log.warning("disconnected from the broker: %s; paho reconnects with backoff", reason_code)
            self.counters["reconnects"] += 1
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
            device_id = topic[len(self._prefix):] if topic.startswith(self._prefix) else ""
            if "/" in device_id:
                device_id = ""
            ack = partial(_puback, client, msg.mid, msg.qos) if msg.qos > 0 else _nothing
            if not device_id:
                self.counters["bad_topic"] += 1
            self._submit(Uplink(device_id=device_id or f"?{topic}", payload=msg.payload, transport="mqtt",
                                received_at=time.time(), meta={"topic": topic}, ack=ack))
            self.counters["messages"] += 1
        except Exception:
            log.exception("uplink on %s (%d bytes) could not be queued", msg.topic, len(msg.payload))


def _puback(client: mqtt.Client, mid: int, qos: int, outcome) -> None:
    # Rejected uplinks are committed too (rejects table): every outcome is acknowledged.
    client.ack(mid, qos)


def _nothing(outcome) -> None:
    return None
