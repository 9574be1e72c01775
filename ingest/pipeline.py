"""Uplink → bounded queue → batch (by size or age) → decode (one numba call per codec) → COPY →
commit → ack.  Nothing is acknowledged before its commit; a bad uplink costs one reject row."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg

import decoders
from decoders import DecodeError
from decoders.carrier import unwrap
from iotjx.model import Device, Uplink

from .registry import DeviceRegistry
from .sinks import RADIO, WATER, radio_row, rows_for, water_fast_mask, water_rows_from_batch
from .writer import WriteSet, Writer

log = logging.getLogger(__name__)

ENVELOPES = ("ctwing", "onenet")
FIELDS = "fields"      # pseudo-codec: an object-model push whose platform already decoded the fields


class Pipeline:
    """The batching writer thread.  Transports call `submit`, which blocks while the queue is full:
    that is the flow control that keeps memory bounded (the broker keeps what we have not read)."""

    def __init__(self, registry: DeviceRegistry, writer: Writer, *, batch_size: int = 5000,
                 batch_age_s: float = 0.2, queue_max: int = 50_000, retry_max_s: float = 5.0,
                 dedup_window_s: float = 86400.0) -> None:
        self._dedup_window_s = dedup_window_s
        self._last_purge = 0.0
        self._registry = registry
        self._writer = writer
        self._batch_size = batch_size
        self._batch_age_s = batch_age_s
        self._retry_max_s = retry_max_s
        self._queue: queue.Queue[Uplink | None] = queue.Queue(maxsize=queue_max)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.counters: Counter[str] = Counter()
        self.last_error: str | None = None
        self.batches = 0

    # ------------------------------------------------------------------ transport side
    def submit(self, uplink: Uplink) -> None:
        """Queue one uplink; blocks while the queue is full."""
        self._queue.put(uplink)
        self.counters[f"received.{uplink.transport}"] += 1

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="iotjx-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("writer thread did not finish within %.0f s; %d uplinks unacknowledged",
                      timeout, self.queue_depth)
        self._thread = None

    def _run(self) -> None:
        done = False
        while not done:
            batch, done = self._collect()
            if batch:
                self._process_until_committed(batch)

    def _collect(self) -> tuple[list[Uplink], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self._batch_age_s
        while len(batch) < self._batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _process_until_committed(self, batch: list[Uplink]) -> None:
        delay = 0.1
        while True:
            try:
                self.process(batch)
                self.last_error = None
                return
            except psycopg.OperationalError as exc:
                # The database is away: keep the batch (unacknowledged) and try again.
                self.last_error = str(exc).splitlines()[0]
                self.counters["db_retries"] += 1
                log.warning("database unavailable, retrying a batch of %d in %.1f s: %s",
                            len(batch), delay, self.last_error)
                time.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)

    # ------------------------------------------------------------------ the work
    def process(self, batch: Sequence[Uplink]) -> WriteSet:
        """Deduplicate, decode, store and acknowledge one batch, in one transaction."""
        try:
            with self._writer.transaction() as tx:
                fresh = batch
                ws = WriteSet()
                if self._dedup_window_s > 0:
                    is_new = tx.claim([(u.device_id, dedup_key(u.payload)) for u in batch],
                                      [u.received_at for u in batch], self._dedup_window_s)
                    fresh = [u for u, new in zip(batch, is_new, strict=True) if new]
                    for u, new in zip(batch, is_new, strict=True):
                        if not new:
                            ws.add_duplicate(u)
                self.build(fresh, ws)
                tx.write(ws)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                first = self.process(batch[:half])
                self.process(batch[half:])
                return first
            # The database refuses this uplink's rows: keep its bytes with the reason.
            ws = WriteSet()
            ws.add_reject(batch[0], None, "storage", str(exc).splitlines()[0])
            self._writer.write(ws)
        for u in batch:
            try:
                u.ack(ws.outcome(u))
            except Exception:  # a transport that cannot ack must not stop the writer
                log.exception("ack failed for an uplink from %s", u.device_id)
        self.batches += 1
        self.counters["stored"] += ws.stored
        self.counters["rejected"] += len(ws.rejects)
        self.counters["duplicate"] += ws.duplicates
        if self._dedup_window_s > 0 and time.monotonic() - self._last_purge > 600:
            self._last_purge = time.monotonic()
            self._writer.purge_dedup(self._dedup_window_s)
        return ws

    def build(self, batch: Sequence[Uplink], ws: WriteSet | None = None) -> WriteSet:
        """The rows a batch turns into; pure apart from the registry lookup."""
        ws = ws if ws is not None else WriteSet()
        batch = [self._open_pushed_envelope(ws, u) if u.meta.get("envelope") else u for u in batch]
        batch = [u for u in batch if u is not None]
        devices = self._registry.lookup(u.device_id for u in batch)
        groups: dict[tuple[str, str, str], list[Uplink]] = defaultdict(list)
        settings_of: dict[tuple[str, str, str], dict[str, Any]] = {}
        for u in batch:
            device = devices.get(u.device_id)
            if device is None:
                ws.add_reject(u, None, "unknown_device", "no registered, active device with this id")
                continue
            codec, settings = device.codec, device.codec_settings
            if codec in ENVELOPES:
                u = self._open_device_envelope(ws, u, device)
                if u is None:
                    continue
                codec, settings = device.inner_codec or "", device.inner_settings
            if "service_data" in u.meta:
                codec, settings = FIELDS, device.codec_settings
            key = (codec, device.family, _settings_key(settings))
            groups[key].append(u)
            settings_of[key] = settings
        for key, uplinks in groups.items():
            self._decode_group(ws, key[0], key[1], settings_of[key], uplinks)
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
            ws.add_event(event, f"event:{envelope['kind']}", radio_row(u, codec, radio))
            return None
        if inner is None and not envelope.get("service_data"):
            ws.add_reject(u, codec, "schema", "the push carries neither a payload nor service data")
            return None
        if inner is None:
            meta["service_data"] = envelope["service_data"]    # an object-model push: fields, not bytes
        opened = replace(u, meta=meta, payload=inner if inner is not None else u.payload)
        ws.alias(opened, u)
        return opened

    def _decode_group(self, ws: WriteSet, codec: str, family: str, settings: dict[str, Any],
                      uplinks: list[Uplink]) -> None:
        if codec == FIELDS:
            name_map = settings.get("name_map") or {}
            for u in uplinks:
                fields = {name_map.get(k, k): v for k, v in u.meta["service_data"].items()}
                self._store_record(ws, u, codec, family, {"fields": fields})
            return
        if not codec:
            for u in uplinks:
                ws.add_reject(u, None, "unsupported", "an envelope model without an inner codec")
            return
        result = decoders.decode_batch(codec, [u.payload for u in uplinks], settings)
        ok = result.status == 0
        for i in np.flatnonzero(~ok):
            u = uplinks[i]
            ws.add_reject(u, codec, result.reason(i) or "unknown", _detail(codec, u.payload, settings))
        fast = water_fast_mask(result) if codec == "cjt188" else np.zeros(len(uplinks), dtype=bool)
        if fast.any():
            ws.add_rows(WATER.table, WATER.all_columns, water_rows_from_batch(result, uplinks, fast))
            for i in np.flatnonzero(fast):
                ws.add_stored(uplinks[i])
        for i in np.flatnonzero(ok & ~fast):
            self._store_record(ws, uplinks[i], codec, family, result.record(i))

    def _store_record(self, ws: WriteSet, u: Uplink, codec: str, family: str, record: dict[str, Any]) -> None:
        try:
            table, rows = rows_for(codec, family, record)
        except ValueError as exc:
            ws.add_reject(u, codec, "unsupported", str(exc))
            return
        ws.add_rows(table.table, table.all_columns, [table.row(u, r) for r in rows])
        radio = u.meta.get("radio")
        if radio:
            row = radio_row(u, u.meta.get("envelope", "payload"), radio)
            if row is not None:
                ws.add_rows(RADIO.table, RADIO.all_columns, [row])
        ws.add_stored(u)


def dedup_key(payload: bytes) -> bytes:
    """What makes two uplinks of one device the same: their bytes (a retransmission, a redelivery)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


def _settings_key(settings: dict[str, Any]) -> str:
    return repr(sorted(settings.items())) if settings else ""


def _detail(codec: str, payload: bytes, settings: dict[str, Any]) -> str:
    """The reference decoder's explanation of a reject (rejects are rare; this costs nothing at scale)."""
    try:
        decoders.decode(codec, payload, settings)
    except DecodeError as exc:
        return exc.detail
    except Exception as exc:  # the batch said no: keep whatever the reference says
        return f"{type(exc).__name__}: {exc}"
    return "the batch decoder refused what the reference decoder accepts"
