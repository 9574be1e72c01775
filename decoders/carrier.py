"""Carrier IoT-platform push envelopes (CTWing/AEP, OneNET): the envelope's identity, times, sequence,
radio fields, and the device's own payload left for the device model's inner codec.

Both codecs return the same keys:

* ``carrier`` — ``ctwing`` | ``onenet``; ``kind`` — ``data`` | ``online`` | ``offline``
* ``imei``, ``device_id`` (platform device id, str), ``product_id``, ``tenant_id``, ``imsi`` (str or None)
* ``received_at`` — the platform's timestamp (CTWing ``timestamp``, OneNET ``msg.at``, epoch ms), UTC
* ``sent_at`` — a device-side time when the envelope carries one (legacy ``eventTime``), else None
* ``sequence`` — CTWing ``upPacketSN`` (else ``upDataSN``); ``-1``/``""`` are None; OneNET has none
* ``message_type`` — CTWing ``messageType`` / legacy ``notifyType``; OneNET ``type`` as ``"1"``/``"2"``
* ``service_id`` — CTWing ``serviceId``; OneNET ``ds_id`` (``obj_inst_res``, e.g. ``3200_0_5750``)
* ``inner_payload`` — bytes of a base64 ``APPdata`` or a hex ``value``, else None
* ``service_data`` — the object-model / profile data as a dict, else None
* ``radio`` — ``rsrp_dbm``, ``sinr_db``, ``rsrq_db``, ``ecl`` (0..2), ``pci`` (0..503), ``cell_id`` (28 bit);
  None where absent or out of range (a radio field never rejects an uplink)
* ``signature``, ``nonce`` — OneNET ``msg_signature``/``signature`` and ``nonce``, passed through

Radio normalisation (docs/protocols/carrier.md): a positive RSRP is a dropped sign (``RSRP: 114`` is
−114 dBm); SINR/RSRQ beyond ±40 are tenths of a dB when ``radio_tenths`` is ``auto`` (default).
Sources: ../shared/PROTOCOLS.md §3 (wanghanhong/springcloud_alibaba pushes, kileroppo/das_go entity.go).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import DecodeError
from .registry import Codec, decode

ENVELOPE_KEYS = ("carrier", "kind", "imei", "device_id", "product_id", "tenant_id", "imsi", "received_at",
                 "sent_at", "sequence", "message_type", "service_id", "inner_payload", "service_data",
                 "radio", "signature", "nonce")
FIELDS = {
    "kind": "data / online / offline",
    "imei": "device IMEI", "device_id": "platform device id", "product_id": "CTWing product id",
    "tenant_id": "CTWing tenant id", "imsi": "SIM IMSI",
    "received_at": "platform timestamp, UTC", "sent_at": "device-side time, UTC (legacy envelopes)",
    "sequence": "upPacketSN (else upDataSN)", "message_type": "messageType / notifyType / OneNET type",
    "service_id": "CTWing serviceId / OneNET ds_id",
    "inner_payload": "device payload bytes (base64 APPdata, hex value)",
    "service_data": "object-model / profile data, dict",
    "radio": "rsrp_dbm (dBm), sinr_db (dB), rsrq_db (dB), ecl (0..2), pci (0..503), cell_id",
    "signature": "OneNET msg_signature", "nonce": "OneNET nonce",
}
DEFAULT_SETTINGS = {"radio_tenths": "auto", "value_encoding": "auto"}

# Normalised spelling (lower case, no "_" or "-") -> radio key.  First match wins.
_RADIO_SPELLINGS = {
    "rsrp_dbm": ("rsrp", "signalrsrp", "nrsrp", "rsrpdbm", "rsrpvalue"),
    "sinr_db": ("sinr", "snr", "signalsinr", "signalsnr", "nsinr", "sinrdb"),
    "rsrq_db": ("rsrq", "signalrsrq", "nrsrq", "rsrqdb"),
    "ecl": ("ecl", "celevel", "coveragelevel", "signalecl", "coverageenhancementlevel"),
    "pci": ("pci", "physicalcellid", "signalpci"),
    "cell_id": ("cellid", "cellidentity", "signalcellid", "ci"),
}
_SPELLING_TO_KEY = {s: key for key, spellings in _RADIO_SPELLINGS.items() for s in spellings}


# OneNET ds_id of LwM2M object 4 (Connectivity Monitoring) resources that carry radio values (OMA
# registry 4.xml v1.3: 2 radio signal strength = NB-IoT NRSRP, 3 link quality = NRSRQ, 8 cell id,
# 11 SignalSNR, 13 coverage enhancement level 0 none / 1..4 CE level 0..3).
_OBJECT4_RESOURCES = {"4_0_2": "rsrp_dbm", "4_0_3": "rsrq_db", "4_0_8": "cell_id", "4_0_11": "sinr_db",
                      "4_0_13": "ecl"}


def is_radio_field(name: str) -> bool:
    """Whether a property name is one of the radio figures' spellings or an object 4 radio ds_id (a
    signal report carries only these)."""
    return name in _OBJECT4_RESOURCES or str(name).lower().replace("_", "").replace("-", "") in _SPELLING_TO_KEY
_MS_RANGE = (0, 253402300799999)       # up to 9999-12-31


# --------------------------------------------------------------------------- shared helpers

def parse_json_body(payload: bytes) -> Any:
    """The JSON value of a push body; DecodeError('empty'|'syntax')."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    try:
        text = payload.decode("utf-8-sig")
        return json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("syntax", f"not JSON: {exc}") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _number(value: Any) -> float | None:
    """A finite number from a JSON number or numeric string; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _int_or_none(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, str) and value.strip() and not value.strip().lstrip("-").isdigit():
        try:
            value = int(value.strip(), 16)   # cell ids are sometimes printed in hex
        except ValueError:
            return None
    number = _number(value)
    if number is None or number != int(number) or not low <= number <= high:
        return None
    return int(number)


def _tenths(value: float, mode: str) -> float:
    if mode == "always" or (mode == "auto" and abs(value) > 40):
        return value / 10.0
    return value


def radio_fields(sources: list[Mapping[str, Any]], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The radio record found in these dicts (and their nested dicts) under any common spelling."""
    raw: dict[str, Any] = {}
    queue = list(sources)
    seen = 0
    while queue and seen < 64:            # bounded: a hostile body cannot make this loop long
        obj = queue.pop(0)
        seen += 1
        for k, v in obj.items():
            if isinstance(v, Mapping):
                queue.append(v)
                continue
            key = _SPELLING_TO_KEY.get(str(k).lower().replace("_", "").replace("-", ""))
            if key is not None and key not in raw:
                raw[key] = v
    mode = settings.get("radio_tenths", "auto")
    radio: dict[str, Any] = {key: None for key in _RADIO_SPELLINGS}
    rsrp = _number(raw.get("rsrp_dbm"))
    if rsrp is not None:
        rsrp = -abs(rsrp)                  # devices that drop the sign send the magnitude
        radio["rsrp_dbm"] = rsrp if -156.0 <= rsrp <= -44.0 else None
    sinr = _number(raw.get("sinr_db"))
    if sinr is not None:
        sinr = _tenths(sinr, mode)
        radio["sinr_db"] = sinr if -30.0 <= sinr <= 40.0 else None
    rsrq = _number(raw.get("rsrq_db"))
    if rsrq is not None:
        rsrq = _tenths(-abs(rsrq), mode)
        radio["rsrq_db"] = rsrq if -35.0 <= rsrq <= 3.0 else None
    radio["ecl"] = _int_or_none(raw.get("ecl"), 0, 2)
    radio["pci"] = _int_or_none(raw.get("pci"), 0, 503)
    radio["cell_id"] = _int_or_none(raw.get("cell_id"), 0, (1 << 28) - 1)
    return radio


