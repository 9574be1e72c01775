"""What a batch of uplinks becomes: carrier envelopes opened, devices looked up in the registry,
one batch-decoder call per codec group, records mapped to the family tables (a `WriteSet`)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

import decoders
from decoders import DecodeError
from decoders.carrier import is_radio_field, push_identity, unwrap
from iotjx.model import Device, Uplink

from .radio import radio_row_of
from .registry import DeviceRegistry
from .rejects import KEPT_BYTES, TOO_LARGE, UNKNOWN_DEVICE, cut_mark, digest, too_large_detail
from .replay import BAD_ORIGINAL_TIME
from .sinks import RADIO, WATER, radio_row, rows_for, water_columns, water_fast_mask
from .writer import WriteSet

ENVELOPES = ("ctwing", "onenet")
FIELDS = "fields"      # pseudo-codec: an object-model push whose platform already decoded the fields


def claim_key(u: Uplink, payload_key: Callable[[bytes], bytes]) -> tuple[str, bytes]:
    """(device, key) the uplink's dedup claim is made under: a carrier push's by the message its
    envelope names (`decoders.carrier.push_identity`: the same push re-serialised is one uplink),
    anything else's by its device and `payload_key(payload)`."""
    codec = u.meta.get("envelope") if u.meta else None
    if codec and not u.meta.get("envelope_opened"):
        identity = push_identity(codec, u.payload)
        if identity is not None:
            return identity
    return u.device_id, payload_key(u.payload)


