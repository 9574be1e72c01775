"""Captures: uplinks as timestamped records in a file, from a simulator run or from the wire.

The format is JSON lines (UTF-8, one object per line; gzip when the name ends in ``.gz``), so a
capture can be appended to, read as a stream, and inspected with ``jq``.  Every line has a ``type``:

* ``header`` (first line): ``capture`` = "iotjx", ``version`` = 1, ``source`` ("simulator" | "wire"),
  and for simulator runs ``scenario``, ``seed``, ``start`` (ISO time), ``duration_s``, ``speed``, ``devices``
* ``device``: one registered device of the run (``device_id``, ``model``, ``network``, ``city``,
  ``site_kind``, ``site_name``, ``reporting_interval_s``) — what a fresh system must register
* ``uplink``: ``t`` (epoch seconds when it reaches the server: simulated time, or the wall clock when
  recorded from the wire), ``device``, ``transport`` (mqtt | coap | http), ``payload`` (base64 of the
  exact bytes), and where known ``route`` (http: the carrier, ctwing | onenet), ``labels`` (planted
  behaviours), ``sent`` (when the device sent it), ``model``, ``radio`` ({rsrp_dbm, sinr_db, ecl, pci,
  cell_id}).

A simulator's capture holds no wall-clock value, so the same scenario and seed give the same bytes.
A last line cut short (a recorder killed mid-write) is skipped when reading."""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from iotjx.devices import DeviceRecord

log = logging.getLogger(__name__)

FORMAT, VERSION = "iotjx", 1


@dataclass(frozen=True, slots=True)
class UplinkRecord:
    """One uplink as it reaches the server."""

    t: float                              # epoch seconds at the server (simulated or wall clock)
    device_id: str
    transport: str                        # mqtt | coap | http
    payload: bytes                        # exactly the bytes sent (a carrier push: the JSON body)
    route: str = ""                       # http: the carrier (ctwing / onenet), which names the push URL
    labels: tuple[str, ...] = ()
    sent_t: float | None = None           # when the device sent it
    model: str = ""
    radio: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {"type": "uplink", "t": self.t, "device": self.device_id,
                                "transport": self.transport, "payload": base64.b64encode(self.payload).decode()}
        if self.route:
            line["route"] = self.route
        if self.labels:
            line["labels"] = list(self.labels)
        if self.sent_t is not None:
            line["sent"] = self.sent_t
        if self.model:
            line["model"] = self.model
        if self.radio:
            line["radio"] = dict(self.radio)
        return line

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> UplinkRecord:
        return cls(t=float(line["t"]), device_id=str(line["device"]), transport=str(line["transport"]),
                   payload=base64.b64decode(line["payload"], validate=True), route=str(line.get("route", "")),
                   labels=tuple(line.get("labels", ())), sent_t=line.get("sent"), model=str(line.get("model", "")),
                   radio=line.get("radio"))


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


def _open_write(path: Path, append: bool) -> IO[str]:
    if path.suffix == ".gz":
        # mtime 0 and no file name in the gzip header: the same records give the same bytes.
        raw = open(path, "ab" if append else "wb")
        return io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), encoding="utf-8")
    return open(path, "a" if append else "w", encoding="utf-8", newline="\n")


