"""Publishing uplinks over MQTT as devices do (QoS 1), counting what the broker acknowledged."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(slots=True)
class PublishStats:
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0


class MqttPublisher:
    """One MQTT connection that publishes many devices' uplinks on `{prefix}/up/{device_id}`."""

    def __init__(self, host: str, port: int, *, prefix: str = "iotjx", client_id: str = "",
                 max_inflight: int = 1000, protocol: str = "3.1.1", username: str | None = None,
                 password: str | None = None) -> None:
        """`username`/`password`: the broker account to log in with — a tester account on the service
        listener to publish for many devices, or one device's own account on the device listener."""
        self.prefix = prefix
        self.stats = PublishStats()
        self._lock = threading.Lock()
        self._all_acked = threading.Condition(self._lock)
        self._pending = 0
        # mid -> callback(ok, detail) for publishes whose caller wants to hear of the PUBACK; a PUBACK
        # can beat `publish` returning its mid, so early ones wait in `_early` for their callback.
        self._callbacks: dict[int, Callable[[bool, str], None]] = {}
        self._early: dict[int, tuple[bool, str]] = {}
        self._registering = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        if username:
            self._client.username_pw_set(username, password)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.on_publish = self._on_publish
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client.on_connect = self._on_connect
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(10):
            self.close()
            if self._refused:
                raise ConnectionError(f"the MQTT broker at {host}:{port} refused {username or 'an anonymous client'}: "
                                      f"{self._refused}")
            raise ConnectionError(f"no MQTT broker answered at {host}:{port}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        else:
            self._connected.set()

    def publish(self, device_id: str, payload: bytes, qos: int = 1,
                on_ack: Callable[[bool, str], None] | None = None, *, kind: str = "up") -> None:
        """Publish one uplink on `{prefix}/{kind}/{device_id}` (`kind` "replay": a replay message,
        `ingest.replay`).  `on_ack(ok, detail)`, when given, is called from paho's thread once the
        broker acknowledged (QoS 1) or refused it."""
        with self._lock:
            self._pending += 1
            self._registering += on_ack is not None
        info = self._client.publish(f"{self.prefix}/{kind}/{device_id}", payload, qos=qos)
        early = None
        with self._lock:
            if on_ack is not None:
                self._registering -= 1
                early = self._early.pop(info.mid, None)
                if early is None and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    self._callbacks[info.mid] = on_ack
            if not self._registering:
                self._early.clear()
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                self._pending -= 1
                self.stats.failed += 1
                early = (False, mqtt.error_string(info.rc))
            else:
                self.stats.sent += 1
        if on_ack is not None and early is not None:
            on_ack(*early)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        failed = bool(getattr(reason_code, "is_failure", False))
        detail = str(reason_code) if failed else ""
        with self._lock:
            self._pending -= 1
            if failed:
                self.stats.failed += 1
            else:
                self.stats.acknowledged += 1
            callback = self._callbacks.pop(mid, None)
            if callback is None and self._registering:
                self._early[mid] = (not failed, detail)
            if self._pending == 0:
                self._all_acked.notify_all()
        if callback is not None:
            callback(not failed, detail)

    @property
    def pending(self) -> int:
        """Published and not yet acknowledged by the broker."""
        return self._pending

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged everything published; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._all_acked.wait(remaining)
        return True

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