class BatchBuilder:
    """Turns a batch of uplinks into the rows it writes: opens carrier envelopes, asks the registry
    what each device is, decodes per codec (one batch-decoder call per group), maps records to the
    family tables.  Pure apart from the registry lookup."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()        # the registry serves one thread at a time

    def _lookup(self, device_ids) -> dict[str, Device]:  # noqa: ANN001 - any iterable of ids
        with self._lock:
            return self._registry.lookup(device_ids)

    def codecs(self, batch: Sequence[Uplink], devices: dict[str, Device] | None = None) -> list[str | None]:
        """The codec each uplink's device is registered with (for the duplicates' metrics label)."""
        devices = self.devices(batch) if devices is None else devices
        return [devices[u.device_id].codec if u.device_id in devices else u.meta.get("envelope") for u in batch]

    def devices(self, batch: Sequence[Uplink]) -> dict[str, Device]:
        """The registered devices among the batch's senders (one registry lookup for the batch)."""
        return self._lookup(u.device_id for u in batch if u.device_id)

    def dedup_windows(self, batch: Sequence[Uplink], default_s: float,
                      devices: dict[str, Device] | None = None) -> list[float]:
        """Each uplink's dedup window: its device model's, else the gateway's default."""
        devices = self.devices(batch) if devices is None else devices
        out = []
        for u in batch:
            device = devices.get(u.device_id)
            out.append(default_s if device is None or device.dedup_window_s is None else device.dedup_window_s)
        return out

    def build(self, batch: Sequence[Uplink], ws: WriteSet | None = None,
              devices: dict[str, Device] | None = None) -> WriteSet:
        """The rows a batch turns into; pure apart from the registry lookup (`devices`: what a lookup
        for this batch already found)."""
        ws = ws if ws is not None else WriteSet()
        marked = [u for u in batch if u.meta]          # MQTT's uplinks carry none: one cheap pass
        if marked and any(cut_mark(u) for u in marked):
            batch = [u for u in batch if not _reject_cut(ws, u)]
        if marked and any(BAD_ORIGINAL_TIME in u.meta for u in marked):
            batch = [u for u in batch if not _reject_replay(ws, u)]
        if marked and any(u.meta.get("envelope") for u in marked):
            batch = [self._open_pushed_envelope(ws, u) if u.meta.get("envelope") else u for u in batch]
            batch = [u for u in batch if u is not None]
        if devices is None:
            devices = self._lookup(u.device_id for u in batch)
        else:
            missing = {u.device_id for u in batch} - devices.keys()
            if missing:
                devices = {**devices, **self._lookup(missing)}
        ws.devices = {**ws.devices, **devices} if ws.devices else devices
        groups: dict[tuple[str, str, str], list[Uplink]] = defaultdict(list)
        settings_of: dict[tuple[str, str, str], dict[str, Any]] = {}
        limit_of: dict[tuple[str, str, str], int | None] = {}
        for u in batch:
            device = devices.get(u.device_id)
            if device is None:
                ws.add_reject(u, None, UNKNOWN_DEVICE, "no registered, active device with this id")
                continue
            codec, settings = device.codec, device.codec_settings
            if codec in ENVELOPES:
                u = self._open_device_envelope(ws, u, device)
                if u is None:
                    continue
                codec, settings = device.inner_codec or "", device.inner_settings
            if "service_data" in u.meta:
                codec, settings = FIELDS, device.codec_settings
            key = (codec, device.family, device.model)      # a model fixes its codec settings
            groups[key].append(u)
            settings_of[key] = settings
            limit_of[key] = device.max_payload_bytes
        for key, uplinks in groups.items():
            self._decode_group(ws, key[0], key[1], settings_of[key], uplinks, limit_of[key])
        return ws

    def _open_pushed_envelope(self, ws: WriteSet, u: Uplink) -> Uplink | None:
        """A carrier push names its device inside the envelope: open it to know whose uplink it is."""
        codec = u.meta["envelope"]
        try:
            envelope, inner = unwrap(codec, u.payload)
        except DecodeError as exc:
            ws.add_reject(u, codec, exc.reason, exc.detail)
            return None
        device_id = envelope.get("imei") or envelope.get("device_id") or ""
        named = replace(u, device_id=device_id)
        ws.alias(named, u)
        return self._after_envelope(ws, named, codec, envelope, inner)

    def _open_device_envelope(self, ws: WriteSet, u: Uplink, device: Device) -> Uplink | None:
        if u.meta.get("envelope_opened"):
            return u
        try:
            envelope, inner = unwrap(device.codec, u.payload, device.codec_settings)
        except DecodeError as exc:
            ws.add_reject(u, device.codec, exc.reason, exc.detail)
            return None
        return self._after_envelope(ws, u, device.codec, envelope, inner)

    def _after_envelope(self, ws: WriteSet, u: Uplink, codec: str, envelope: dict[str, Any],
                        inner: bytes | None) -> Uplink | None:
        radio = {k: v for k, v in (envelope.get("radio") or {}).items() if v is not None}
        meta = {**u.meta, "envelope": codec, "envelope_opened": True, "sequence": envelope.get("sequence")}
        if radio:
            meta["radio"] = radio
        if inner is None and envelope.get("kind") in ("online", "offline"):
            event = replace(u, meta=meta)
            ws.alias(event, u)
            ws.add_event(event, f"event:{envelope['kind']}", radio_row(u, codec, radio), codec)
            return None
        if inner is None and not envelope.get("service_data"):
            ws.add_reject(u, codec, "schema", "the push carries neither a payload nor service data")
            return None
        if inner is None and radio and all(is_radio_field(k) for k in envelope["service_data"]):
            event = replace(u, meta=meta)                       # a signal report: radio figures only
            ws.alias(event, u)
            ws.add_event(event, "event:radio", radio_row(u, codec, radio), codec)
            return None
        if inner is None:
            meta["service_data"] = envelope["service_data"]    # an object-model push: fields, not bytes
        opened = replace(u, meta=meta, payload=inner if inner is not None else u.payload)
        ws.alias(opened, u)
        return opened

    def _decode_group(self, ws: WriteSet, codec: str, family: str, settings: dict[str, Any],
                      uplinks: list[Uplink], limit: int | None = None) -> None:
        if codec == FIELDS:
            name_map = settings.get("name_map") or {}
            for u in uplinks:
                fields = {name_map.get(k, k): v for k, v in u.meta["service_data"].items()}
                self._store_record(ws, u, codec, family, {"fields": fields}, settings)
            return
        if not codec:
            for u in uplinks:
                ws.add_reject(u, None, "unsupported", "an envelope model without an inner codec")
            return
        payloads = [u.payload for u in uplinks]
        if limit is not None and max(map(len, payloads)) > limit:      # one C-level pass per group
            uplinks = [u for u in uplinks if not _reject_over(ws, u, codec, limit)]
            if not uplinks:
                return
            payloads = [u.payload for u in uplinks]
        result = decoders.decode_batch(codec, payloads, settings)
        ok = result.status == 0
        for i in np.flatnonzero(~ok):
            u = uplinks[i]
            ws.add_reject(u, codec, result.reason(i) or "unknown", _detail(codec, u.payload, settings))
        fast = water_fast_mask(result) if codec == "cjt188" else np.zeros(len(uplinks), dtype=bool)
        if fast.any():
            received_at = np.fromiter((u.received_at for u in uplinks), dtype=np.float64, count=len(uplinks))
            ws.add_block(WATER.table, WATER.all_columns, water_columns(result, uplinks, fast, received_at),
                         int(fast.sum()))
            chosen = [uplinks[i] for i in np.flatnonzero(fast).tolist()]
            for u in chosen:
                if u.meta:
                    _add_radio(ws, u)
            ws.add_stored_block(chosen, received_at[fast], codec)
        for i in np.flatnonzero(ok & ~fast):
            self._store_record(ws, uplinks[i], codec, family, result.record(i), settings)

    def _store_record(self, ws: WriteSet, u: Uplink, codec: str, family: str, record: dict[str, Any],
                      settings: dict[str, Any]) -> None:
        try:
            table, rows = rows_for(codec, family, record)
        except ValueError as exc:
            ws.add_reject(u, codec, "unsupported", str(exc))
            return
        ws.add_rows(table.table, table.all_columns, [table.row(u, r) for r in rows])
        radio = radio_row_of(u, codec, record, settings)
        if radio is not None:
            ws.add_rows(RADIO.table, RADIO.all_columns, [radio])
        ws.add_stored(u, codec)