def epoch_ms(value: Any, field: str) -> datetime | None:
    """An epoch-milliseconds field as UTC; None when absent or empty, DecodeError when malformed."""
    if value is None or value == "":
        return None
    number = _number(value)
    if number is None:
        raise DecodeError("schema", f"{field} {value!r} is not a number of milliseconds")
    if not _MS_RANGE[0] <= number <= _MS_RANGE[1]:
        raise DecodeError("value", f"{field} {number} ms is outside 1970..9999")
    return datetime.fromtimestamp(number / 1000.0, UTC)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return None if text in ("", "undefined", "null") else text


def _sequence(value: Any) -> int | None:
    number = _number(value)
    if number is None or number < 0 or number != int(number):
        return None
    return int(number)


def _envelope(carrier: str, **values: Any) -> dict[str, Any]:
    out = {key: None for key in ENVELOPE_KEYS}
    out["carrier"] = carrier
    out.update(values)
    return out


def _object(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise DecodeError("schema", f"{what} is a string that is not a JSON object") from None
    if not isinstance(value, dict):
        raise DecodeError("schema", f"{what} must be an object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- CTWing / AEP

def _base64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("schema", "APPdata must be a base64 string")
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("syntax", "APPdata is not base64") from None


def _legacy_time(value: Any) -> datetime | None:
    """OceanConnect ``eventTime`` (``20170214T163456Z``)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise DecodeError("value", f"eventTime {value!r} is not yyyymmddThhmmssZ") from None


def decode_ctwing(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope of one CTWing/AEP push (or a legacy OceanConnect deviceDataChanged push)."""
    body = _object(parse_json_body(payload), "the push body")
    if "notifyType" in body:
        return _decode_oceanconnect(body, settings)
    message_type = _text(body.get("messageType")) or "dataReport"
    common = {
        "message_type": message_type,
        "device_id": _text(body.get("deviceId")),
        "product_id": _text(body.get("productId")),
        "tenant_id": _text(body.get("tenantId")),
        "imsi": _text(body.get("IMSI")),
        "imei": _text(body.get("IMEI")),
        "received_at": epoch_ms(body.get("timestamp"), "timestamp"),
    }
    if message_type == "deviceOnlineOfflineReport":
        event = _number(body.get("eventType"))
        if event not in (0.0, 1.0):
            raise DecodeError("value", f"eventType {body.get('eventType')!r} is neither 0 nor 1")
        return _envelope("ctwing", kind="online" if event == 1.0 else "offline",
                         radio=radio_fields([], settings), **common)
    if message_type not in ("dataReport", "eventReport"):
        raise DecodeError("unsupported", f"messageType {message_type!r} carries no uplink data")
    if "payload" not in body:
        raise DecodeError("schema", "a dataReport without payload")
    service = _object(body["payload"], "payload")
    inner = None
    service_data: dict[str, Any] | None
    service_id = _text(body.get("serviceId"))
    if "APPdata" in service:
        inner = _base64(service["APPdata"])
        service_data = None
    elif "serviceData" in service:
        service_data = _object(service["serviceData"], "payload.serviceData")
        service_id = _text(service.get("serviceId")) or service_id
    else:
        service_data = service             # object-model products push the properties flat
    sources = [service_data] if service_data is not None else []
    if common["imei"] is None and service_data is not None:
        common["imei"] = _text(service_data.get("IMEI"))
    packet_sn = _sequence(body.get("upPacketSN"))
    return _envelope("ctwing", kind="data", service_id=service_id, inner_payload=inner,
                     service_data=service_data, radio=radio_fields(sources, settings),
                     sequence=packet_sn if packet_sn is not None else _sequence(body.get("upDataSN")),
                     **common)


def _decode_oceanconnect(body: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    notify = _text(body.get("notifyType"))
    if notify != "deviceDataChanged":
        raise DecodeError("unsupported", f"notifyType {notify!r} carries no uplink data")
    service = _object(body.get("service"), "service")
    data = _object(service.get("data", {}), "service.data")
    return _envelope("ctwing", kind="data", message_type=notify, device_id=_text(body.get("deviceId")),
                     service_id=_text(service.get("serviceId")), service_data=data,
                     sent_at=_legacy_time(service.get("eventTime")), imei=_text(data.get("IMEI")),
                     radio=radio_fields([data], settings))


def encode_ctwing(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A CTWing dataReport push as the platform sends it: ``inner_payload`` as APPdata, or
    ``service_data`` as a flat object-model payload.  fields: imei, device_id, received_at, sequence."""
    when = fields.get("received_at")
    body: dict[str, Any] = {
        "upPacketSN": fields.get("sequence", -1) if fields.get("sequence") is not None else -1,
        "upDataSN": -1, "topic": "v1/up/ad", "timestamp": int(round(when.timestamp() * 1000)) if when else 0,
        "tenantId": fields.get("tenant_id", ""), "serviceId": fields.get("service_id") or "",
        "protocol": "lwm2m", "productId": fields.get("product_id", ""),
        "messageType": "dataReport", "deviceType": "", "deviceId": fields.get("device_id", ""),
        "assocAssetId": "", "IMSI": "undefined", "IMEI": fields.get("imei", ""),
    }
    if fields.get("inner_payload") is not None:
        body["payload"] = {"APPdata": base64.b64encode(bytes(fields["inner_payload"])).decode()}
    else:
        body["payload"] = dict(fields.get("service_data") or {})
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- OneNET

def _hex_value(value: str, encoding: str) -> bytes | None:
    compact = value.strip()
    if encoding == "text":
        return None
    looks_hex = len(compact) % 2 == 0 and len(compact) > 0 and all(c in "0123456789abcdefABCDEF" for c in compact)
    if encoding == "hex" and not looks_hex:
        raise DecodeError("syntax", "value is not an even-length hex string")
    return bytes.fromhex(compact) if looks_hex else None


def decode_onenet(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope of one OneNET (NB-IoT suite) HTTP push: datapoint (type 1) or online/offline (type 2)."""
    body = _object(parse_json_body(payload), "the push body")
    if "enc_msg" in body:
        raise DecodeError("unsupported", "encrypted OneNET push (enc_msg); use plaintext mode")
    if "msg" not in body:
        raise DecodeError("schema", "no msg")
    msg = body["msg"]
    if isinstance(msg, list):
        if len(msg) != 1:
            raise DecodeError("unsupported", f"batched push of {len(msg)} messages: split before decoding")
        msg = msg[0]
    msg = _object(msg, "msg")
    kind_code = _number(msg.get("type"))
    common = {
        "message_type": None if kind_code is None else f"{kind_code:g}",
        "imei": _text(msg.get("imei")),
        "device_id": _text(msg.get("dev_id")),
        "received_at": epoch_ms(msg.get("at"), "msg.at"),
        "signature": _text(body.get("msg_signature", body.get("signature"))),
        "nonce": _text(body.get("nonce")),
    }
    if kind_code == 2:
        status = _number(msg.get("status"))
        if status not in (0.0, 1.0):
            raise DecodeError("value", f"status {msg.get('status')!r} is neither 0 nor 1")
        return _envelope("onenet", kind="online" if status == 1.0 else "offline",
                         radio=radio_fields([], settings), **common)
    if kind_code != 1:
        raise DecodeError("unsupported" if kind_code is not None else "schema",
                          f"msg.type {msg.get('type')!r} is not a datapoint (1) or login (2) message")
    ds_id = _text(msg.get("ds_id"))
    if "value" not in msg:
        raise DecodeError("schema", "a datapoint message without value")
    value = msg["value"]
    inner = None
    service_data: dict[str, Any] | None = None
    if isinstance(value, dict):
        service_data = value
    elif isinstance(value, str):
        inner = _hex_value(value, settings.get("value_encoding", "auto"))
        if inner is None:
            service_data = {ds_id or "value": value}
    elif _number(value) is not None:
        service_data = {ds_id or "value": value}
    else:
        raise DecodeError("schema", f"value of type {type(value).__name__}")
    sources: list[Mapping[str, Any]] = []
    if service_data is not None:
        sources.append(service_data)
        if ds_id in _OBJECT4_RESOURCES:
            figure = _OBJECT4_RESOURCES[ds_id]
            number = _number(value)
            if figure == "ecl" and number is not None:
                value = 0 if number == 0 else number - 1      # OMA CE level 0..4 -> ECL
            sources.insert(0, {_RADIO_SPELLINGS[figure][0]: value})
    return _envelope("onenet", kind="data", service_id=ds_id, inner_payload=inner,
                     service_data=service_data, radio=radio_fields(sources, settings), **common)


def encode_onenet(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A OneNET type-1 push carrying ``inner_payload`` as an upper-case hex ``value``.
    fields: imei, device_id (int), received_at, service_id (ds_id, default 3200_0_5750)."""
    when = fields.get("received_at")
    msg = {"at": int(round(when.timestamp() * 1000)) if when else 0, "imei": fields.get("imei", ""),
           "type": 1, "ds_id": fields.get("service_id") or "3200_0_5750",
           "value": bytes(fields.get("inner_payload") or b"").hex().upper(),
           "dev_id": int(fields.get("device_id") or 0)}
    return json.dumps({"msg": msg, "msg_signature": fields.get("signature", ""),
                       "nonce": fields.get("nonce", "")}, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- gateway helper

# What names one message of one device, whatever the platform's JSON looks like around it: a retry
# re-serialised (whitespace, key order, a member we do not read, a new nonce and signature) has the
# same identity; two messages of a device differ in the platform's sequence or time, or in the data.
_IDENTITY_KEYS = ("carrier", "kind", "message_type", "sequence", "received_at", "sent_at", "service_id")


def push_identity(codec: str, payload: bytes) -> tuple[str, bytes] | None:
    """(device, 16-byte key) naming the message a carrier push carries, for deduplication: the
    device is the envelope's IMEI (else the platform's device id); the key hashes the platform's
    sequence and times and the device's payload or service data, never the body's bytes.  None when
    the envelope does not open (the push is rejected anyway)."""
    try:
        envelope = decode(codec, payload)
    except DecodeError:
        return None
    device = envelope.get("imei") or envelope.get("device_id") or ""
    inner = envelope.get("inner_payload")
    identity = {key: envelope.get(key) for key in _IDENTITY_KEYS}
    identity["payload"] = None if inner is None else bytes(inner).hex()
    identity["service_data"] = envelope.get("service_data")
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return device, hashlib.blake2b(canonical.encode(), digest_size=16, person=b"iotjx-push").digest()



def unwrap(codec: str, payload: bytes, settings: Mapping[str, Any] | None = None
           ) -> tuple[dict[str, Any], bytes | None]:
    """(envelope, inner bytes or None) of a carrier push, so the gateway can hand the inner bytes to
    the device model's ``inner_codec``.  DecodeError as for ``decode``."""
    if codec not in ("ctwing", "onenet"):
        raise ValueError(f"{codec!r} is not a carrier envelope codec (ctwing, onenet)")
    envelope = decode(codec, payload, settings)
    return envelope, envelope["inner_payload"]


CODECS = [
    Codec(name="ctwing", family="envelope", fields=FIELDS, decode=decode_ctwing, encode=encode_ctwing,
          default_settings=DEFAULT_SETTINGS),
    Codec(name="onenet", family="envelope", fields=FIELDS, decode=decode_onenet, encode=encode_onenet,
          default_settings=DEFAULT_SETTINGS),
]

__all__ = ["CODECS", "decode_ctwing", "decode_onenet", "encode_ctwing", "encode_onenet", "push_identity", "radio_fields",
           "unwrap"]