class CaptureWriter:
    """Writes a capture: the header (unless appending), device lines, then uplinks as they come."""

    def __init__(self, path: str | Path, header: Mapping[str, Any] | None = None, *, append: bool = False) -> None:
        self.path = Path(path)
        appending = append and self.path.exists() and self.path.stat().st_size > 0
        self._file = _open_write(self.path, appending)
        self._lock = threading.Lock()
        self.count = 0
        if not appending:
            self._file.write(_dumps({"type": "header", "capture": FORMAT, "version": VERSION, **(header or {})}))

    def device(self, record: DeviceRecord) -> None:
        self._file.write(_dumps({"type": "device", "device_id": record.device_id, "model": record.model,
                                 "network": record.network, "city": record.city, "site_kind": record.site_kind,
                                 "site_name": record.site_name, "site_id": record.site_id,
                                 "reporting_interval_s": record.reporting_interval_s}))

    def write(self, uplink: UplinkRecord) -> None:
        line = _dumps(uplink.to_json())
        with self._lock:
            self._file.write(line)
            self.count += 1

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class Capture:
    """A capture's header and devices (read eagerly) and its uplinks (streamed by `uplinks()`)."""

    path: Path
    header: dict[str, Any]
    devices: list[DeviceRecord] = field(default_factory=list)
    skipped: int = 0                      # lines that could not be read (a cut-off last line)

    def uplinks(self) -> Iterator[UplinkRecord]:
        for kind, obj in self._lines():
            if kind == "uplink":
                yield UplinkRecord.from_json(obj)

    def count(self) -> int:
        return sum(1 for kind, _ in self._lines() if kind == "uplink")

    def _lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rt", encoding="utf-8") as f:
            lines = iter(f)
            for n, line in enumerate(lines, start=1):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    if next(lines, None) is None and not line.endswith("\n"):
                        self.skipped += 1          # the last line, cut off mid-write
                        log.warning("%s: the last line is incomplete and was skipped", self.path)
                        return
                    raise ValueError(f"{self.path}: line {n} is not JSON") from None
                if not isinstance(obj, dict) or "type" not in obj:
                    raise ValueError(f"{self.path}: line {n} is not a capture record")
                yield obj["type"], obj


def read_capture(path: str | Path) -> Capture:
    """Open a capture: checks the header, reads the device lines; uplinks stream from `.uplinks()`."""
    capture = Capture(Path(path), {})
    for kind, obj in capture._lines():
        if not capture.header:
            if kind != "header" or obj.get("capture") != FORMAT:
                raise ValueError(f"{path}: not an iotjx capture (the first line is no iotjx header)")
            if obj.get("version") != VERSION:
                raise ValueError(f"{path}: capture version {obj.get('version')} (this iotjx reads {VERSION})")
            capture.header = obj
        elif kind == "device":
            capture.devices.append(DeviceRecord(
                device_id=obj["device_id"], model=obj["model"], network=obj["network"], city=str(obj["city"]),
                site_kind=obj["site_kind"], site_name=obj["site_name"], site_id=obj.get("site_id"),
                reporting_interval_s=obj.get("reporting_interval_s")))
        elif kind == "uplink":
            break
    if not capture.header:
        raise ValueError(f"{path}: empty capture")
    return capture


class WireRecorder:
    """Records what passes on ``{prefix}/up/+`` into a capture: a plain (not shared) subscriber beside
    the gateways, so it sees every uplink without taking any from them."""

    def __init__(self, settings, path: str | Path, *, append: bool = False, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._prefix = f"{settings.mqtt_topic_prefix}/up/"
        self._settings = settings
        self.writer = CaptureWriter(path, {"source": "wire", "topic": f"{self._prefix}+", "broker": settings.mqtt_url},
                                    append=append)
        self.count = 0
        self.connected = threading.Event()
        self._last_flush = time.monotonic()
        v5 = settings.mqtt_protocol == "5"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"iotjx-record-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if settings.mqtt_username:
            self._client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self) -> WireRecorder:
        host, port = self._settings.mqtt_host_port
        kwargs: dict[str, Any] = {}
        if self._settings.mqtt_protocol == "5":
            kwargs = {"clean_start": True}
        self._client.connect(host, port, keepalive=30, **kwargs)
        self._client.loop_start()
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the recorder: %s", reason_code)
            return
        client.subscribe(f"{self._prefix}+", qos=1)

    def _on_subscribe(self, *args: object) -> None:
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            device_id = msg.topic[len(self._prefix):]
            self.writer.write(UplinkRecord(round(time.time(), 3), device_id, "mqtt", bytes(msg.payload)))
            self.count += 1
            if time.monotonic() - self._last_flush > 1.0:
                self.writer.flush()
                self._last_flush = time.monotonic()
        except Exception:
            log.exception("could not record an uplink on %s", msg.topic)

    def stop(self) -> int:
        self._client.disconnect()
        self._client.loop_stop()
        self.writer.close()
        return self.count