def _reject_cut(ws: WriteSet, u: Uplink) -> bool:
    """True (and a too_large reject) for an uplink the pipeline cut at IOTJX_UPLINK_MAX_BYTES."""
    mark = cut_mark(u)
    if not mark:
        return False
    ws.add_reject(u, None, TOO_LARGE, too_large_detail(mark["bytes"], mark["limit"], bytes.fromhex(mark["blake2b"]),
                                                       "the gateway's IOTJX_UPLINK_MAX_BYTES"))
    return True


def _reject_replay(ws: WriteSet, u: Uplink) -> bool:
    """True (and a bad_original_time reject) for a replay message the gateway did not honour."""
    why = u.meta.get(BAD_ORIGINAL_TIME) if u.meta else None
    if why is None:
        return False
    ws.add_reject(u, None, BAD_ORIGINAL_TIME, why)
    return True


def _reject_over(ws: WriteSet, u: Uplink, codec: str, limit: int) -> bool:
    """True (and a too_large reject keeping `KEPT_BYTES` of it) for a frame over its model's limit."""
    if len(u.payload) <= limit:
        return False
    ws.add_reject(u, codec, TOO_LARGE, too_large_detail(len(u.payload), limit, digest(u.payload),
                                                        "its model's max_payload_bytes"),
                  payload=u.payload[:KEPT_BYTES])
    return True


def _add_radio(ws: WriteSet, u: Uplink) -> None:
    """The radio figures an envelope carried, as a radio_readings row beside the reading."""
    radio = u.meta.get("radio")
    if radio:
        row = radio_row(u, u.meta.get("envelope", "payload"), radio)
        if row is not None:
            ws.add_rows(RADIO.table, RADIO.all_columns, [row])


def _detail(codec: str, payload: bytes, settings: dict[str, Any]) -> str:
    """The reference decoder's explanation of a reject (rejects are rare; this costs nothing at scale)."""
    try:
        decoders.decode(codec, payload, settings)
    except DecodeError as exc:
        return exc.detail
    except Exception as exc:  # the batch said no: keep whatever the reference says
        return f"{type(exc).__name__}: {exc}"
    return "the batch decoder refused what the reference decoder accepts"
