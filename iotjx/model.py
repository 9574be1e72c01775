"""Domain types that cross package lines: defined once, frozen and slotted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PILOTS = ("water", "fire", "traffic")
NETWORKS = ("nbiot", "cat1")
TRANSPORTS = ("mqtt", "coap", "http")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of an uplink, told to its transport once committed: `stored`, `duplicate` or
    `rejected` (with the reject reason and the decoder's detail).  Rejected uplinks are committed too
    (in the rejects table), so MQTT acknowledges them all; CoAP and HTTP answer with an error code."""

    status: str
    reason: str | None = None
    detail: str = ""
    downlink: bytes | None = None        # a queued command to hand the device in the response


def _no_ack(outcome: Outcome) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Uplink:
    """Bytes as a device sent them, and how they arrived. Transports make these; nothing parses them
    before the pipeline.  `ack` tells the transport the uplink is committed (MQTT PUBACK, CoAP 2.04)."""

    device_id: str
    payload: bytes
    transport: str
    received_at: float                     # epoch seconds, set by the transport on arrival
    meta: dict[str, Any] = field(default_factory=dict)   # topic, peer, radio figures from envelopes
    ack: Callable[[Outcome], None] = _no_ack


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device: the registry, not the topic, decides what it is."""

    device_id: str                         # IMEI or platform id
    model: str
    codec: str
    pilot: str                             # water / fire / traffic
    network: str                           # nbiot / cat1
    site_id: int | None
    reporting_interval_s: int
    status: str = "active"
    codec_settings: dict[str, Any] = field(default_factory=dict)
    family: str = ""                       # water / fire / traffic / parking: which readings table
    inner_codec: str | None = None         # envelope models: the codec of the wrapped payload
    inner_settings: dict[str, Any] = field(default_factory=dict)
    dedup_window_s: float | None = None    # None: the gateway's IOTJX_DEDUP_WINDOW_S
    max_payload_bytes: int | None = None   # the model's largest frame; None: only IOTJX_UPLINK_MAX_BYTES
    key: int | None = None                 # devices.device_key: the rollups' integer key
